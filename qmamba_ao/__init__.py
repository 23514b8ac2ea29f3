"""qmamba-ao: post-training quantization of vision state-space models as a torch.ao plugin."""

from ._utils import warm_vector_math
from .ptq import calibrate, convert, prepare, quantize
from .qconfig import convert_custom_config, prepare_custom_config
from .recipes import Recipe, describe_recipes, get_qconfig_mapping, get_recipe, list_recipes
from .reconstruct import reconstruct

warm_vector_math()  # see its docstring: torch's log1p / expm1 / softplus are slow on x86 until then

__version__ = "0.1.0"

__all__ = [
    "prepare_custom_config",
    "convert_custom_config",
    "Recipe",
    "get_recipe",
    "get_qconfig_mapping",
    "list_recipes",
    "describe_recipes",
    "quantize",
    "prepare",
    "calibrate",
    "convert",
    "reconstruct",
    "__version__",
]
