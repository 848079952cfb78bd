"""Label maps and synthetic images for training, made from what the installed packages ship."""
