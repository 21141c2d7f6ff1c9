"""Hydra configuration tree of taskmerge (one folder per config group)."""
