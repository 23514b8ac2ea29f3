"""Observers and fake quantizers for vision Mamba PTQ (imports torch / torch.ao only).

* QMamba's quantizers: :class:`LtSQObserver` / :class:`LtSQFakeQuantize` (long-tailed skewed
  discrete parameters ``dA``, ``dBu``; a searched transform, or with ``form="log2"`` the paper's
  log2 grids, frozen as :class:`FrozenLtSQ` / :class:`FrozenLtSQLog2`) and :class:`TGQObserver`
  / :class:`TGQFakeQuantize` (hidden state ``h_t``, per temporal group; ``per_step = True``), the
  groups from :mod:`qmamba_ao.observers.grouping`.
* Baselines: :class:`PercentileObserver`, :class:`MSEObserver`, :class:`PerTokenObserver`,
  :class:`Log2Observer`.
* Shared affine math in :mod:`qmamba_ao.observers.affine`.

Every class has ``to_frozen()``, returning the fixed quantizer module a converted model applies.
"""

from .affine import (
    FrozenAffineQuant,
    bits_of_range,
    check_bits,
    fake_quantize,
    int_range,
    qparams_from_minmax,
    resolve_quant_range,
)
from .baselines import FrozenLog2Quant, Log2Observer, MSEObserver, PercentileObserver, PerTokenObserver
from .grouping import range_groups, uniform_groups
from .ltsq import (
    FrozenLtSQ,
    FrozenLtSQLog2,
    LtSQFakeQuantize,
    LtSQObserver,
    log2_inverse,
    log2_transform,
    ltsq_inverse,
    ltsq_transform,
)
from .tgq import FrozenTGQ, TGQFakeQuantize, TGQObserver

__all__ = [
    "LtSQObserver",
    "LtSQFakeQuantize",
    "FrozenLtSQ",
    "FrozenLtSQLog2",
    "ltsq_transform",
    "ltsq_inverse",
    "log2_transform",
    "log2_inverse",
    "TGQObserver",
    "TGQFakeQuantize",
    "FrozenTGQ",
    "uniform_groups",
    "range_groups",
    "PercentileObserver",
    "MSEObserver",
    "PerTokenObserver",
    "Log2Observer",
    "FrozenLog2Quant",
    "FrozenAffineQuant",
    "check_bits",
    "int_range",
    "bits_of_range",
    "resolve_quant_range",
    "qparams_from_minmax",
    "fake_quantize",
]
