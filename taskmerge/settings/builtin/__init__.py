"""The built-in benchmark: four generated tasks, a small timm ViT and a zoo the framework trains itself."""
