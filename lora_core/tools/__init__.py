"""Merge, extract, resize and inspect LoRAs and checkpoints: the library behind ``python -m lora_core`` and the
WebUI tab. Every tool streams checkpoints tensor by tensor, writes to a temporary file and renames it, refuses to
replace a file unless asked, writes ``sshs_model_hash``/``sshs_legacy_hash``, and takes a ``progress`` callback.
"""
from .checkpoint import CheckpointIndex, CheckpointReader, StreamingWriter
from .common import FamiliesDifferError, LoraItem, Progress, ToolError, UsageError, parse_item
from .difference import DifferenceResult, add_difference
from .extract import ExtractResult, extract
from .inspect_cli import format_report, inspect_lora, render_block_chart
from .merge import MergeIntoResult, merge_into
from .merge_loras import MergeLorasResult, merge_loras
from .output import Saved
from .resize import ResizeResult, resize

__all__ = [
    "CheckpointIndex", "CheckpointReader", "DifferenceResult", "ExtractResult", "FamiliesDifferError", "LoraItem",
    "MergeIntoResult", "MergeLorasResult", "Progress", "ResizeResult", "Saved", "StreamingWriter", "ToolError",
    "UsageError", "add_difference", "extract", "format_report", "inspect_lora", "merge_into", "merge_loras",
    "parse_item", "render_block_chart", "resize",
]
