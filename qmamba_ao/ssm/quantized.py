"""Observed and quantized forms of :class:`SelectiveScan` for torch.ao's custom-module flow.

torch.ao observes the scan's inputs and output like any custom module; the internal sites
(``dA``, ``dBu``, ``h``, ``y``) and, optionally, per-site quantizers for the inputs live inside
the module as ordinary submodules. Which quantizer each site gets travels in the module's QConfig:
``qconfig.activation`` may be a :class:`ScanQuantSpec`, a callable that builds the activation
observer torch.ao asks for *and* carries one constructor per site. A plain QConfig works too; its
internal sites then get min/max observers with the activation's integer range.

Both forms subclass :class:`~qmamba_ao.ssm.SelectiveScan` and compute through its
:meth:`~qmamba_ao.ssm.SelectiveScan.run`; only the site quantizers differ. Conversion builds the
output form itself: :class:`QuantizedSelectiveScan` returns a quantized tensor (``convert_fx``),
:class:`FakeQuantizedSelectiveScan` the same values fake-quantized in float (decomposed reference graphs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.ao.quantization import MinMaxObserver
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from ..observers.affine import FrozenAffineQuant, fake_quantize, is_per_channel
from .functional import DEFAULT_H_FEEDBACK, INPUT_SITES, INTERNAL_SITES, SITES, ScanHooks
from .modules import SelectiveScan

__all__ = [
    "ScanQuantSpec",
    "ObservedSelectiveScan",
    "QuantizedSelectiveScan",
    "FakeQuantizedSelectiveScan",
    "freeze_site",
]

ObserverCtor = Callable[[], nn.Module]


class ScanQuantSpec:
    """Activation constructor for a scan's QConfig that also names one quantizer per site.

    ``activation`` builds torch.ao's observers on the module's inputs and output (torch.ao calls
    the spec like any ``with_args`` constructor). ``sites`` maps site names (see
    :data:`qmamba_ao.ssm.SITES`) to observer / fake-quant constructors; a site that is absent or
    ``None`` stays in floating point. ``h_feedback`` says whether the quantized hidden state is
    what the recurrence carries on with (default: no, it only feeds the read-out). A plain object
    of this kind survives ``prepare_fx``, ``QConfigMapping.to_dict``, deepcopy and pickle, where a
    QConfig subclass would be rebuilt.
    """

    def __init__(
        self,
        activation: ObserverCtor,
        sites: Mapping[str, Optional[ObserverCtor]],
        h_feedback: bool = DEFAULT_H_FEEDBACK,
    ) -> None:
        unknown = sorted(set(sites) - set(SITES))
        if unknown:
            raise ValueError(f"unknown scan site(s) {unknown}; valid sites are {list(SITES)}")
        self.activation = activation
        self.sites: dict[str, Optional[ObserverCtor]] = dict(sites)
        self.h_feedback = h_feedback

    def __call__(self, *args: Any, **kwargs: Any) -> nn.Module:
        return self.activation(*args, **kwargs)

    def __repr__(self) -> str:
        names = [k for k, v in self.sites.items() if v is not None]
        return f"ScanQuantSpec(sites={names}, h_feedback={self.h_feedback})"


def _default_sites(activation: ObserverCtor) -> dict[str, Optional[ObserverCtor]]:
    """Plain QConfig: min/max observers on the internal sites, in the activation's integer range."""
    probe = activation()
    kwargs = {k: getattr(probe, k) for k in ("dtype", "quant_min", "quant_max") if hasattr(probe, k)}
    ctor = MinMaxObserver.with_args(**kwargs)
    return {site: ctor for site in INTERNAL_SITES}


def _site_hook(mod: Optional[nn.Module], per_step: bool = False):
    """Adapt a site module to the hook signature; temporal quantizers take the step index."""
    if mod is None:
        return None
    if per_step:
        if getattr(mod, "per_step", False):
            return lambda h, t: mod(h, t)
        return lambda h, t: mod(h)
    return mod


def _block_hook(mod: Optional[nn.Module]):
    """The scan's ``h_block`` hook for site modules that take a block of stacked steps (through the
    module call, so forward hooks on the site see every call)."""
    if mod is None or not getattr(mod, "accepts_blocks", False):
        return None
    return lambda hs, t0: mod(hs, range(t0, t0 + hs.shape[0]))


class _ScanWithSites(SelectiveScan):
    """Shared forward of the observed and quantized scans: apply site modules around the core."""

    site_modules: nn.ModuleDict
    h_feedback: bool

    def __init__(self, scan: SelectiveScan, h_feedback: bool) -> None:
        # Not SelectiveScan.__init__: that would draw a fresh random initialisation only for the
        # subclass to replace it with ``scan``'s parameters (and move the global RNG).
        nn.Module.__init__(self)
        self.dim, self.d_state, self.delta_softplus = scan.dim, scan.d_state, scan.delta_softplus
        self.h_feedback = bool(h_feedback)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, h_feedback={self.h_feedback}"

    def _length_message(self, err: ValueError) -> str:
        """A sequence-length error with the scan's module path and the calibration input size, when known."""
        layer = getattr(self, "layer_name", None)
        shape = getattr(self, "calibration_input_shape", None)
        where = f"{layer} (its h site): " if layer else ""
        size = (
            f"; the model was calibrated on {'x'.join(map(str, shape))} inputs per image: run it at that size "
            "or quantize again with calibration images of the new size"
            if shape
            else ""
        )
        return f"{where}{err}{size}"

    def _site(self, name: str) -> Optional[nn.Module]:
        return self.site_modules[name] if name in self.site_modules else None

    def _hooks(self) -> ScanHooks:
        elementwise = [self._site(name) for name in ("dA", "dBu") if self._site(name) is not None]
        return ScanHooks(
            dA=_site_hook(self._site("dA")),
            dBu=_site_hook(self._site("dBu")),
            h=_site_hook(self._site("h"), per_step=True),
            y=_site_hook(self._site("y")),
            h_feedback=self.h_feedback,
            h_block=_block_hook(self._site("h")),
            pointwise=bool(elementwise) and all(getattr(m, "pointwise", False) for m in elementwise),
        )

    def _inputs(self, u: Tensor, delta: Tensor, B: Tensor, C: Tensor, z: Optional[Tensor]):
        values = dict(u=u, delta=delta, B=B, C=C, z=z)
        for name in INPUT_SITES:
            mod = self._site(name)
            v = values[name]
            if v is not None and v.is_quantized:
                v = v.dequantize()
            values[name] = mod(v) if (mod is not None and v is not None) else v
        return values["u"], values["delta"], values["B"], values["C"], values["z"]

    def _scan(self, u: Tensor, delta: Tensor, B: Tensor, C: Tensor, z: Optional[Tensor]) -> Tensor:
        h_site = self._site("h")
        if h_site is not None and hasattr(h_site, "check_length"):
            try:
                h_site.check_length(u.shape[-1])  # temporal quantizers know their calibrated length
            except ValueError as e:
                raise ValueError(self._length_message(e)) from None
        u, delta, B, C, z = self._inputs(u, delta, B, C, z)
        return self.run(u, delta, B, C, z, self._hooks())


class ObservedSelectiveScan(_ScanWithSites):
    """Scan that records every configured site with its own observer during calibration."""

    _FLOAT_MODULE = SelectiveScan

    def __init__(
        self,
        scan: SelectiveScan,
        sites: Mapping[str, Optional[ObserverCtor]],
        h_feedback: bool = DEFAULT_H_FEEDBACK,
    ) -> None:
        super().__init__(scan, h_feedback)
        self.A_log, self.D, self.delta_bias = scan.A_log, scan.D, scan.delta_bias  # shared with the float scan
        self.site_modules = nn.ModuleDict({k: ctor() for k, ctor in sites.items() if ctor is not None})
        for name, mod in self.site_modules.items():
            mod.site_name = name  # errors (e.g. NaN met in calibration) name their site

    @classmethod
    def from_float(cls, mod: SelectiveScan, use_precomputed_fake_quant: bool = False) -> ObservedSelectiveScan:
        qconfig = getattr(mod, "qconfig", None)
        if qconfig is None:
            raise ValueError(
                "SelectiveScan has no qconfig: give prepare_fx a QConfigMapping that covers it "
                "(e.g. qmamba_ao.get_qconfig_mapping(...) or torch.ao's get_default_qconfig_mapping())"
            )
        spec = qconfig.activation
        if isinstance(spec, ScanQuantSpec):
            sites, feedback = spec.sites, spec.h_feedback
        else:
            sites, feedback = _default_sites(spec), DEFAULT_H_FEEDBACK
        observed = cls(mod, sites, feedback)
        observed.qconfig = qconfig  # convert_fx reads it
        return observed

    def forward(self, u: Tensor, delta: Tensor, B: Tensor, C: Tensor, z: Optional[Tensor] = None) -> Tensor:
        return self._scan(u, delta, B, C, z)


def freeze_site(obs: nn.Module) -> nn.Module:
    """Turn a calibrated site observer into the fixed quantizer the converted scan applies.

    Quantizers that know better provide ``to_frozen()``; torch.ao fake-quant modules are frozen
    in place; plain torch.ao observers become a fixed affine quantizer from ``calculate_qparams()``.
    """
    if hasattr(obs, "to_frozen"):
        return obs.to_frozen()
    if isinstance(obs, FakeQuantizeBase):
        obs.disable_observer()
        obs.enable_fake_quant()
        return obs
    scale, zero_point = obs.calculate_qparams()
    per_channel = is_per_channel(getattr(obs, "qscheme", None))
    axis = int(obs.ch_axis) if per_channel else None
    return FrozenAffineQuant(scale, zero_point, obs.quant_min, obs.quant_max, axis)


class QuantizedSelectiveScan(_ScanWithSites):
    """Converted scan: frozen parameters and fixed site quantizers; quantized tensor out.

    After ``convert_fx`` the first input arrives as a quantized tensor and the following quantized
    op consumes this module's output directly, so the output is quantized with the qparams of the
    output observer that torch.ao hands over as ``activation_post_process``.
    """

    def __init__(self, observed: ObservedSelectiveScan) -> None:
        super().__init__(observed, observed.h_feedback)
        for name in ("A_log", "D", "delta_bias"):  # frozen: buffers, not parameters
            self.register_buffer(name, getattr(observed, name).detach().clone())
        self.site_modules = nn.ModuleDict({k: freeze_site(m) for k, m in observed.site_modules.items()})
        self.output_dtype: Optional[torch.dtype] = None
        out_obs = getattr(observed, "activation_post_process", None)
        if out_obs is not None:
            scale, zero_point = out_obs.calculate_qparams()
            self.register_buffer("output_scale", scale.detach().to(torch.float32).reshape(()))
            self.register_buffer("output_zero_point", zero_point.detach().to(torch.int64).reshape(()))
            self.output_dtype = out_obs.dtype
            self.output_range = (int(out_obs.quant_min), int(out_obs.quant_max))

    @classmethod
    def from_observed(cls, observed: ObservedSelectiveScan) -> QuantizedSelectiveScan:
        return cls(observed)

    def forward(self, u: Tensor, delta: Tensor, B: Tensor, C: Tensor, z: Optional[Tensor] = None) -> Tensor:
        out = self._scan(u, delta, B, C, z)
        if self.output_dtype is None:
            return out
        return self._quantize_output(out)

    def _quantize_output(self, out: Tensor) -> Tensor:
        return torch.quantize_per_tensor(out, float(self.output_scale), int(self.output_zero_point), self.output_dtype)


class FakeQuantizedSelectiveScan(QuantizedSelectiveScan):
    """Converted scan that returns its output fake-quantized in float, for decomposed reference graphs.

    torch.ao's decomposed reference conversion runs float ops between quantize/dequantize pairs on
    plain integer tensors, so a quantized tensor out of the scan would not fit; this form applies
    the output observer's pair itself (clamped to its integer range) and stays in float. Same
    parameters, sites and state_dict keys as :class:`QuantizedSelectiveScan`.
    """

    def _quantize_output(self, out: Tensor) -> Tensor:
        return fake_quantize(out, self.output_scale, self.output_zero_point, *self.output_range)
