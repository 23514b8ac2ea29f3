"""qmamba-ao: post-training quantization of vision state-space models as a torch.ao plugin."""

from .qconfig import convert_custom_config, prepare_custom_config

__version__ = "0.1.0"

__all__ = ["prepare_custom_config", "convert_custom_config", "__version__"]
