"""What a run leaves on disk: the checkpoint (:mod:`.checkpoint`), its masks (:mod:`.masks`), the compressed-tensors
copy (:mod:`.compressed`), the llm-compressor recipe (:mod:`.recipe`) and the report schema (:mod:`.report`).

Modules import downward only: ``checkpoint`` -> ``compressed`` -> ``masks``, ``files``."""

from atprune.export.checkpoint import check_export_options, format_verify_table, save_pruned, verify_checkpoint
from atprune.export.files import check_output_dir, read_tensors, safetensors_files, write_json
from atprune.export.masks import Masks, MaskViolation, check_masks, check_saveable, mask_digest, record_masks

__all__ = ["MaskViolation", "Masks", "check_export_options", "check_masks", "check_output_dir", "check_saveable",
           "format_verify_table", "mask_digest", "read_tensors", "record_masks", "safetensors_files", "save_pruned",
           "verify_checkpoint", "write_json"]
