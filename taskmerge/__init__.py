"""taskmerge: merge vision encoders fine-tuned from one base, and select the merge with the Task Alignment Proxy.

`taskmerge.load_encoder(path, encoder, **options)` is the public entry for notebooks (imported on first use, so
`import taskmerge` stays light).
"""

from typing import Any

__all__ = ["load_encoder"]


def __getattr__(name: str) -> Any:
    if name == "load_encoder":
        from taskmerge.loading import load_encoder

        return load_encoder
    raise AttributeError(f"module 'taskmerge' has no attribute {name!r}")
