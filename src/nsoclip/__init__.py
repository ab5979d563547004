"""nsoclip: distributed CLIP pretraining with Noise Stability Optimization."""

__version__ = "0.1.0"
