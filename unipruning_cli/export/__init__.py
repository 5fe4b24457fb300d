"""Shipping a pruned model: ``unipruning export`` (a run -> an HF folder) and ``unipruning apply`` (masks -> a folder)."""

from .apply import apply_masks_file, export_run
from .card import speed_note
from .commands import apply_command, export_command
from .folder import COMPRESSED_FILE, check_mask_shapes, staging_folder
from .nm import (compress_nm, decompress_nm, is_nm_sparse, load_compressed, pack_indices, to_semi_structured,
                 unpack_indices, write_compressed)
from .run import RunInfo, held_tags, open_run, resolve_target

__all__ = [
    "COMPRESSED_FILE",
    "RunInfo",
    "apply_command",
    "apply_masks_file",
    "check_mask_shapes",
    "compress_nm",
    "decompress_nm",
    "export_command",
    "export_run",
    "held_tags",
    "is_nm_sparse",
    "load_compressed",
    "open_run",
    "pack_indices",
    "resolve_target",
    "speed_note",
    "staging_folder",
    "to_semi_structured",
    "unpack_indices",
    "write_compressed",
]
