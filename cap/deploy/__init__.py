"""Deployment: the compact plain-layer model of a trained run, its arch.json, and the export formats."""

from cap.deploy.compact import (
    CompactResNet,
    ExportError,
    build_compact,
    compact_architecture,
    compact_from_gated,
    count_macs_params,
    load_compact,
    load_run_model,
)
from cap.deploy.export import FORMATS, export

__all__ = ["FORMATS", "CompactResNet", "ExportError", "build_compact", "compact_architecture", "compact_from_gated",
           "count_macs_params", "export", "load_compact", "load_run_model"]
