"""timm registration of a model family's entry points from one table."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Optional

from timm.models import register_model
from torch import nn

__all__ = ["ModelEntry", "register_entrypoints"]

#: ``build(variant, pretrained, arch, kwargs)``: the family's builder; ``kwargs`` override ``arch``.
Builder = Callable[[str, bool, dict[str, Any], dict[str, Any]], nn.Module]


class ModelEntry(NamedTuple):
    """One registered name: its architecture arguments, docstring, and the timm variant (with an
    optional ``.tag``) whose pretrained config it builds with; ``variant=None`` means the name itself."""

    arch: dict[str, Any]
    doc: Optional[str]
    variant: Optional[str] = None


def register_entrypoints(namespace: dict[str, Any], build: Builder, entries: Mapping[str, ModelEntry]) -> None:
    """Register with timm, in table order, an entry point ``name(pretrained=False, **kwargs)`` per
    entry, as ``@register_model`` on a ``def name`` in the module whose globals are ``namespace``
    would: timm records that module (its ``default_cfgs`` and ``__all__``), and the function is
    also bound there under its name."""
    for name, entry in entries.items():
        fn = _entrypoint(build, entry.variant or name, entry.arch)
        fn.__name__ = fn.__qualname__ = name
        fn.__doc__ = entry.doc
        fn.__module__ = namespace["__name__"]
        namespace[name] = register_model(fn)


def _entrypoint(build: Builder, variant: str, arch: dict[str, Any]) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return build(variant, pretrained, arch, kwargs)

    return entrypoint
