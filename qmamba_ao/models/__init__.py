"""Model definitions; importing this package registers them with timm."""

from .vim import BiMambaMixer, Block, RMSNorm, VisionMamba, checkpoint_filter_fn

__all__ = ["BiMambaMixer", "Block", "RMSNorm", "VisionMamba", "checkpoint_filter_fn"]
