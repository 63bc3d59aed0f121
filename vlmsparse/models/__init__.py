"""Architecture specs (layer 4 of docs/ARCHITECTURE.md): the only place naming Hugging Face classes and attribute paths."""

from .specs import (
    PARTS,
    ArchSpec,
    ResolvedStage,
    StageSpec,
    decoder_start_token_id,
    get_arch_spec,
    linear_modules,
    model_class_for,
    part_of,
    prunable_linear_names,
    spec_for_model_type,
    structural_spec,
    supported_architectures,
    supported_model_types,
    supported_table,
    vision_image_size,
)

__all__ = [
    "PARTS",
    "ArchSpec",
    "ResolvedStage",
    "StageSpec",
    "decoder_start_token_id",
    "get_arch_spec",
    "linear_modules",
    "model_class_for",
    "part_of",
    "prunable_linear_names",
    "spec_for_model_type",
    "structural_spec",
    "supported_architectures",
    "supported_model_types",
    "supported_table",
    "vision_image_size",
]
