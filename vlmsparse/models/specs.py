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
canonical names, the class to load it with) and add it to ``_SPECS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

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
]

PARTS = ("vision", "connector", "language")


@dataclass(frozen=True)
class StageSpec:
    """A run of blocks calibrated one after the other.

    ``paths``: candidate attribute paths (first existing wins) to a ``ModuleList`` of blocks, or to one module
    when ``single`` is true. ``mask_key``: the model-input key whose ``[batch, seq]`` mask marks real tokens
    at this stage (``None``: every position is real, e.g. image patches). ``reuse_kwargs``: the keyword
    arguments block 0 receives are valid for every block (False for T5, whose blocks pass a position bias on).
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
    ``"query"``: one token per Q-Former query, ``None``: no image).
    """

    name: str
    model_types: tuple[str, ...]
    model_class: str
    stages: tuple[StageSpec, ...]
    part_prefixes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    fallback_part: str | None = None
    image_tokens: str | None = None
    required_inputs: tuple[str, ...] = ()

    def part_of(self, name: str) -> str | None:
        """``vision`` / ``connector`` / ``language`` for a module or parameter name, ``None`` if unknown."""
        canonical = _canonical(name)
        first = canonical.split(".", 1)[0]
        for part, prefixes in self.part_prefixes.items():
            if first in prefixes:
                return part
        return self.fallback_part

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
                    stages.append(ResolvedStage(spec, path, tuple(module), names))
                break
        if not stages:
            raise ValueError(
                f"{self.name}: none of the block paths {[s.paths for s in self.stages]} exist on "
                f"{type(model).__name__}; is this transformers version laid out differently?"
            )
        return stages

    def check_inputs(self, model: nn.Module, batch: dict) -> None:
        """Raise ``ValueError`` when a calibration batch cannot show the model its image."""
        missing = [key for key in self.required_inputs if key not in batch]
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
_BLIP_PREFIXES = {"vision": ("vision_model",), "connector": ("qformer", "query_tokens", "language_projection"),
                  "language": ("language_model",)}

_BLIP2 = ArchSpec(
    name="BLIP-2",
    model_types=("blip-2",),
    model_class="Blip2ForConditionalGeneration",
    stages=(_BLIP_VISION, *_BLIP_CONNECTOR, *_BLIP_LANGUAGE),
    part_prefixes=_BLIP_PREFIXES,
    image_tokens="query",
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
    required_inputs=("qformer_input_ids",),
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

_SPECS = (_LLAVA, _BLIP2, _INSTRUCTBLIP, _LLAMA, _OPT)
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


def supported_model_types() -> tuple[str, ...]:
    return tuple(_BY_TYPE)


def _unsupported(model_type: object) -> ValueError:
    return ValueError(
        f"unsupported architecture {model_type!r}; supported model_type values: {', '.join(_BY_TYPE)}. "
        "To add one, write an ArchSpec in vlmsparse/models/specs.py (stages with attribute paths, part prefixes) "
        "and register it in _SPECS"
    )


def spec_for_model_type(model_type: str) -> ArchSpec:
    """The spec of a ``config.json`` ``model_type``; ``ValueError`` naming the supported ones otherwise."""
    spec = _BY_TYPE.get(model_type)
    if spec is None:
        raise _unsupported(model_type)
    return spec


def get_arch_spec(model: nn.Module) -> ArchSpec:
    """The spec of a loaded Hugging Face model (by ``model.config.model_type``)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ValueError(
            f"{type(model).__name__} has no config.model_type; supported: Hugging Face models "
            f"({', '.join(_BY_TYPE)})"
        )
    return spec_for_model_type(model_type)


def part_of(param_or_module_name: str, model_type: str) -> str | None:
    """``"vision"`` / ``"connector"`` / ``"language"`` / ``None`` for a parameter or module name of a model of
    ``model_type`` (as in config.json), in either state-dict layout. ``ValueError`` for unknown model types."""
    return spec_for_model_type(model_type).part_of(param_or_module_name)


def model_class_for(model_type: str):
    """The transformers class that loads a saved model of ``model_type``."""
    import transformers

    return getattr(transformers, spec_for_model_type(model_type).model_class)


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
