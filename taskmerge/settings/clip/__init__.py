"""The CLIP benchmark: open_clip image encoders, the task_vectors / TSV releases and the 20 datasets."""
