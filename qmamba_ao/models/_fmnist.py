"""Fashion-MNIST input statistics, shared by the models' pretrained configs and the data loaders.

A model trained on inputs normalised with these values must be evaluated with exactly the same
ones, so they are defined in one place.
"""

from __future__ import annotations

__all__ = ["FMNIST_MEAN", "FMNIST_STD"]

#: Per-channel statistics of the Fashion-MNIST training images (pixel values scaled to [0, 1]).
FMNIST_MEAN: tuple[float, ...] = (0.2860,)
FMNIST_STD: tuple[float, ...] = (0.3530,)
