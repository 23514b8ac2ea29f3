"""The process group: rank, size, and the collectives the rest of :mod:`qmamba_ao.distributed` builds on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class DistributedError(RuntimeError):
    """A multi-process run cannot go on: a bad launch environment, or another process stopped."""

    __module__ = "qmamba_ao.distributed"  # its public home, as before the package was split


# The group
# ----------------------------------------------------------------------------------------------


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group of more than one process is initialised."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a group)."""
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 without a group)."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process prints and writes files (rank 0, or the only process)."""
    return rank() == 0


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a collective; a failure (another process stopped, a timeout) becomes a DistributedError."""
    try:
        return fn(*args, **kwargs)
    except DistributedError:
        raise
    except RuntimeError as e:  # torch.distributed's DistError and backend errors are RuntimeErrors
        raise DistributedError(
            f"process {rank()} of {world_size()}: a collective operation failed, most likely because another "
            f"process stopped with an error (see its output) or did not answer within the timeout: {e}"
        ) from None


def _all_reduce(t: Tensor, op: Any) -> Tensor:
    """``all_reduce`` of a copy of ``t`` (any device) on the communication device; returns it on ``t``'s device."""
    buf = t.detach().to(_comm_device()).clone()
    _collective(torch.distributed.all_reduce, buf, op=op)
    return buf.to(t.device)


def _all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable; tensors should be on the CPU), in rank order."""
    out: list[Any] = [None] * world_size()
    _collective(torch.distributed.all_gather_object, out, obj)
    return out


def _check_same(what: str, value: Any) -> None:
    """Raise unless ``value`` is the same on every process (guards the order of the collectives)."""
    values = _all_gather_object(value)
    if any(v != values[0] for v in values):
        differing = [r for r, v in enumerate(values) if v != values[0]]
        raise DistributedError(
            f"{what} differs between processes (processes {differing} differ from process 0); every process "
            "must build the same model with the same recipe and options"
        )
