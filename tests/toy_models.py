"""Small models shared by tests (imported by test files; pytest puts tests/ on sys.path)."""

import torch
from torch import nn

from qmamba_ao.ssm import SelectiveScan


def perturb(model: nn.Module, seed: int = 1, scale: float = 0.05) -> nn.Module:
    """Add seeded noise to every parameter, in place, so that no two tensors are equal.

    Default initialisations set ``D == 1``, equal ``A_log`` rows, unit norm weights and zero biases:
    a swapped or ignored parameter, or a quantizer that only works on such values, would go unnoticed.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


class TinyMixer(nn.Module):
    """Smallest model that feeds a SelectiveScan from linears, like a Mamba mixer."""

    def __init__(self, d: int = 16, d_inner: int = 32, n: int = 4) -> None:
        super().__init__()
        self.n = n
        self.in_proj = nn.Linear(d, 2 * d_inner)
        self.x_proj = nn.Linear(d_inner, 1 + 2 * n)
        self.dt_proj = nn.Linear(1, d_inner, bias=False)
        self.scan = SelectiveScan(d_inner, n)
        self.out_proj = nn.Linear(d_inner, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, z = self.in_proj(x).chunk(2, dim=-1)
        dt, B, C = torch.split(self.x_proj(u), [1, self.n, self.n], dim=-1)
        delta = self.dt_proj(dt).transpose(1, 2)
        y = self.scan(
            u.transpose(1, 2), delta, B.transpose(1, 2).unsqueeze(1), C.transpose(1, 2).unsqueeze(1), z.transpose(1, 2)
        )
        return self.out_proj(y.transpose(1, 2))
