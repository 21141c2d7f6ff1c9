"""The dense setting: DUNE / DINOv2 ViT-B/14 encoders merged across ADE20k, NYUd, BEDLAM and MapFree."""
