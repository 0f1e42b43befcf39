"""raytune_ft: fine-tune pretrained models at cluster scale on Ray, measuring what they keep."""

__version__ = "0.1.0"
