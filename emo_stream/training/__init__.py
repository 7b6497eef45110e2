"""Training: data preparation, synthetic data, the three EMO stages (see docs/training.md)."""
