"""Sample-quality metrics: the Frechet distance (statistics and formula), the digits classifier, and
FID / Inception Score / KID through torch-fidelity."""

from ddpm.metrics.frechet import feature_stats, frechet_distance

__all__ = ["feature_stats", "frechet_distance"]
