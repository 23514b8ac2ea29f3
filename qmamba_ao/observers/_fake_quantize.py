"""The part of LtSQ's and TGQ's fake quantizers that is not about their grids.

Both wrap an observer whose qparams come from a search over everything observed (a transform
search, a grouping DP), too costly to redo at every step. So the quantizer keeps its own copy of
the qparams in buffers, marks it stale whenever the observer records, and refreshes it (``_sync``)
only when the copy is about to be used: before a fake-quantized forward, when the observer is
turned off, when the state is saved and in :meth:`~SyncingFakeQuantize.to_frozen`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from ._base import resize_buffers_on_load

__all__ = ["SyncingFakeQuantize", "attach_observer"]


def attach_observer(
    fq: torch.nn.Module,
    observer: Any,
    expected: type,
    quant_min: Optional[int],
    quant_max: Optional[int],
    observer_kwargs: dict,
) -> Any:
    """Build a fake quantizer's observer the way torch.ao's FakeQuantize does, and mirror its range.

    Sets ``fq.activation_post_process`` and ``quant_min`` / ``quant_max`` / ``dtype`` / ``qscheme``
    / ``is_dynamic`` on the fake quantizer; returns the observer.
    """
    if (quant_min is None) != (quant_max is None):
        raise ValueError("give both quant_min and quant_max, or neither")
    if quant_min is not None:
        observer_kwargs.update(quant_min=quant_min, quant_max=quant_max)
    obs = observer(**observer_kwargs)
    if not isinstance(obs, expected):
        article = "an" if expected.__name__[0] in "AEFHILMNORSX" else "a"  # "an LtSQObserver", "a TGQObserver"
        raise TypeError(f"{type(fq).__name__} needs {article} {expected.__name__}; got {type(obs)}")
    fq.activation_post_process = obs
    fq.quant_min, fq.quant_max = obs.quant_min, obs.quant_max
    fq.dtype, fq.qscheme, fq.is_dynamic = obs.dtype, obs.qscheme, False
    return obs


class SyncingFakeQuantize(FakeQuantizeBase):
    """torch.ao-style fake quantizer whose ``scale`` / ``zero_point`` buffers lag its observer.

    Subclasses name their observer class (``observer_class``), copy the observer's current choice
    into their buffers in :meth:`_pull_qparams` and build their fixed quantizer in
    :meth:`_frozen`. Buffers listed in ``_resizable`` are resized to a loaded state_dict's shapes.
    """

    observer_class: ClassVar[type]
    _resizable: ClassVar[tuple[str, ...]] = ()

    scale: Tensor
    zero_point: Tensor

    def __init__(
        self,
        observer: Any,
        quant_min: Optional[int],
        quant_max: Optional[int],
        is_dynamic: bool,
        observer_kwargs: dict[str, Any],
    ) -> None:
        super().__init__()
        observer_kwargs["is_dynamic"] = is_dynamic
        attach_observer(self, observer, self.observer_class, quant_min, quant_max, observer_kwargs)
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))
        self._stale = False

    @property
    def site_name(self) -> Optional[str]:
        return self.activation_post_process.site_name

    @site_name.setter
    def site_name(self, value: Optional[str]) -> None:
        self.activation_post_process.site_name = value

    def calculate_qparams(self) -> Any:  # type: ignore[override]
        return self.activation_post_process.calculate_qparams()

    def _pull_qparams(self) -> None:
        """Copy the observer's current qparams into this module's buffers."""
        raise NotImplementedError

    def _frozen(self) -> nn.Module:
        """The fixed quantizer for the qparams in this module's buffers."""
        raise NotImplementedError

    def _observe(self, *args: Any) -> None:
        self.activation_post_process(*args)
        self._stale = True

    def _sync(self) -> None:
        """Refresh the buffers if the observer has recorded since the last refresh."""
        if self._stale:
            self._pull_qparams()
            self._stale = False

    def enable_observer(self, enabled: bool = True) -> None:
        if not enabled:
            self._sync()
        super().enable_observer(enabled)

    def to_frozen(self) -> nn.Module:
        self._sync()
        return self._frozen().to(self.scale.device)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        self._sync()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        self._stale = False
        resize_buffers_on_load(self, state_dict, prefix, self._resizable)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
