"""Selective-scan core: the functional, its hooks and the leaf modules."""

from .modules import SelectiveScan
from .scan import INPUT_SITES, INTERNAL_SITES, SITES, ScanHooks, selective_scan, selective_scan_ref

__all__ = [
    "SelectiveScan",
    "ScanHooks",
    "selective_scan",
    "selective_scan_ref",
    "SITES",
    "INPUT_SITES",
    "INTERNAL_SITES",
]
