"""``prune_model``: prune a Hugging Face VLM (or causal LM) in place, block by block (layer 5).

Flow, per stage of the model (vision blocks, connector, language blocks; see ``vlmsparse.models``):

1. capture the inputs of the stage's first block (all positional and keyword arguments, caches dropped, with
   ``use_cache=False``) by running the model on each calibration batch until it reaches that block;
2. for each block: run the calibration batches through it with hooks on its target linears that accumulate
   input statistics (linears reading the same input tensor share one ``InputStats``; padding skipped via the
   attention mask, or for linears reading another sequence such as the encoder output in cross-attention, via
   that sequence's mask: ``StageSpec.context_masks``); prune every target linear; run the batches through the
   pruned block to get the next block's inputs. Only one block's activations and statistics are resident;
   with ``offload`` they live on the CPU between uses.

With ``propagate="dense"`` the next block's inputs are the block's outputs from the statistics pass, before
pruning (one forward per block instead of two), and every stage's inputs are captured in step 1 before any stage
is pruned: every block's statistics are those of the dense model (llm-compressor's ``propagate_error=False``).

With ``device`` (an execution device, e.g. ``cuda``) the weights stay where they are (the CPU): each block is
moved to ``device`` for its statistics, pruning and outputs, then moved back (:class:`placement._Onload`; the way
SparseGPT's reference script and llm-compressor's sequential pipeline treat models larger than the GPU). During
a capture, the modules the forward reaches before the stage (embeddings, patch embeddings, the projector, the
vision blocks before a language stage) go to ``device`` when called: a block goes back when its call returns,
a module outside the blocks when the capture ends. Peak device memory: one block, its statistics and one
calibration batch's activations (plus, during a capture, the embeddings). Every move goes through
:func:`placement._place`, or, for a model built on the meta device, through a :class:`WeightSource` that reads each
module's weights when it arrives and writes a pruned block out when it leaves (:mod:`vlmsparse.pipeline.stream`).

Before any weight changes, the configuration, every target weight (NaN/inf, N:M divisibility) and every
calibration batch (image tokens) are checked. If anything fails during pruning (e.g. NaN activations), the
weights changed so far are restored and the error is raised.

Modules, each importing only those above it: ``plan`` (:class:`PruneConfig` and its vocabularies, :func:`allocation_with_parts`, the target linears per block),
``placement`` (moving tensors and weights, :class:`WeightSource`, ``_Onload``), ``capture`` (checking the
calibration batches, a stage's block inputs, running a block), ``statistics`` (a block's input statistics),
``owl`` (the OWL pre-pass), ``report`` (:class:`LayerReport`, :func:`report_of`, :func:`format_report`,
:func:`not_pruned_of`),
``driver`` (:func:`prune_model`: the order of it all, pruning a block's targets, restoring on failure).
"""

from __future__ import annotations

from .driver import prune_model
from .placement import WeightSource
from .plan import ALLOCATIONS, PROPAGATIONS, SCOPES, PruneConfig, allocation_with_parts
from .report import LayerReport, format_report, not_pruned_of, report_of

__all__ = ["PruneConfig", "LayerReport", "WeightSource", "prune_model", "report_of", "format_report", "not_pruned_of",
           "ALLOCATIONS", "SCOPES", "PROPAGATIONS", "allocation_with_parts"]
