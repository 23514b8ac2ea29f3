"""Model definitions; importing this package registers them with timm."""

from . import vmamba  # noqa: F401  (registers the VMamba timm names)
from .adapt import adapt_mamba, find_mamba_mixers
from .vim import BiMambaMixer, Block, VisionMamba, checkpoint_filter_fn

__all__ = ["adapt_mamba", "find_mamba_mixers", "BiMambaMixer", "Block", "VisionMamba", "checkpoint_filter_fn"]
