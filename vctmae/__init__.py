"""vctmae: raw spine CT → vertebra crops → video ViT MAE → fracture diagnosis."""

__version__ = "0.1.0"
