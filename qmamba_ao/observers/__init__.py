"""Observers and fake quantizers for vision Mamba PTQ (imports torch / torch.ao only).

* QMamba's quantizers: :class:`LtSQObserver` / :class:`LtSQFakeQuantize` (long-tailed skewed
  discrete parameters ``dA``, ``dBu``) and :class:`TGQObserver` / :class:`TGQFakeQuantize`
  (hidden state ``h_t``, per temporal group; ``per_step = True``), the groups from
  :mod:`qmamba_ao.observers.grouping`.
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
from .ltsq import FrozenLtSQ, LtSQFakeQuantize, LtSQObserver, ltsq_inverse, ltsq_transform
from .tgq import FrozenTGQ, TGQFakeQuantize, TGQObserver

__all__ = [
    "LtSQObserver",
    "LtSQFakeQuantize",
    "FrozenLtSQ",
    "ltsq_transform",
    "ltsq_inverse",
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
