"""Model definitions; importing this package registers them with timm."""

from .vim import BiMambaMixer, Block, VisionMamba, checkpoint_filter_fn

__all__ = ["BiMambaMixer", "Block", "VisionMamba", "checkpoint_filter_fn"]
