"""The spectral pieces of the SVD methods from eigendecompositions of small Gram matrices, in float64.

A thin float32 SVD of a 2304×768 task matrix takes ~1 s on two CPU cores; its 768×768 Gram matrix in float64 and
that matrix's `eigh` take ~0.1 s together, and give the same subspaces:

* the k leading singular triplets of W (m×n, r = min(m, n)): WᵀW = V Σ² Vᵀ (or WWᵀ = U Σ² Uᵀ when m < n), then
  u = W v / σ (v = Wᵀ u / σ);
* the polar factor of a stack A (m×s) of such vectors, the orthonormal matrix nearest to it, which the reference
  takes as P Q from A = P Σ Q: A (AᵀA)^{-1/2}, with a pseudo-inverse square root so that rank-deficient stacks
  (zero blocks, s > m) give the same factor on A's range.

Float64 keeps the squared spectrum exact to ~1e-16 of σ²_max, so singular values down to ~1e-8 σ_max are resolved:
finer than the reference's float32 SVD (~1e-7 σ_max). Directions of singular values below `RELATIVE_FLOOR` σ_max
are noise in either: they become zero vectors here (the reference's are arbitrary orthonormal completions).
Tall matrices go through float64 in blocks of `ROWS` rows, so the 49408-row token embedding never exists in
float64 whole.

That holds for float32 and narrower task matrices, the ones releases hold. Float64 ones (`uses_svd`) are decomposed
by float64 SVDs instead, the reference's own algorithm: squaring their spectrum would lose half of float64's
precision (a synthetic float64 TSV-M draw differed from the reference by 3e-7 relative through Gram matrices, by
1e-13 through SVDs). Each decomposition below takes `by_svd`.
"""

from __future__ import annotations

import torch

ROWS = 1 << 13
RELATIVE_FLOOR = 1e-7


def uses_svd(dtype: torch.dtype) -> bool:
    """Whether task matrices of `dtype` are decomposed by SVDs (float64) rather than through Gram matrices."""
    return dtype == torch.float64


def _svd_polar(stack: torch.Tensor) -> torch.Tensor:
    """P Q from the thin SVD `stack = P Σ Q` (float64): the reference's polar factor."""
    p, _, q = torch.linalg.svd(stack.double(), full_matrices=False)
    return p @ q


def _rows(stack: torch.Tensor):
    """Blocks of `ROWS` rows (dim −2) of a matrix or a stack of matrices, as float64."""
    for start in range(0, stack.shape[-2], ROWS):
        yield stack[..., start:start + ROWS, :].double()


def gram(stack: torch.Tensor) -> torch.Tensor:
    """MᵀM (…×n×n, float64) of an m×n matrix or a stack of them, accumulated over row blocks."""
    out = torch.zeros(*stack.shape[:-2], stack.shape[-1], stack.shape[-1], dtype=torch.float64, device=stack.device)
    for block in _rows(stack):
        out += block.mT @ block
    return out


def _times(stack: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """stack @ right in float64, over row blocks of `stack`."""
    return torch.cat([block @ right for block in _rows(stack)], dim=-2)


def _tall_side(stack: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(the matrix or stack, or its transpose: whichever is tall, so that its Gram matrix is r×r; whether it was tall)."""
    tall = stack.shape[-2] >= stack.shape[-1]
    return (stack if tall else stack.mT), tall


def leading_triplets(stack: torch.Tensor, k: int, by_svd: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u …×m×k, σ …×k, vᵀ …×k×n) in float64: the k leading singular triplets of a matrix or of each matrix of a
    stack (one batched `eigh`), σ descending, from the r×r Gram matrices. Triplets with σ ≤ RELATIVE_FLOOR·σ_max
    are zero."""
    if by_svd:
        u, sigma, vh = torch.linalg.svd(stack.double(), full_matrices=False)
        return u[..., :k], sigma[..., :k], vh[..., :k, :]
    side, tall = _tall_side(stack)
    values, vectors = torch.linalg.eigh(gram(side))
    sigma = values.flip(-1)[..., :k].clamp(min=0).sqrt()
    right = vectors.flip(-1)[..., :k]
    floor = RELATIVE_FLOOR * sigma.amax(dim=-1, keepdim=True) if k else 0
    alive = sigma > floor
    sigma = torch.where(alive, sigma, 0)
    right = right * alive[..., None, :]
    left = _times(side, right) / torch.where(alive, sigma, 1)[..., None, :]
    return (left, sigma, right.mT) if tall else (right, sigma, left.mT)


def _inverse_sqrt(values: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """S^{+1/2} from S's eigendecomposition: eigenvalues below n·eps·λ_max count as zero."""
    floor = values.abs().max() * values.shape[-1] * torch.finfo(values.dtype).eps
    scale = torch.where(values > floor, values.clamp(min=torch.finfo(values.dtype).tiny).rsqrt(), 0)
    return (vectors * scale) @ vectors.T


def polar_columns(stack: torch.Tensor, by_svd: bool = False) -> torch.Tensor:
    """The polar factor A (AᵀA)^{+1/2} of A = `stack` (m×s, float64): orthonormal columns on A's range."""
    if by_svd:
        return _svd_polar(stack)
    return stack @ _inverse_sqrt(*torch.linalg.eigh(stack.T @ stack))


def polar_rows(stack: torch.Tensor, by_svd: bool = False) -> torch.Tensor:
    """The polar factor (BBᵀ)^{+1/2} B of B = `stack` (s×n, float64): orthonormal rows on B's row space."""
    if by_svd:
        return _svd_polar(stack)
    return _inverse_sqrt(*torch.linalg.eigh(stack @ stack.T)) @ stack


def isotropic(matrix: torch.Tensor, by_svd: bool = False) -> torch.Tensor:
    """mean(σ)·U Vᵀ of `matrix` in float64 (Iso-C: every singular value replaced by their mean, all r of them),
    from one eigendecomposition of its Gram matrix: U Vᵀ is its polar factor."""
    if by_svd:
        u, sigma, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return sigma.mean() * u @ vh
    side, tall = _tall_side(matrix)
    values, vectors = torch.linalg.eigh(gram(side))
    out = values.clamp(min=0).sqrt().mean() * _times(side, _inverse_sqrt(values, vectors))
    return out if tall else out.T
