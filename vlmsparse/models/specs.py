"""Architecture specs: which blocks of a Hugging Face model form its vision, connector and language parts.

This module is the ONLY place in vlmsparse that names Hugging Face classes or attribute paths.

A model is described by an :class:`ArchSpec`: an ordered tuple of :class:`StageSpec` (the order of the
forward pass: vision encoder, connector, language model). A stage is a ``ModuleList`` of blocks that run one
after the other (or one single module, like LLaVA's projector); the pruning pipeline calibrates it block by
block. Attribute paths are given as candidates (transformers 4 and 5 lay models out differently); the first
one that exists on the model is used.

Part names of parameters / modules (``part_of``) work on names as they appear in ``named_modules()`` and in
state dicts of both layouts, e.g. ``model.language_model.layers.0.self_attn.q_proj`` (transformers 5) and
``language_model.model.layers.0.self_attn.q_proj.weight`` (LLaVA-1.5 checkpoints).

To add an architecture: write its :class:`ArchSpec` below (stages with attribute paths, part prefixes of the
canonical names, the class to load it with) and add it to ``_SPECS``. A model without one goes through
:func:`structural_spec`, which finds the block lists from the module tree (and logs what it found).

How images reach the calibration forward: the batch is the processor's output, passed to the model as it is
(``model(**batch)``), so every extra input goes through: ``pixel_values`` plus ``image_sizes`` (LLaVA-NeXT /
OneVision), ``image_grid_thw`` and ``mm_token_type_ids`` (Qwen2-VL / Qwen2.5-VL: ``pixel_values`` are the
patches of all images, ``[patches, dim]``), ``pixel_attention_mask`` (Idefics3 / SmolVLM), ``token_type_ids``
(PaliGemma), ``aspect_ratio_ids`` / ``aspect_ratio_mask`` / ``cross_attention_mask`` (Mllama).
``ArchSpec.image_inputs`` names the ones a batch with ``pixel_values`` must have.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, replace

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "PARTS",
    "StageSpec",
    "ArchSpec",
    "ResolvedStage",
    "get_arch_spec",
    "spec_for_model_type",
    "supported_model_types",
    "part_of",
    "prunable_linear_names",
    "model_class_for",
    "linear_modules",
    "structural_spec",
    "supported_architectures",
    "supported_table",
]

PARTS = ("vision", "connector", "language")
# the inputs of a language model run alone on a text-only calibration batch (ArchSpec.text_model)
TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "decoder_input_ids",
               "decoder_attention_mask")


@dataclass(frozen=True)
class StageSpec:
    """A run of blocks calibrated one after the other.

    ``paths``: candidate attribute paths (first existing wins) to a ``ModuleList`` of blocks, or to one module
    when ``single`` is true. ``mask_key``: the model-input key whose ``[batch, seq]`` mask marks real tokens
    at this stage (``None``: every position is real, e.g. image patches). ``reuse_kwargs``: the keyword
    arguments block 0 receives are valid for every block (False for T5, whose blocks pass a position bias on,
    and Qwen2.5-VL's vision tower, whose full-attention blocks get other ``cu_seqlens`` than its window ones;
    :meth:`ArchSpec.resolve` also turns it off when the blocks differ in kind: sliding-window and full-attention
    layers of Gemma 2 / 3 or Qwen2 get their own masks and rotary embeddings).
    ``context_masks``: pairs (block forward argument holding another sequence the block attends to, e.g. the
    encoder output read by cross-attention; model-input key of that sequence's ``[batch, seq]`` mask, or None
    when it has no padding): linears whose input is that argument skip its padding with this mask instead of
    ``mask_key``'s.
    ``masked_tail``: None when ``mask_key``'s mask covers the whole sequence. A tuple when the stage's sequence
    is positions without padding (InstructBLIP's query tokens) followed by the sequence ``mask_key`` describes
    (the instruction); the block-relative linear names in the tuple read only that tail (the text FFN).
    ``default``: pruned by default.
    """

    part: str
    paths: tuple[str, ...]
    single: bool = False
    mask_key: str | None = None
    reuse_kwargs: bool = True
    context_masks: tuple[tuple[str, str | None], ...] = ()
    masked_tail: tuple[str, ...] | None = None
    default: bool = True

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise ValueError(f"StageSpec.part must be one of {PARTS}, got {self.part!r}")
        if not self.paths:
            raise ValueError("StageSpec.paths must name at least one attribute path")
        if any(not (isinstance(c, tuple) and len(c) == 2 and isinstance(c[0], str) and isinstance(c[1], (str, type(None))))
               for c in self.context_masks):
            raise ValueError(f"StageSpec.context_masks must hold (argument, mask key or None) pairs, got "
                             f"{self.context_masks!r}")
        if self.masked_tail is not None and not self.mask_key:
            raise ValueError("StageSpec.masked_tail needs a mask_key (the mask of the tail sequence)")


@dataclass(frozen=True)
class ResolvedStage:
    """A :class:`StageSpec` resolved on a model: its path and blocks."""

    spec: StageSpec
    path: str
    blocks: tuple[nn.Module, ...]
    block_names: tuple[str, ...]

    @property
    def part(self) -> str:
        return self.spec.part


def _canonical(name: str) -> str:
    """A module / parameter name without its ``model`` segments (layouts of transformers 4 and 5 agree then)."""
    return ".".join(seg for seg in name.split(".") if seg != "model")


@dataclass(frozen=True)
class ArchSpec:
    """How one architecture is laid out.

    ``part_prefixes``: part -> first segments of canonical names (see :func:`_canonical`) that belong to it;
    ``fallback_part``: the part of every other name (``language`` for plain causal LMs, else ``None``).
    ``image_tokens``: how calibration inputs carry the image (``"llava"``: one token per patch,
    ``"query"``: one token per Q-Former query, ``"model"``: the model's own forward checks the count of image
    tokens against its image features (transformers 5 raises on a mismatch), ``None``: no image).
    ``image_inputs``: model-input keys a batch with ``pixel_values`` also needs (Qwen2-VL's ``image_grid_thw``,
    LLaVA-NeXT's ``image_sizes``, Mllama's ``aspect_ratio_ids``).
    ``flat_images``: ``pixel_values`` hold the patches of all images of a batch concatenated, ``[patches, dim]``,
    with no batch dimension (Qwen2-VL): batches of examples concatenate them instead of stacking.
    ``text_model``: candidate attribute paths (first existing wins) of the language model that a calibration
    batch without ``pixel_values`` runs alone, for a model whose own forward needs an image (BLIP-2 and
    InstructBLIP: text calibration of the language part); empty: such a batch goes to the model's forward.
    ``found``: for a spec built by :func:`structural_spec`, what it found where (else None).
    ``part_prefixes`` may hold dotted prefixes (``visual.merger``); the longest match wins.
    """

    name: str
    model_types: tuple[str, ...]
    model_class: str
    stages: tuple[StageSpec, ...]
    part_prefixes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    fallback_part: str | None = None
    image_tokens: str | None = None
    required_inputs: tuple[str, ...] = ()
    image_inputs: tuple[str, ...] = ()
    flat_images: bool = False
    text_model: tuple[str, ...] = ()
    found: str | None = None

    def part_of(self, name: str) -> str | None:
        """``vision`` / ``connector`` / ``language`` for a module or parameter name, ``None`` if unknown."""
        canonical = _canonical(name)
        best, best_len = self.fallback_part, -1
        for part, prefixes in self.part_prefixes.items():
            for prefix in prefixes:
                if (canonical == prefix or canonical.startswith(prefix + ".")) and len(prefix) > best_len:
                    best, best_len = part, len(prefix)
        return best

    def describe(self, model: nn.Module) -> str:
        """Which blocks of ``model`` each stage is, e.g. ``vision: model.visual.blocks (2 blocks); ...``."""
        rows = []
        for stage in self.resolve(model):
            what = stage.path if stage.spec.single else f"{stage.path} ({len(stage.blocks)} blocks)"
            rows.append(f"{stage.part}: {what}")
        return "; ".join(rows)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in PARTS if any(s.part == p for s in self.stages))

    def resolve(self, model: nn.Module) -> list[ResolvedStage]:
        """Resolve every stage's attribute path on ``model`` (stages whose path is absent are skipped,
        e.g. the encoder stage of a decoder-only language model)."""
        stages = []
        for spec in self.stages:
            for path in spec.paths:
                module = _get_path(model, path)
                if module is None:
                    continue
                if spec.single:
                    stages.append(ResolvedStage(spec, path, (module,), (path,)))
                else:
                    if not isinstance(module, nn.ModuleList):
                        raise ValueError(f"{self.name}: {path} is a {type(module).__name__}, expected a ModuleList")
                    names = tuple(f"{path}.{i}" for i in range(len(module)))
                    resolved = spec
                    if spec.reuse_kwargs and len({_block_kind(b) for b in module}) > 1:
                        resolved = replace(spec, reuse_kwargs=False)  # each block's own arguments
                    stages.append(ResolvedStage(resolved, path, tuple(module), names))
                break
        if not stages:
            raise ValueError(
                f"{self.name}: none of the block paths {[s.paths for s in self.stages]} exist on "
                f"{type(model).__name__}; is this transformers version laid out differently?"
            )
        return stages

    def calibration_call(self, model: nn.Module, batch: dict) -> tuple[nn.Module, dict]:
        """The module a calibration batch runs through and its inputs: ``model`` and ``batch``, or for a batch
        without ``pixel_values`` on a spec with ``text_model``, that language model alone and the batch's text
        inputs (:data:`TEXT_INPUTS`): what the model's language part would read without an image."""
        if "pixel_values" in batch or not self.text_model:
            return model, dict(batch)
        for path in self.text_model:
            language = _get_path(model, path)
            if language is not None:
                return language, {k: v for k, v in batch.items() if k in TEXT_INPUTS}
        raise ValueError(f"{self.name}: none of the language model paths {list(self.text_model)} exist on "
                         f"{type(model).__name__}; is this transformers version laid out differently?")

    def check_inputs(self, model: nn.Module, batch: dict) -> None:
        """Raise ``ValueError`` when a calibration batch cannot show the model its image."""
        missing = [key for key in self.required_inputs if key not in batch]
        if "pixel_values" in batch:
            missing += [key for key in self.image_inputs if key not in batch]
        if missing:
            raise ValueError(f"{self.name} calibration inputs need {', '.join(missing)} (build them with its processor)")
        if decoder_start_token_id(model) is not None and "decoder_input_ids" not in batch:
            raise ValueError(
                f"{self.name} has an encoder-decoder language model: calibration inputs need decoder_input_ids "
                "(build_calibration_batches(..., decoder_start_token_id=text_config.decoder_start_token_id))"
            )
        if self.image_tokens is None:
            return
        config = model.config
        token = getattr(config, "image_token_index", None)
        if token is None:
            token = getattr(config, "image_token_id", None)
        ids = batch.get("input_ids")
        if ids is None or token is None:
            return
        count = int((ids == token).sum())
        if "pixel_values" not in batch:
            if count:
                raise ValueError(f"{self.name}: calibration input_ids hold {count} image tokens (id {token}) but the "
                                 "batch has no pixel_values; pass the images' pixel_values, or text without image "
                                 "tokens")
            return
        if self.image_tokens == "model":  # the model's forward checks image tokens against image features
            return
        images = int(batch["pixel_values"].shape[0])
        if self.image_tokens == "query":
            if count == 0:
                raise ValueError(
                    f"{self.name}: calibration input_ids hold no image tokens (id {token}); the model would ignore "
                    "the image. Build inputs with the model's processor (it inserts num_query_tokens image tokens)"
                )
            expected = images * int(config.num_query_tokens)
        else:
            vision = config.vision_config
            expected_per = (vision.image_size // vision.patch_size) ** 2
            if getattr(config, "vision_feature_select_strategy", "default") == "full":
                expected_per += 1
            expected = images * expected_per
        if count != expected:
            raise ValueError(
                f"{self.name}: calibration batch has {count} image tokens (id {token}) for {images} images; "
                f"expected {expected} ({expected // max(images, 1)} per image). Build inputs with the model's processor"
            )


_KIND_ATTRIBUTES = ("layer_type", "attention_type", "is_sliding", "sliding_window")


def _block_kind(block: nn.Module) -> tuple:
    """What tells blocks of one list apart in the arguments the model gives them: the class and the attention
    kind of its submodules (``layer_type``: ``sliding_attention`` / ``full_attention`` in transformers 5)."""
    kinds = {(a, str(getattr(m, a))) for m in block.modules() for a in _KIND_ATTRIBUTES if hasattr(m, a)}
    return type(block).__name__, tuple(sorted(kinds))


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for attr in path.split("."):
        module = getattr(module, attr, None)
        if module is None or not isinstance(module, nn.Module):
            return None
    return module


_LLAVA = ArchSpec(
    name="LLaVA",
    model_types=("llava",),
    model_class="LlavaForConditionalGeneration",
    stages=(
        StageSpec("vision", ("model.vision_tower.encoder.layers", "model.vision_tower.vision_model.encoder.layers",
                             "vision_tower.vision_model.encoder.layers", "vision_tower.encoder.layers")),
        StageSpec("connector", ("model.multi_modal_projector", "multi_modal_projector"), single=True, default=False),
        StageSpec("language", ("model.language_model.layers", "language_model.model.layers",
                               "language_model.layers"), mask_key="attention_mask"),
    ),
    part_prefixes={"vision": ("vision_tower",), "connector": ("multi_modal_projector",),
                   "language": ("language_model", "lm_head")},
    image_tokens="llava",
)

_BLIP_VISION = StageSpec("vision", ("vision_model.encoder.layers", "model.vision_model.encoder.layers"))
_BLIP_CONNECTOR = (
    StageSpec("connector", ("qformer.encoder.layer", "model.qformer.encoder.layer"), default=False),
    StageSpec("connector", ("language_projection", "model.language_projection"), single=True, default=False),
)
_BLIP_LANGUAGE = (
    # OPT
    StageSpec("language", ("language_model.model.decoder.layers", "model.language_model.decoder.layers",
                           "language_model.decoder.layers"), mask_key="attention_mask"),
    # Llama (InstructBLIP-Vicuna)
    StageSpec("language", ("language_model.model.layers", "model.language_model.layers", "language_model.layers"),
              mask_key="attention_mask"),
    # Flan-T5: encoder then decoder
    StageSpec("language", ("language_model.encoder.block", "model.language_model.encoder.block"),
              mask_key="attention_mask", reuse_kwargs=False),
    StageSpec("language", ("language_model.decoder.block", "model.language_model.decoder.block"),
              mask_key="decoder_attention_mask", reuse_kwargs=False,
              context_masks=(("encoder_hidden_states", "attention_mask"),)),  # cross-attention k / v
)
# BLIP-2's / InstructBLIP's forward needs pixel_values: a text batch runs the language model alone
_BLIP_TEXT_MODEL = ("language_model", "model.language_model")
_BLIP_PREFIXES = {"vision": ("vision_model",), "connector": ("qformer", "query_tokens", "language_projection"),
                  "language": ("language_model",)}

_BLIP2 = ArchSpec(
    name="BLIP-2",
    model_types=("blip-2",),
    model_class="Blip2ForConditionalGeneration",
    stages=(_BLIP_VISION, *_BLIP_CONNECTOR, *_BLIP_LANGUAGE),
    part_prefixes=_BLIP_PREFIXES,
    image_tokens="query",
    text_model=_BLIP_TEXT_MODEL,
)

# InstructBLIP's Q-Former reads [query tokens; instruction tokens]: the instruction's padding is skipped, the
# text FFN (intermediate / output) reads the instruction alone, cross-attention k / v the (unpadded) image.
_INSTRUCTBLIP_QFORMER = StageSpec(
    "connector", ("qformer.encoder.layer", "model.qformer.encoder.layer"), default=False,
    mask_key="qformer_attention_mask", masked_tail=("intermediate.dense", "output.dense"),
    context_masks=(("encoder_hidden_states", None),),
)

_INSTRUCTBLIP = ArchSpec(
    name="InstructBLIP",
    model_types=("instructblip",),
    model_class="InstructBlipForConditionalGeneration",
    stages=(_BLIP_VISION, _INSTRUCTBLIP_QFORMER, _BLIP_CONNECTOR[1], *_BLIP_LANGUAGE),
    part_prefixes=_BLIP_PREFIXES,
    image_tokens="query",
    image_inputs=("qformer_input_ids",),  # with an image; a text batch runs the language model alone
    text_model=_BLIP_TEXT_MODEL,
)

_LLAMA = ArchSpec(
    name="Llama (language only)",
    model_types=("llama",),
    model_class="LlamaForCausalLM",
    stages=(StageSpec("language", ("model.layers", "layers"), mask_key="attention_mask"),),
    fallback_part="language",
)

_OPT = ArchSpec(
    name="OPT (language only)",
    model_types=("opt",),
    model_class="OPTForCausalLM",
    stages=(StageSpec("language", ("model.decoder.layers", "decoder.layers"), mask_key="attention_mask"),),
    fallback_part="language",
)


def _causal_lm(name: str, model_types: tuple[str, ...], model_class: str) -> ArchSpec:
    """A decoder-only language model laid out as Llama: ``model.layers`` of decoder blocks."""
    return ArchSpec(
        name=f"{name} (language only)",
        model_types=model_types,
        model_class=model_class,
        stages=(StageSpec("language", ("model.layers", "layers"), mask_key="attention_mask"),),
        fallback_part="language",
    )


_QWEN2 = _causal_lm("Qwen2", ("qwen2",), "Qwen2ForCausalLM")
_QWEN3 = _causal_lm("Qwen3", ("qwen3",), "Qwen3ForCausalLM")
_MISTRAL = _causal_lm("Mistral", ("mistral",), "MistralForCausalLM")
_GEMMA = _causal_lm("Gemma", ("gemma",), "GemmaForCausalLM")
_GEMMA2 = _causal_lm("Gemma 2", ("gemma2",), "Gemma2ForCausalLM")
_GEMMA3_TEXT = _causal_lm("Gemma 3 text", ("gemma3_text",), "Gemma3ForCausalLM")
_PHI3 = _causal_lm("Phi-3", ("phi3",), "Phi3ForCausalLM")

# VLMs laid out as transformers 5's LLaVA: model.vision_tower / model.multi_modal_projector / model.language_model
_LLAVA_STAGES = _LLAVA.stages
_LLAVA_PREFIXES = {"vision": ("vision_tower",), "connector": ("multi_modal_projector", "image_newline"),
                   "language": ("language_model", "lm_head")}


def _llava_like(name: str, model_type: str, model_class: str, image_inputs: tuple[str, ...] = ()) -> ArchSpec:
    return ArchSpec(name=name, model_types=(model_type,), model_class=model_class, stages=_LLAVA_STAGES,
                    part_prefixes=_LLAVA_PREFIXES, image_tokens="model", image_inputs=image_inputs)


_LLAVA_NEXT = _llava_like("LLaVA-NeXT", "llava_next", "LlavaNextForConditionalGeneration", ("image_sizes",))
_LLAVA_ONEVISION = _llava_like("LLaVA-OneVision", "llava_onevision", "LlavaOnevisionForConditionalGeneration",
                               ("image_sizes",))
_PALIGEMMA = _llava_like("PaliGemma", "paligemma", "PaliGemmaForConditionalGeneration")
_GEMMA3 = _llava_like("Gemma 3", "gemma3", "Gemma3ForConditionalGeneration")

# Qwen2-VL / Qwen2.5-VL: vision blocks read [patches, dim] (no batch dimension); the patch merger ends the tower.
_QWEN_VL_STAGES = (
    StageSpec("vision", ("model.visual.blocks", "visual.blocks"), reuse_kwargs=False),  # window / full blocks
    StageSpec("connector", ("model.visual.merger", "visual.merger"), single=True, default=False),
    StageSpec("language", ("model.language_model.layers", "model.layers"), mask_key="attention_mask"),
)
_QWEN_VL_PREFIXES = {"vision": ("visual",), "connector": ("visual.merger",), "language": ("language_model", "lm_head")}


def _qwen_vl(name: str, model_type: str, model_class: str) -> ArchSpec:
    return ArchSpec(name=name, model_types=(model_type,), model_class=model_class, stages=_QWEN_VL_STAGES,
                    part_prefixes=_QWEN_VL_PREFIXES, image_tokens="model", image_inputs=("image_grid_thw",),
                    flat_images=True)


_QWEN2_VL = _qwen_vl("Qwen2-VL", "qwen2_vl", "Qwen2VLForConditionalGeneration")
_QWEN2_5_VL = _qwen_vl("Qwen2.5-VL", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")

# Idefics3 / SmolVLM: model.vision_model / model.connector (pixel shuffle + linear) / model.text_model
_IDEFICS3_STAGES = (
    StageSpec("vision", ("model.vision_model.encoder.layers", "vision_model.encoder.layers")),
    StageSpec("connector", ("model.connector", "connector"), single=True, default=False),
    StageSpec("language", ("model.text_model.layers", "text_model.layers"), mask_key="attention_mask"),
)
_IDEFICS3_PREFIXES = {"vision": ("vision_model",), "connector": ("connector",), "language": ("text_model", "lm_head")}
_IDEFICS3 = ArchSpec(name="Idefics3", model_types=("idefics3",), model_class="Idefics3ForConditionalGeneration",
                     stages=_IDEFICS3_STAGES, part_prefixes=_IDEFICS3_PREFIXES, image_tokens="model")
_SMOLVLM = ArchSpec(name="SmolVLM", model_types=("smolvlm",), model_class="SmolVLMForConditionalGeneration",
                    stages=_IDEFICS3_STAGES, part_prefixes=_IDEFICS3_PREFIXES, image_tokens="model")

# Mllama (Llama 3.2 Vision): a local then a global vision transformer, a projector, and language blocks of which
# some are cross-attention blocks reading the projected image (no padding there).
_MLLAMA = ArchSpec(
    name="Mllama",
    model_types=("mllama",),
    model_class="MllamaForConditionalGeneration",
    stages=(
        StageSpec("vision", ("model.vision_model.transformer.layers", "vision_model.transformer.layers")),
        StageSpec("vision", ("model.vision_model.global_transformer.layers",
                             "vision_model.global_transformer.layers")),
        StageSpec("connector", ("model.multi_modal_projector", "multi_modal_projector"), single=True, default=False),
        # each block's own arguments (self- and cross-attention blocks differ): the capture sees which blocks the
        # forward calls, and a text batch without pixel_values skips the cross-attention ones, as the forward does
        StageSpec("language", ("model.language_model.layers", "language_model.model.layers",
                               "language_model.layers"), mask_key="attention_mask", reuse_kwargs=False,
                  context_masks=(("cross_attention_states", None),)),
    ),
    part_prefixes={"vision": ("vision_model",), "connector": ("multi_modal_projector",),
                   "language": ("language_model", "lm_head")},
    image_tokens="model",
    image_inputs=("aspect_ratio_ids", "aspect_ratio_mask"),
)

_SPECS = (_LLAVA, _BLIP2, _INSTRUCTBLIP, _LLAMA, _OPT, _LLAVA_NEXT, _LLAVA_ONEVISION, _QWEN2_VL, _QWEN2_5_VL,
          _IDEFICS3, _SMOLVLM, _PALIGEMMA, _GEMMA3, _MLLAMA, _QWEN2, _QWEN3, _MISTRAL, _GEMMA, _GEMMA2, _GEMMA3_TEXT,
          _PHI3)
_BY_TYPE = {t: spec for spec in _SPECS for t in spec.model_types}


def decoder_start_token_id(model: nn.Module) -> int | None:
    """The decoder start token when the model's language model is an encoder-decoder (Flan-T5 in BLIP-2 /
    InstructBLIP, or a T5 alone), None for a decoder-only one; ValueError when the config lacks it."""
    text_config = getattr(model.config, "text_config", model.config)
    if not getattr(text_config, "is_encoder_decoder", False):
        return None
    start = getattr(text_config, "decoder_start_token_id", None)
    if start is None:
        raise ValueError(f"{type(model).__name__}: the encoder-decoder language model's config has no "
                         "decoder_start_token_id; set it (T5: the pad id, 0)")
    return int(start)


def vision_image_size(model: nn.Module, default: int = 336) -> int:
    """The image size the vision tower takes (``config.vision_config.image_size``); ``default`` when the model has
    no vision config (a language model) or it names no size."""
    return int(getattr(getattr(model.config, "vision_config", None), "image_size", default))


def supported_model_types() -> tuple[str, ...]:
    """The ``model_type`` values with an explicit spec (any other decoder-only LM or VLM goes through
    :func:`structural_spec`)."""
    return tuple(_BY_TYPE)


def supported_architectures() -> list[dict[str, str]]:
    """One row per explicit spec: ``name``, ``model_types``, ``model_class``, ``parts`` (comma-separated)."""
    return [{"name": s.name, "model_types": ", ".join(s.model_types), "model_class": s.model_class,
             "parts": ", ".join(s.parts)} for s in _SPECS]


def supported_table() -> str:
    """The supported architectures as a Markdown table (README's "Supported architectures" is this text)."""
    lines = ["| architecture | `model_type` | class | parts |", "|---|---|---|---|"]
    for row in supported_architectures():
        types = ", ".join(f"`{t}`" for t in row["model_types"].split(", "))
        lines.append(f"| {row['name']} | {types} | `{row['model_class']}` | {row['parts']} |")
    lines.append("| any other decoder-only LM (`*ForCausalLM`) or VLM with a `vision_config` | any | any | found "
                 "structurally (`structural_spec`) |")
    return "\n".join(lines)


def _unsupported(model_type: object, reason: str = "") -> ValueError:
    return ValueError(
        f"unsupported architecture {model_type!r}{reason}; supported model_type values: {', '.join(_BY_TYPE)}, and "
        "any decoder-only LM or VLM transformers can build from its model_type (found structurally). To add one, "
        "write an ArchSpec in vlmsparse/models/specs.py (stages with attribute paths, part prefixes) and register "
        "it in _SPECS"
    )


# ------------------------------------------------------------------------------------- structural fallback
_VISION_WORDS = ("vision", "visual", "image", "vit")
_LANGUAGE_WORDS = ("language_model", "text_model", "llm", "decoder")
_logged: set[str] = set()


def _block_lists(root: nn.Module, prefix: str) -> list[tuple[str, nn.ModuleList]]:
    """Outermost ``ModuleList`` s under ``root`` whose entries are blocks: modules (not linears themselves) that
    each hold an ``nn.Linear``; the classes may differ (Mllama mixes self- and cross-attention blocks). Lists
    inside such a list (e.g. MoE experts inside decoder blocks) are not listed."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in root.named_modules(prefix=prefix):
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(isinstance(b, nn.Linear) or not any(isinstance(m, nn.Linear) for m in b.modules()) for b in module):
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        found.append((name, module))
    return found


def _longest(lists: list[tuple[str, nn.ModuleList]]) -> str | None:
    return max(lists, key=lambda item: len(item[1]))[0] if lists else None


def _describe_lists(lists: list[tuple[str, nn.ModuleList]]) -> str:
    return ", ".join(f"{n} ({len(m)} x {type(m[0]).__name__})" for n, m in lists) or "none"


def structural_spec(model: nn.Module) -> ArchSpec:
    """A spec found from the module tree of ``model`` (the fallback for architectures without an explicit spec).

    - No ``config.vision_config`` (a decoder-only LM, e.g. any ``*ForCausalLM``): the language blocks are the
      longest list of blocks (a ``ModuleList`` of modules that hold linears); every name is language.
    - With a ``vision_config`` (a ``*ForConditionalGeneration`` VLM): among the children of the base model
      (``model.model``), the vision tower is the first holding a block list with a word ``vision`` / ``visual``
      / ``image`` / ``vit`` in its name (``vision_tower``, ``visual``, ``image_encoder``), the language model the
      one named like ``language_model`` / ``text_model`` (else the other child with the longest block list), and
      the connector every other child with parameters (the projector) but the output head; the vision and
      language blocks are the longest block list inside each.

    ``ValueError`` saying what was looked for and what was found when a part cannot be found.
    """
    config = getattr(model, "config", None)
    cls = type(model).__name__
    model_type = str(getattr(config, "model_type", cls))
    if getattr(config, "is_encoder_decoder", False):
        raise _unsupported(model_type, f" ({cls}): no explicit spec, and an encoder-decoder model; the structural "
                           "fallback handles decoder-only LMs and VLMs with a vision tower only")
    if getattr(config, "vision_config", None) is None:
        lists = _block_lists(model, "")
        path = _longest(lists)
        if path is None:
            raise _unsupported(model_type, f" ({cls}): no explicit spec, and the structural fallback found no list "
                               "of decoder blocks (a ModuleList of modules holding nn.Linear layers) in it")
        found = f"language: {path} ({len(_get_path(model, path))} blocks)"
        spec = ArchSpec(name=f"{cls} (structural)", model_types=(model_type,), model_class=cls,
                        stages=(StageSpec("language", (path,), mask_key="attention_mask", reuse_kwargs=False),),
                        fallback_part="language", found=found)
    else:
        spec = _structural_vlm(model, cls, model_type)
    if cls not in _logged:
        _logged.add(cls)
        log.info("%s has no explicit spec; found structurally: %s", cls, spec.found)
    return spec


def _structural_vlm(model: nn.Module, cls: str, model_type: str) -> ArchSpec:
    base_name = "model" if isinstance(getattr(model, "model", None), nn.Module) else ""
    base = model.model if base_name else model
    children = [(f"{base_name}.{n}" if base_name else n, n, c) for n, c in base.named_children()]
    lists = {path: _block_lists(child, path) for path, _, child in children}
    seen = "; ".join(f"{path}: {_describe_lists(lists[path])}" for path, _, _ in children)
    vision = next((c for c in children if set(c[1].lower().split("_")) & set(_VISION_WORDS) and lists[c[0]]), None)
    if vision is None:
        raise _unsupported(model_type, f" ({cls}): no explicit spec; the structural fallback looked for a vision "
                           f"tower (a child of {base_name or 'the model'} named with a word {' / '.join(_VISION_WORDS)} "
                           f"holding a list of blocks) and found the children {seen or 'none'}")
    rest = [c for c in children if c is not vision and lists[c[0]]]
    language = next((c for c in rest if any(w in c[1].lower() for w in _LANGUAGE_WORDS)), None)
    if language is None and rest:
        language = max(rest, key=lambda c: len(_get_path(model, _longest(lists[c[0]]))))
    if language is None:
        raise _unsupported(model_type, f" ({cls}): no explicit spec; the structural fallback found the vision "
                           f"tower {vision[0]} but no language model (a child named like "
                           f"{' / '.join(_LANGUAGE_WORDS)} or another child holding a list of decoder blocks); "
                           f"children: {seen}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    connectors = [c for c in children if c is not vision and c is not language and c[2] is not head
                  and any(True for _ in c[2].parameters()) and not isinstance(c[2], nn.Embedding)]
    vision_path, language_path = _longest(lists[vision[0]]), _longest(lists[language[0]])
    # an unknown model may give each block its own arguments: capture them per block
    stages = [StageSpec("vision", (vision_path,), reuse_kwargs=False)]
    stages += [StageSpec("connector", (c[0],), single=True, default=False) for c in connectors]
    stages.append(StageSpec("language", (language_path,), mask_key="attention_mask", reuse_kwargs=False))
    found = "; ".join([f"vision: {vision_path} ({len(_get_path(model, vision_path))} blocks)"]
                      + [f"connector: {c[0]}" for c in connectors]
                      + [f"language: {language_path} ({len(_get_path(model, language_path))} blocks)"])
    prefixes = {"vision": (_canonical(vision[0]),), "connector": tuple(_canonical(c[0]) for c in connectors),
                "language": (_canonical(language[0]), "lm_head")}
    return ArchSpec(name=f"{cls} (structural)", model_types=(model_type,), model_class=cls, stages=tuple(stages),
                    part_prefixes=prefixes, image_tokens="model", found=found)


def _auto_class_name(model_type: str) -> str | None:
    """The transformers class its auto mappings give ``model_type`` (image-text-to-text first, then causal LM)."""
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        return None
    for mapping in (modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
                    modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        name = mapping.get(model_type)
        if isinstance(name, (tuple, list)):
            name = name[0]
        if name:
            return name
    return None


@functools.lru_cache(maxsize=64)
def _structural_for_type(model_type: str) -> ArchSpec:
    """:func:`structural_spec` of the model transformers builds for ``model_type``'s default config, on the meta
    device (no memory, no weights); for names on disk (``inspect``) without a loaded model."""
    import transformers

    name = _auto_class_name(model_type)
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise _unsupported(model_type)
    try:
        config = transformers.AutoConfig.for_model(model_type)
        with torch.device("meta"):
            model = cls(config)
    except Exception as error:  # noqa: BLE001 -- any failure to build it means: not supported
        raise _unsupported(model_type, f" (building {name} to find its parts failed: {error})") from None
    return structural_spec(model)


def spec_for_model_type(model_type: str) -> ArchSpec:
    """The spec of a ``config.json`` ``model_type``: the explicit one, else the structural one of the class
    transformers builds for it; ``ValueError`` naming the supported ones otherwise."""
    spec = _BY_TYPE.get(model_type)
    if spec is None:
        if not isinstance(model_type, str):
            raise _unsupported(model_type)
        return _structural_for_type(model_type)
    return spec


def get_arch_spec(model: nn.Module) -> ArchSpec:
    """The spec of a loaded Hugging Face model: the explicit one of ``model.config.model_type`` when there is one,
    else the one :func:`structural_spec` finds."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ValueError(
            f"{type(model).__name__} has no config.model_type; supported: Hugging Face models "
            f"({', '.join(_BY_TYPE)}, or any decoder-only LM / VLM found structurally)"
        )
    spec = _BY_TYPE.get(model_type)
    if spec is not None:
        return spec
    return structural_spec(model)


def part_of(param_or_module_name: str, model_type: str) -> str | None:
    """``"vision"`` / ``"connector"`` / ``"language"`` / ``None`` for a parameter or module name of a model of
    ``model_type`` (as in config.json), in either state-dict layout. ``ValueError`` for unknown model types."""
    return spec_for_model_type(model_type).part_of(param_or_module_name)


def model_class_for(model_type: str):
    """The transformers class that loads a saved model of ``model_type`` (the explicit spec's, else the one
    transformers' auto mappings name for it)."""
    import transformers

    spec = _BY_TYPE.get(model_type)
    name = spec.model_class if spec is not None else _auto_class_name(model_type)
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise _unsupported(model_type)
    return cls


def prunable_linear_names(
    model: nn.Module, parts: tuple[str, ...] | list[str] | str | None = None, include_non_default: bool = False
) -> list[str]:
    """Names (as in ``model.named_modules()``) of the ``nn.Linear`` layers inside the blocks of ``parts``.

    ``parts=None``: every part the architecture has. By default only stages pruned by default are listed
    (vision and language blocks); ``include_non_default=True`` adds the connector (projector / Q-Former).
    Order: the model's forward order.
    """
    spec = get_arch_spec(model)
    if parts is None:
        parts = spec.parts
    elif isinstance(parts, str):
        parts = (parts,)
    for p in parts:
        if p not in PARTS:
            raise ValueError(f"parts: unknown part {p!r}; allowed: {PARTS}")
    names: list[str] = []
    for stage in spec.resolve(model):
        if stage.part not in parts:
            continue
        if not stage.spec.default and not include_non_default:
            continue
        for block_name, block in zip(stage.block_names, stage.blocks):
            for sub, module in block.named_modules():
                if isinstance(module, nn.Linear):
                    names.append(f"{block_name}.{sub}" if sub else block_name)
    return names


def linear_modules(model: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    """``name -> module`` for ``names`` (``KeyError`` naming a missing one)."""
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise KeyError(f"{name!r} is not an nn.Linear of {type(model).__name__}")
        out[name] = module
    return out
