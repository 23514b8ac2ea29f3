"""The ``qmamba-ao`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from . import __version__


def _list_models(_: argparse.Namespace) -> int:
    import timm

    from . import models  # noqa: F401  (registration)

    names = [n for n in timm.list_models() if n.startswith(("vim_", "vmamba_", "vanilla_vmamba_"))]
    print("\n".join(names))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmamba-ao", description="Post-training quantization of vision state-space models (torch.ao plugin)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list the model names qmamba-ao registers with timm")
    p.set_defaults(func=_list_models)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
