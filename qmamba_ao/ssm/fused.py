"""Optional dispatch of the float scan to mamba-ssm's CUDA kernel.

Only :class:`~qmamba_ao.ssm.SelectiveScan`'s plain forward uses it: on CUDA tensors, when
``mamba_ssm`` can be imported and no hooks are involved (observed and quantized scans always run
the project's own loop, which is where the quantizers sit). ``mamba_ssm`` is imported on the first
CUDA call, never at import time, so CPU installs need nothing extra. Set the environment variable
``QMAMBA_AO_FUSED_SCAN=0`` or call :func:`set_fused_scan` ``(False)`` to always use the project's scan.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Optional

from torch import Tensor

__all__ = ["fused_scan_fn", "set_fused_scan"]

_enabled = os.environ.get("QMAMBA_AO_FUSED_SCAN", "1") != "0"
_kernel: Optional[Callable[..., Tensor]] = None
_import_failed = False


def set_fused_scan(enabled: bool) -> None:
    """Allow (default) or forbid the mamba-ssm kernel for float scans on CUDA."""
    global _enabled
    _enabled = bool(enabled)


def fused_scan_fn(u: Tensor) -> Optional[Callable[..., Any]]:
    """mamba-ssm's ``selective_scan_fn`` if it may run on ``u``'s device, else None."""
    global _kernel, _import_failed
    if not _enabled or _import_failed or not isinstance(u, Tensor) or not u.is_cuda:
        return None
    if _kernel is None:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        except Exception:  # not installed, or installed without a working CUDA extension
            _import_failed = True
            return None
        _kernel = selective_scan_fn
    return _kernel
