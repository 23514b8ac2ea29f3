"""Selective-scan core: the functional, its hooks and the leaf modules."""

from .functional import (
    DEFAULT_H_FEEDBACK,
    INPUT_SITES,
    INTERNAL_SITES,
    SCAN_METHODS,
    SITES,
    ScanHooks,
    selective_scan,
    selective_scan_ref,
    set_scan_method,
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
    "SCAN_METHODS",
    "set_scan_method",
]
