"""Architectures written out here, for models whose usual library (timm, torchvision) is not available."""
