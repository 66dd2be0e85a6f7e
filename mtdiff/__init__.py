"""mtdiff: MT-Diffusion (Chen et al., arXiv 2407.17571) as a reproducible DVC + Prefect + MLflow pipeline."""
__version__ = "0.1.0"
