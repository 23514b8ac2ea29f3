"""Selective-scan core: the functional, its hooks and the leaf modules."""

from .functional import (
    DEFAULT_H_FEEDBACK,
    INPUT_SITES,
    INTERNAL_SITES,
    SITES,
    ScanHooks,
    selective_scan,
    selective_scan_ref,
)
from .modules import SelectiveScan, is_float_scan

__all__ = [
    "SelectiveScan",
    "is_float_scan",
    "ScanHooks",
    "selective_scan",
    "selective_scan_ref",
    "SITES",
    "INPUT_SITES",
    "INTERNAL_SITES",
    "DEFAULT_H_FEEDBACK",
]
