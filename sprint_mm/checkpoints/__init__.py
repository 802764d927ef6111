"""Checkpoints: file I/O (files), strict loading with a readable report (strict) and conversion between our keys
and the SPRINT, SiT and REPA layouts (layouts)."""
from sprint_mm.checkpoints.files import WRAPPER_PREFIXES, atomic_write, clean_key, read_state_dict, save_state_dict
from sprint_mm.checkpoints.layouts import (
    DENSE_LAYOUTS,
    DENSE_TO_OURS_PREFIXES,
    OURS_TO_SPRINT_PREFIXES,
    PROJECTOR_PREFIX,
    SPRINT_STACKS,
    SPRINT_TO_OURS_PREFIXES,
    STACK_KEY,
    check_depth_split,
    check_sincos_table,
    conv_patch_to_linear,
    detect_layout,
    final_rows_to_channel_major,
    from_sit_keys,
    from_sprint_keys,
    load_dense_into_sprint,
    load_sprint_checkpoint,
    split_projector,
    stack_depths,
    state_to_sprint_keys,
    to_sprint_keys,
    translate_keys,
    undo_repa_legacy_names,
    without_projector,
    wrapper_keys,
)
from sprint_mm.checkpoints.strict import (
    CheckpointMismatch, check_fits, checkpoint_mismatch, load_strict, mismatch_report, upgrade_keys,
)

__all__ = [
    "WRAPPER_PREFIXES", "atomic_write", "clean_key", "read_state_dict", "save_state_dict",
    "CheckpointMismatch", "check_fits", "checkpoint_mismatch", "load_strict", "mismatch_report", "upgrade_keys",
    "DENSE_LAYOUTS", "DENSE_TO_OURS_PREFIXES", "OURS_TO_SPRINT_PREFIXES", "PROJECTOR_PREFIX", "SPRINT_STACKS",
    "SPRINT_TO_OURS_PREFIXES", "STACK_KEY", "check_depth_split", "check_sincos_table", "conv_patch_to_linear",
    "detect_layout", "final_rows_to_channel_major", "from_sit_keys", "from_sprint_keys", "load_dense_into_sprint",
    "load_sprint_checkpoint", "split_projector", "stack_depths", "state_to_sprint_keys", "to_sprint_keys",
    "translate_keys", "undo_repa_legacy_names", "without_projector", "wrapper_keys",
]
