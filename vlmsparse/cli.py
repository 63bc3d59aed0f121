"""The ``vlmsparse`` command line: argument parsing and printing only (logic lives in the library).

Each subcommand is a pair of functions ``_add_<name>(subparsers)`` and ``_run_<name>(args) -> int``,
registered in ``_COMMANDS``. Heavy imports happen inside ``_run_*`` so ``vlmsparse --help`` is fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

from . import __version__


class _LibraryChoices:
    """The allowed values of an option, read from the library on first use (``name`` in ``module``), so the one
    definition of each vocabulary is used and ``vlmsparse --help`` still imports no torch (a subcommand's
    ``--help`` and its parsing do). Give the option a ``metavar``: argparse would list the choices in it when
    the option is added."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def _values(self) -> tuple[str, ...]:
        import importlib

        return tuple(getattr(importlib.import_module(self.module), self.name))

    def __contains__(self, value: object) -> bool:
        return value in self._values()

    def __iter__(self):
        return iter(self._values())

    def __len__(self) -> int:
        return len(self._values())


PRUNE_METHODS = _LibraryChoices("vlmsparse.pruning", "METHODS")
ALLOCATIONS = _LibraryChoices("vlmsparse.pipeline.prune", "ALLOCATIONS")
SCOPES = _LibraryChoices("vlmsparse.pipeline.prune", "SCOPES")
PROPAGATIONS = _LibraryChoices("vlmsparse.pipeline.prune", "PROPAGATIONS")
FINETUNE_METHODS = _LibraryChoices("vlmsparse.pipeline.lora", "METHODS")


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


# ---------------------------------------------------------------------------------------------- inspect
def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="per-module sparsity report of a safetensors file or a Hugging Face model folder",
        description="Print, for every linear weight, its shape, sparsity and whether it is 2:4 / 4:8, "
        "with totals per model part when the architecture is known. --supported lists the architectures with "
        "an explicit spec (any other decoder-only LM or VLM with a vision tower is found structurally).",
    )
    p.add_argument("path", nargs="?", help="a .safetensors file or a model folder (model.safetensors or shards)")
    p.add_argument("--supported", action="store_true", help="list the supported architectures and exit")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--all", action="store_true", help="list every 2-D weight, not only linear layers")


def _run_inspect(args: argparse.Namespace) -> int:
    from .pipeline.inspect import inspect_checkpoint

    if args.supported:
        from .models import supported_architectures, supported_table

        if args.json:
            _print_json(supported_architectures())
        else:
            print(supported_table())
        return 0
    if args.path is None:
        raise ValueError("give a PATH (a .safetensors file or a model folder), or --supported")
    report = inspect_checkpoint(args.path, linear_only=not args.all)
    if args.json:
        _print_json(report.to_dict())
    else:
        report.print()
    return 0


def _without_hf_bars(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``run`` inside :func:`vlmsparse.pipeline.save.transformers_bars_off`."""

    def wrapped(args: argparse.Namespace) -> int:
        from .pipeline.save import transformers_bars_off

        with transformers_bars_off():
            return run(args)

    return wrapped


def _add_output(p: argparse.ArgumentParser, help_text: str) -> None:
    """The output folder of prune / finetune / compress: ``MODEL OUTPUT`` or ``MODEL -o OUTPUT``, either way in each
    (resolved by :func:`_resolve_output`)."""
    p.add_argument("output", nargs="?", default=None, help=f"{help_text}; or give it as -o OUTPUT")
    p.add_argument("-o", "--output", dest="output_option", default=None, metavar="OUTPUT", help="the output folder")
    p.set_defaults(_parser=p)


def _resolve_output(args: argparse.Namespace) -> None:
    """``args.output`` from the positional folder or ``-o``; a usage error when neither or two different ones."""
    if not hasattr(args, "output_option"):
        return
    given = [f for f in (args.output, args.output_option) if f is not None]
    if not given:
        args._parser.error(f"the output folder is required: vlmsparse {args.command} MODEL OUTPUT (or -o OUTPUT)")
    if len(set(given)) > 1:
        args._parser.error(f"two output folders given ({given[0]!r} and -o {given[1]!r}); give one")
    args.output = given[0]


# --------------------------------------------------------------------------------------------- finetune
def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="restore a pruned model with SparseLoRA / LoRA / masked full finetuning (HF Trainer)",
        description="Finetune a pruned model folder (with its sparsity_masks.safetensors) on a data set, merge, "
        "check that every pruned weight is still zero, and save the merged sparse model under OUTPUT/merged "
        "with a JSON record (OUTPUT/finetune_record.json). Runs under `accelerate launch` / `torchrun` for "
        "DDP (FSDP / DeepSpeed through accelerate configs).",
    )
    p.add_argument("model", help="pruned model folder (vlmsparse prune output)")
    p.add_argument("--data", required=True,
                   help="a .json LLaVA conversation file, a .jsonl caption file, synthetic / synthetic:N, or for "
                        "language modelling text: a .txt file, a folder of .txt files or a datasets folder, cut into "
                        "windows of --max-length tokens (default 512), every token scored")
    _add_output(p, "output folder (checkpoints, merged model, record)")
    p.add_argument("--image-root", default=None, help="folder the data's image paths are relative to (default: the data file's)")
    p.add_argument("--method", default="sparselora", choices=FINETUNE_METHODS, metavar="METHOD",
                   help="%(choices)s (default %(default)s)")
    p.add_argument("--parts", default="language,vision", help="comma-separated parts that get adapters: language,vision,connector")
    p.add_argument("--rank-language", type=int, default=8)
    p.add_argument("--rank-vision", type=int, default=4)
    p.add_argument("--rank-connector", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--lr-scheduler", default="constant", help="a transformers scheduler name (constant, linear, cosine)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--batch-size", type=int, default=4, help="per device")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--distill", type=float, default=0.0, metavar="LAMBDA",
                   help="loss = (1 - LAMBDA) * CE + LAMBDA * KL(teacher || student); 0 = no distillation; "
                   "> 0 needs --teacher")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--teacher", default=None,
                   help="with --distill: the dense model folder (the model before vlmsparse prune), or 'self' for a "
                   "folder that keeps its dense weights beside its masks (adapters and masks off)")
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    p.add_argument("--save-total-limit", type=int, default=None)
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in OUTPUT (or the given checkpoint folder)")
    p.add_argument("--masks-from-zeros", action="store_true", help="take the masks from the zeros of the weights")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--packed-base", action="store_true",
                   help="keep the frozen 2:4 weights packed while training (9/16 of the fp16 bytes, no bool mask; "
                   "sparselora only); the merged model is saved as usual")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per example: longer ones are cut; the window of a text --data (default 512)")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the run record as JSON")


def _end_distributed() -> None:
    """Destroy the process group a launcher's run created, as torch asks of a script before it exits (left to
    interpreter shutdown, a gloo worker of a non-main rank was seen to abort once in about a dozen CPU runs)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@_without_hf_bars
def _run_finetune(args: argparse.Namespace) -> int:
    from .training.config import FinetuneConfig
    from .training.finetune import finetune

    if args.distill > 0 and args.teacher is None:
        raise ValueError("--distill needs --teacher: the dense model folder the pruned model came from (--teacher "
                         "DENSE_FOLDER), or --teacher self for a folder that keeps dense weights beside its masks")
    config = FinetuneConfig(
        method=args.method, parts=tuple(p.strip() for p in args.parts.split(",") if p.strip()),
        rank_language=args.rank_language, rank_vision=args.rank_vision, rank_connector=args.rank_connector,
        lora_alpha=args.lora_alpha, learning_rate=args.lr, weight_decay=args.weight_decay,
        lr_scheduler=args.lr_scheduler, warmup_steps=args.warmup_steps, num_epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        distill_lambda=args.distill, temperature=args.temperature, teacher=args.teacher, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, max_length=args.max_length,
        save_steps=args.save_steps, save_total_limit=args.save_total_limit, logging_steps=args.logging_steps,
        num_workers=args.num_workers, progress=not args.no_progress, packed_base=args.packed_base,
    )
    record = finetune(args.model, args.data, args.output, config, masks_from_zeros=args.masks_from_zeros,
                      resume=args.resume, image_root=args.image_root)
    _end_distributed()
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch / torchrun: print once
        return 0
    if args.json:
        _print_json(record)
    else:
        check = record["mask_check"]
        loss = (f"last logged loss {record['final_loss']:.4f}" if record["final_loss"] is not None
                else f"mean loss {record['train_loss']:.4f} (no step logged: --logging-steps)")
        print(f"{record['steps']} steps in {record['train_time_s']:.1f}s, {loss}")
        print(f"sparsity {record['sparsity_before']['all']:.4f} -> {record['sparsity_after']['all']:.4f}; "
              f"masks kept: {check['ok']}")
        print(f"merged model: {record['merged_model']}")
    return 0


# ------------------------------------------------------------------------------------------------ prune
def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a Hugging Face VLM (LLaVA, BLIP-2, InstructBLIP) or causal LM folder; save it with its masks",
        description="Prune MODEL (a local Hugging Face folder) with magnitude / Wanda / SparseGPT and write the "
        "pruned model, its masks (sparsity_masks.safetensors) and its processor to OUTPUT. "
        "Examples: vlmsparse prune llava-1.5-7b out --method wanda --sparsity 0.5 ; "
        "vlmsparse prune blip2 out --method sparsegpt --vision 2:4 --language 0.7 --calibration data.jsonl ; "
        "vlmsparse prune blip2 out --sparsity 2:4 --connector 0.5 (vision and language 2:4, Q-Former 50%%)",
    )
    p.add_argument("model", help="local model folder (config.json + weights, processor files)")
    _add_output(p, "output folder (written atomically; never the input folder)")
    p.add_argument("--method", default="wanda", choices=PRUNE_METHODS, metavar="METHOD",
                   help="%(choices)s (default %(default)s)")
    p.add_argument("--sparsity", default="0.5",
                   help="pattern of the parts --allocation names: 0.5, 50%%, unstructured:0.7, 2:4, 4:8 (default 0.5)")
    p.add_argument("--allocation", default="equal", choices=ALLOCATIONS, metavar="ALLOCATION",
                   help="%(choices)s: which parts get --sparsity: equal: vision and language blocks (language alone for a "
                   "language model); language / vision: that part only; owl: equal with outlier-weighted "
                   "layer-wise sparsity, not combinable with --vision / --language / --connector (default equal)")
    p.add_argument("--vision", metavar="PATTERN",
                   help="vision blocks' pattern: replaces --sparsity for them, or adds them to --allocation "
                   "language; 0 leaves them dense")
    p.add_argument("--language", metavar="PATTERN",
                   help="language blocks' pattern: replaces --sparsity for them, or adds them to --allocation "
                   "vision; 0 leaves them dense")
    p.add_argument("--connector", metavar="PATTERN",
                   help="also prune the projector / Q-Former with this pattern (it is left dense otherwise); "
                   "the other parts keep --allocation / --sparsity")
    p.add_argument("--calibration", default="synthetic",
                   help="a .json/.jsonl file of image + text records (LLaVA conversations accepted), a folder of "
                   "images with captions, 'synthetic' (default); for a language model also text: a .txt file, a "
                   "folder of .txt files, or a Hugging Face datasets folder (save_to_disk; needs the datasets "
                   "package), cut into --nsamples random windows of --seqlen tokens (seeded by --seed)")
    p.add_argument("--image-root", help="folder the image paths of a JSON/JSONL file are relative to")
    p.add_argument("--nsamples", type=int, default=128,
                   help="calibration samples: records, or token windows of a text source (default 128)")
    p.add_argument("--seqlen", type=int, default=None,
                   help="tokens per window of a text calibration source (default: the model's "
                   "max_position_embeddings, at most 2048, as Wanda / SparseGPT)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward (default 8)")
    p.add_argument("--max-words", type=int, default=None, help="truncate captions to this many words")
    p.add_argument("--scope", default="auto", choices=SCOPES, metavar="SCOPE",
                   help="%(choices)s: magnitude/Wanda comparison group (auto: per matrix in the vision encoder, per row "
                   "elsewhere); sparsegpt selects per column block and accepts only auto")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block (default 128)")
    p.add_argument("--dampening", type=float, default=0.01, help="SparseGPT Hessian dampening (default 0.01)")
    p.add_argument("--no-error", action="store_true",
                   help="skip the reconstruction error of magnitude/Wanda (two GEMMs per layer over the first "
                   "calibration sequences; SparseGPT's comes with its Hessian, over all of them)")
    p.add_argument("--propagate", default="pruned", choices=PROPAGATIONS, metavar="FROM",
                   help="%(choices)s: the next block's calibration inputs are each block's outputs after pruning "
                   "(default, as the reference Wanda / SparseGPT: two forwards per block) or before (one forward "
                   "per block, statistics of the dense model)")
    p.add_argument("--device", default=None, help="device to prune on (default: cuda if available, else cpu)")
    p.add_argument("--offload", action="store_true",
                   help="for a model larger than the device's memory: keep the weights on the CPU and move one "
                   "block at a time to --device for calibration and pruning (peak device memory: about one block "
                   "plus activations; host memory: the whole model)")
    p.add_argument("--stream", action="store_true",
                   help="for a model larger than host memory too: build it empty, read each block's weights from the "
                   "folder's safetensors when it is pruned and write it to OUTPUT right after (host memory: about "
                   "one block plus the masks); needs checkpoint keys equal to the model's names (causal LMs)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--json", action="store_true", help="print the per-layer report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no report table")


@_without_hf_bars
def _run_prune(args: argparse.Namespace) -> int:
    """``vlmsparse prune``: one progress bar per pruned stage, none for the weight loading."""
    from .pipeline.folders import prune_folder
    from .pipeline.prune import format_report, not_pruned_of, report_of

    out, masks = prune_folder(
        args.model, args.output, method=args.method, sparsity=args.sparsity, allocation=args.allocation,
        vision=args.vision, language=args.language, connector=args.connector, calibration=args.calibration,
        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, batch_size=args.batch_size,
        max_words=args.max_words, image_root=args.image_root, scope=args.scope, blocksize=args.blocksize,
        dampening=args.dampening, report_error=not args.no_error, propagate=args.propagate, device=args.device,
        dtype=args.dtype, offload=args.offload, stream=args.stream, overwrite=args.overwrite,
        progress=not args.quiet,
    )
    if args.json:
        _print_json({"output": str(out), "sparsity": masks.sparsity(), "method": masks.method,
                     "layers": [vars(r) for r in report_of(masks)], "not_pruned": not_pruned_of(masks),
                     "error_over": masks.info.get("error_over")})
    elif not args.quiet:
        print(format_report(masks))
        print(f"saved to {out}")
    return 0


# --------------------------------------------------------------------------------------------- compress
def _add_compress(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compress",
        help="write a compact sparse checkpoint (2:4 packed, others values + bitmask), or decompress one",
        description="Save a (merged) sparse Hugging Face model folder as a compressed checkpoint: 2:4 weights as "
        "packed values + 2-bit indices, other sparse weights as values + bitmask, with config.json and the "
        "tokenizer / processor files. --auto first times each 2:4 layer shape on the device against dense and "
        "records which layers stay sparse when loaded with SparseLinear. --decompress turns a compressed "
        "folder back into a plain Hugging Face folder.",
    )
    p.add_argument("model", help="model folder (or, with --decompress, a compressed folder)")
    _add_output(p, "output folder")
    p.add_argument("--decompress", action="store_true", help="compressed folder -> dense Hugging Face folder")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (default: refuse)")
    p.add_argument("--auto", action="store_true", help="time 2:4 vs dense per layer shape; keep 2:4 where faster")
    p.add_argument("--device", default=None, help="device for --auto timing (default: cuda if available)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 512], help="input rows timed by --auto")
    p.add_argument("--min-sparsity", type=float, default=0.25,
                   help="store a non-2:4 weight as values + bitmask from this fraction of zeros on")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


@_without_hf_bars
def _run_compress(args: argparse.Namespace) -> int:
    from .pipeline.folders import compress_folder, decompress_folder
    from .pipeline.guards import check_device

    if args.decompress:
        print(f"saved dense model to {decompress_folder(args.model, args.output, overwrite=args.overwrite)}")
        return 0
    device = check_device(args.device, option="--device") if args.auto else args.device
    report = compress_folder(args.model, args.output, auto=args.auto, device=device, tokens=args.tokens,
                             min_sparsity=args.min_sparsity, overwrite=args.overwrite)
    if args.json:
        _print_json(report)
        return 0
    if report.get("plan"):
        for layer in report["plan"]["layers"]:
            print(f"{layer['name']}: {layer['backend']} ({_measured(layer)})")
    formats = ", ".join(f"{n} {k}" for k, n in sorted(report["formats"].items()))
    print(f"{report['file_bytes'] / 2**20:.2f} MiB vs {report['dense_bytes'] / 2**20:.2f} MiB dense "
          f"({100 * report['ratio']:.1f}%); tensors: {formats}")
    print(f"(compares {report['compares']})")
    print(f"saved to {report['path']}")
    return 0


def _measured(layer: dict) -> str:
    """A compress plan row's times per backend at each token count (``times_ms``), or its reason when not timed:
    ``ms at 1 / 512 tokens: dense 0.210 / 4.586, bitmask 0.118 / 6.609``."""
    times = layer.get("times_ms")
    if not times:
        return layer["reason"]
    tokens = sorted(times["dense"], key=int)
    cells = ", ".join(f"{name} " + " / ".join(f"{by_count[t]:.3f}" for t in tokens)
                      for name, by_count in times.items())
    below = f"; dense below {layer['dense_below']} tokens" if layer.get("dense_below") else ""
    return f"ms at {' / '.join(str(t) for t in tokens)} tokens: {cells}{below}"


# ------------------------------------------------------------------------------------------------- eval
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="VQA accuracy of a model folder on VQAv2 / OK-VQA / GQA files or our JSONL; or perplexity on a text",
        description="Batched greedy generation on a VQA data file, its format read from its content: our JSONL "
        "(one {\"image\", \"question\", \"answers\"} per line; images relative to the file), the official "
        "VQAv2 / OK-VQA questions JSON with --annotations (COCO images COCO_<split>_<12-digit id>.jpg; scored as the "
        "official vqaEval: normalised answers, mean over the 10 leave-one-out subsets of min(matches / 3, 1); per "
        "answer_type), or a GQA questions JSON (images <imageId>.jpg; exact match after normalisation; per "
        "structural type). With --results, the predictions are also written in the official results format "
        "(VQAv2 / OK-VQA: [{\"question_id\", \"answer\"}], GQA: [{\"questionId\", \"prediction\"}]; normalised "
        "answers) and no answers are needed: VQAv2 test-dev / test questions without --annotations and GQA test / "
        "challenge questions are answered without scoring. Or, with --text, the perplexity of the model's language "
        "model on a text file.",
    )
    p.add_argument("model", help="a model folder (dense, pruned or finetuned: Hugging Face files + processor)")
    p.add_argument("--data", default=None,
                   help="VQA data: our JSONL, a VQAv2 / OK-VQA questions JSON, or a GQA questions JSON")
    p.add_argument("--annotations", default=None,
                   help="the VQAv2 / OK-VQA annotations JSON of the --data questions (the human answers)")
    p.add_argument("--text", default=None, help="a UTF-8 text file: report perplexity instead of VQA accuracy")
    p.add_argument("--image-root", default=None,
                   help="image folder (default: the data file's; COCO / GQA images are also looked up in its "
                   "<split> / images subfolder)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=5)
    p.add_argument("--prompt", default=None, help="question prompt with {question} (default: by model family)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions (N >= 1)")
    p.add_argument("--official", action="store_true",
                   help="JSONL: the official VQAv2 leave-one-out average over the answer subsets (always used for "
                   "VQAv2 / OK-VQA files)")
    p.add_argument("--max-length", type=int, default=512,
                   help="perplexity window (tokens); capped at the language model's position limit (default 512)")
    p.add_argument("--stride", type=int, default=None,
                   help="perplexity window stride (default: the window; half of it for an encoder-decoder LM)")
    p.add_argument("-o", "--output", default=None,
                   help="write the JSON report (with every prediction, its question id and image) to this file")
    p.add_argument("--results", default=None,
                   help="write the predictions as the official results file (for the VQAv2 EvalAI server or a GQA "
                   "submission) to this JSON file; works without answers (then nothing is scored)")
    p.add_argument("--fill-questions", default=None,
                   help="with --results (VQAv2): a questions JSON whose questions not answered here are added with an "
                   "empty answer, e.g. the test2015 questions for a test-dev run (EvalAI takes the whole test2015 set)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing -o / --results file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _run_eval(args: argparse.Namespace) -> int:
    from .eval.vqa import check_results_path, evaluate_folder, write_folder_results
    from .pipeline.guards import check_output_file

    def scores(vqa) -> str:
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in vqa.per_kind.items())
        return (f"accuracy {vqa.accuracy:.4f} ({vqa.metric}), exact match {vqa.exact_match:.4f} over {vqa.num} "
                "questions" + (f" ({kinds})" if kinds else ""))

    if (args.data is None) == (args.text is None):
        raise ValueError("give exactly one of --data (VQA data file) or --text (perplexity)")
    if args.annotations is not None and args.data is None:
        raise ValueError("--annotations goes with --data (a VQAv2 / OK-VQA questions file), not with --text")
    if args.fill_questions is not None and args.results is None:
        raise ValueError("--fill-questions goes with --results (it completes the results file)")
    if args.results is not None and args.data is None:
        raise ValueError("--results goes with --data (a VQAv2 / OK-VQA or GQA questions file), not with --text")
    if args.output:
        check_output_file(args.output, [args.data, args.annotations, args.text], args.overwrite, "-o",
                          "--overwrite")
    if args.results is not None:
        check_results_path(args.results, args.overwrite, [args.data, args.annotations, args.output, args.fill_questions])
    if args.text is not None:
        from .eval.perplexity import perplexity_of_folder

        result = perplexity_of_folder(args.model, args.text, args.max_length, args.stride).to_dict()
        report = {"model": args.model, "text": args.text, **result}
        text = f"perplexity {result['perplexity']:.4f} over {result['num_tokens']} tokens"
    elif args.results is None:
        vqa = evaluate_folder(args.model, args.data, args.batch_size, args.max_new_tokens, args.prompt, args.limit,
                              args.image_root, args.official, progress=True, annotations=args.annotations)
        report = {"model": args.model, "data": args.data, "annotations": args.annotations,
                  **vqa.to_dict(with_predictions=args.output is not None)}
        text = scores(vqa)
    else:
        num, vqa = write_folder_results(args.model, args.data, args.results, args.batch_size, args.max_new_tokens,
                                        args.prompt, args.limit, args.image_root, args.official, progress=True,
                                        annotations=args.annotations, overwrite=args.overwrite,
                                        fill_from=args.fill_questions)
        report = {"model": args.model, "data": args.data, "annotations": args.annotations, "results": args.results,
                  "num": num, "scored": vqa is not None}
        text = f"wrote {num} predictions to {args.results}"
        if vqa is None:
            text += " (the data holds no answers: not scored)"
        else:
            report.update(vqa.to_dict(with_predictions=args.output is not None))
            text = scores(vqa) + "\n" + text
    if args.output:
        from ._io import atomic_write

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)

        atomic_write(args.output, write)
    if args.json:
        report.pop("predictions", None)
        _print_json(report)
    else:
        print(text)
    return 0


# ------------------------------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a small LLaVA on synthetic VQA, prune it every way, restore it, report tables and plots",
        description="End to end on a CPU: synthetic scenes -> a small LLaVA trained here (cached in --workdir) -> "
        "magnitude / Wanda / SparseGPT at 50%, 70%, 2:4 for each allocation -> Wanda 70% and 2:4 restored with "
        "lora, lora-remask, sparselora, sparselora + distillation -> tables, results.json, report.md, PNG plots.",
    )
    p.add_argument("--workdir", default=None, help="cache and output folder (default: ~/.cache/vlmsparse/demo)")
    p.add_argument("--quick", action="store_true", help="the reduced grid (about a minute on 2 CPU cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print results.json instead of the tables")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import demo_config, print_tables, run_demo, write_report

    config = demo_config(args.workdir, quick=args.quick, seed=args.seed)
    results = run_demo(config, progress=not args.no_progress)
    paths = write_report(results, config.workdir)
    if args.json:
        _print_json(results)
    else:
        print_tables(results)
        print("written: " + ", ".join(paths.values()))
    return 0


_COMMANDS: list[tuple[str, Callable, Callable]] = [
    ("inspect", _add_inspect, _run_inspect),
    ("prune", _add_prune, _run_prune),
    ("finetune", _add_finetune, _run_finetune),
    ("compress", _add_compress, _run_compress),
    ("eval", _add_eval, _run_eval),
    ("demo", _add_demo, _run_demo),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmsparse",
        description="Prune vision-language models, restore them with SparseLoRA, run 2:4 weights fast.",
    )
    parser.add_argument("--version", action="version", version=f"vlmsparse {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _, add, _ in _COMMANDS:
        add(sub)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser``'s namespace; a command with an output folder parses its own arguments intermixed, so that OUTPUT
    may follow options (``prune MODEL --method wanda OUTPUT``), as a required positional could before it became
    optional beside ``-o``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extras = parser.parse_known_args(argv)
    command_parser = getattr(args, "_parser", None)
    if command_parser is None:
        if extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return args
    rest = argv[argv.index(args.command) + 1:]  # top-level options (-v) take no values
    command_args = command_parser.parse_intermixed_args(rest)
    for name, value in vars(args).items():
        if not hasattr(command_args, name):
            setattr(command_args, name, value)
    return command_args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    _resolve_output(args)
    run = {name: run for name, _, run in _COMMANDS}[args.command]
    try:
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"vlmsparse {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
