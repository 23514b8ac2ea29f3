"""PT2E route: QMamba as a torchao ``Quantizer`` for ``torch.export`` -> ``prepare_pt2e`` -> ``convert_pt2e``.

The FX route (:func:`qmamba_ao.quantize`) and this one apply the same recipe with the same observer
classes; this one yields an ATen graph that ``torch.compile`` lowers (and composes with torchao's
own quantizers, e.g. ``X86InductorQuantizer`` for int8 linears).

* :class:`QMambaQuantizer` - the recipe's annotations (linears / convs, the scan's inputs and
  output, its internal sites ``dA``, ``dBu``, ``h``, ``y``).
* :func:`export_model`, :func:`quantize_pt2e` - the whole flow, with the recipe's rewrite first.
* :func:`site_qparams` - the qparams of every site of a prepared model, by site name.

Needs ``torchao`` (``pip install "qmamba-ao[pt2e]"`` or ``pip install torchao``); without it the
names above raise an ImportError saying so, and the FX route works as before.
:mod:`qmamba_ao.pt2e.scan` (the exportable scan) needs torch only.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["QMambaQuantizer", "export_model", "quantize_pt2e", "calibrate_pt2e", "site_qparams", "require_torchao"]

_LAZY = {
    "QMambaQuantizer": "quantizer",
    "export_model": "flow",
    "quantize_pt2e": "flow",
    "calibrate_pt2e": "flow",
    "site_qparams": "flow",
}

INSTALL_HINT = 'the PT2E route needs torchao: pip install "qmamba-ao[pt2e]" (or pip install torchao)'


def require_torchao() -> None:
    """Raise ImportError with the install command unless torchao's PT2E quantization imports."""
    try:
        importlib.import_module("torchao.quantization.pt2e.quantizer")
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT}; importing it failed with: {e}") from e


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        require_torchao()
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
