"""Synthetic scan tensors with the shapes and distributions the QMamba sites see, and MSE helpers.

Run ``python tests/observers/observer_synth.py`` to print the site-error table the quantitative
tests assert on.

* ``dA = exp(delta * A)`` with ``delta = softplus(N(-4, 1.5))`` and ``A = -exp(log(1..N))``: mass
  piled near 1, long tail towards 0.
* ``dBu = delta * B * u`` with B, u Student-t (3 dof): signed, heavy-tailed.
* hidden states whose range changes strongly with t (decay, random walk, a real recurrence with
  bursty input).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Quantizer = Callable[[Tensor], Tensor]


def student_t(shape: tuple[int, ...], df: int, g: torch.Generator) -> Tensor:
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((df, *shape), generator=g).pow(2).sum(0)
    return z / (chi2 / df).sqrt()


def scan_params(seed: int, b: int = 4, d: int = 64, length: int = 64, n: int = 16) -> tuple[Tensor, Tensor]:
    """``(dA, dBu)`` of shape ``(b, d, L, N)`` (time on axis 2), as the scan's hooks see them."""
    g = torch.Generator().manual_seed(seed)
    delta = F.softplus(torch.randn(b, d, length, generator=g) * 1.5 - 4.0)
    A = -torch.exp(torch.log(torch.arange(1, n + 1, dtype=torch.float32))).expand(d, n)
    dA = torch.exp(delta[..., None] * A[None, :, None, :])
    B = student_t((b, 1, length, n), 3, g)
    u = student_t((b, d, length), 3, g)
    dBu = delta[..., None] * B * u[..., None]
    return dA, dBu


def hidden_states(kind: str, seed: int, b: int = 4, d: int = 32, length: int = 96, n: int = 16) -> Tensor:
    """Stacked hidden states ``(b, d, L, N)`` whose range varies strongly along t.

    The time profile depends only on ``kind`` (it is a property of the model); ``seed`` draws the
    values, so calibration and evaluation sets share the profile but not the samples.
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float32)
    if kind == "decay":
        profile = torch.exp(-t / 20.0)
        return profile[None, None, :, None] * torch.randn(b, d, length, n, generator=g)
    if kind == "random_walk":
        pg = torch.Generator().manual_seed(1234)
        profile = torch.exp(torch.cumsum(torch.randn(length, generator=pg) * 0.3, 0))
        return profile[None, None, :, None] * torch.randn(b, d, length, n, generator=g)
    if kind == "recurrence":
        # a real scan: quiet start, a loud burst of tokens in the middle, decay afterwards
        pg = torch.Generator().manual_seed(4321)
        loud = torch.ones(length)
        loud[length // 3 : length // 3 + 8] = 12.0
        loud = loud * torch.exp(torch.randn(length, generator=pg) * 0.2)
        delta = F.softplus(torch.randn(b, d, length, generator=g) * 1.0 - 3.0)
        A = -torch.arange(1, n + 1, dtype=torch.float32).expand(d, n)
        Bm = torch.randn(b, 1, length, n, generator=g)
        u = torch.randn(b, d, length, generator=g) * loud
        h = torch.zeros(b, d, n)
        states = []
        for i in range(length):
            h = torch.exp(delta[:, :, i, None] * A) * h + delta[:, :, i, None] * Bm[:, :, i] * u[:, :, i, None]
            states.append(h)
        return torch.stack(states, dim=2)
    raise ValueError(kind)


def mse(quantize: Quantizer, x: Tensor) -> float:
    return float((quantize(x) - x).double().pow(2).mean())


def calibrate(obs: torch.nn.Module, batches: list) -> torch.nn.Module:
    for x in batches:
        obs(x)
    return obs


def calibrate_steps(obs: torch.nn.Module, h: Tensor) -> torch.nn.Module:
    """Feed a stacked ``(b, d, L, N)`` sequence step by step, as the scan does."""
    for t, h_t in enumerate(h.unbind(2)):
        obs(h_t, t)
    return obs


def apply_steps(frozen: torch.nn.Module, h: Tensor) -> Tensor:
    return torch.stack([frozen(h_t, t) for t, h_t in enumerate(h.unbind(2))], dim=2)


def site_errors(bits: int = 4) -> dict:
    """MSE of each quantizer on a held-out draw of dA / dBu, calibrated on two other draws."""
    from torch.ao.quantization import MinMaxObserver

    from qmamba_ao.observers import Log2Observer, LtSQObserver, MSEObserver, PercentileObserver
    from qmamba_ao.observers.affine import FrozenAffineQuant

    class AoMinMax(MinMaxObserver):
        def to_frozen(self) -> torch.nn.Module:
            return FrozenAffineQuant(*self.calculate_qparams(), self.quant_min, self.quant_max)

    makers = {
        "minmax": lambda: AoMinMax(quant_min=0, quant_max=(1 << bits) - 1),
        "percentile99.99": lambda: PercentileObserver(99.99, bits=bits),
        "percentile99.9_tails": lambda: PercentileObserver(99.9, mode="tails", bits=bits),
        "mse_clip": lambda: MSEObserver(bits=bits),
        "log2": lambda: Log2Observer(bits=bits),
        "log2_complement": lambda: Log2Observer(complement=True, bits=bits),
        "ltsq_uniform_only": lambda: LtSQObserver(bits=bits, families=("power",), gammas=(1.0,)),
        "ltsq_power_only": lambda: LtSQObserver(bits=bits, families=("power",)),
        "ltsq": lambda: LtSQObserver(bits=bits),
    }
    calib = [scan_params(s) for s in (0, 1)]
    test = scan_params(7)
    results: dict = {}
    for idx, site in enumerate(("dA", "dBu")):
        batches = [c[idx] for c in calib]
        row: dict = {}
        for name, make in makers.items():
            obs = calibrate(make(), batches)
            row[name] = mse(obs.to_frozen(), test[idx])
            if name == "ltsq":
                p = obs.transform_params()
                row["ltsq_choice"] = f"{p['kind']}(p={p['param']:.3g},clip={p['clip_ratio']})"
        results[site] = row
    return results


def tgq_errors(bits: int = 4, kinds: tuple = ("decay", "random_walk", "recurrence"), clip: str = "mse") -> dict:
    """MSE of per-tensor min/max vs TGQ (uniform / range groups) on held-out hidden states."""
    from torch.ao.quantization import MinMaxObserver

    from qmamba_ao.observers import TGQObserver
    from qmamba_ao.observers.affine import FrozenAffineQuant

    qmax = (1 << bits) - 1
    results: dict = {}
    for kind in kinds:
        calib, test = hidden_states(kind, 0), hidden_states(kind, 1)
        mm = MinMaxObserver(quant_min=0, quant_max=qmax)
        mm(calib)
        row = {"per_tensor_minmax": mse(FrozenAffineQuant(*mm.calculate_qparams(), 0, qmax), test)}
        for groups in (4, 8):
            for grouping in ("uniform", "range"):
                obs = calibrate_steps(TGQObserver(groups, grouping, bits=bits, clip=clip), calib)
                frozen = obs.to_frozen()
                row[f"tgq{groups}_{grouping}"] = mse(lambda h, f=frozen: apply_steps(f, h), test)
        results[kind] = row
    return results


def _fmt(v: object) -> str:
    return f"{v:.3e}" if isinstance(v, float) and not math.isnan(v) else str(v)


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny ops: threads only add overhead on a small shared CPU
    for bits in (4, 8):
        print(f"== dA / dBu, {bits} bits (MSE on held-out draw) ==")
        for site, row in site_errors(bits).items():
            print(site, "  ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
    for bits in (4, 8):
        print(f"== h, {bits} bits (MSE on held-out draw) ==")
        for kind, row in tgq_errors(bits).items():
            print(kind, "  ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
