"""``vlmsparse demo``: the whole pipeline on a small LLaVA trained here, end to end, on a CPU.

1. synthetic VQA scenes (coloured shapes; colour / shape / count / position / presence questions),
2. a small LLaVA trained from scratch until held-out accuracy >= the target (cached in the work dir),
3. magnitude / Wanda / SparseGPT at 50%, 70%, 2:4 for each allocation (equal, language, vision),
4. Wanda 70% and 2:4 (equal) restored with lora, lora-remask, sparselora, sparselora + distillation,
5. tables (rich), ``results.json``, ``report.md`` and PNG plots in the work dir.

Everything goes through the public API (``vlmsparse.prune_model``, ``vlmsparse.finetune``,
``vlmsparse.load_pruned``, :mod:`vlmsparse.eval`, :mod:`vlmsparse.data`): copy it for your own model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import vlmsparse
from vlmsparse._io import atomic_write, write_folder_atomically
from vlmsparse.data import synthetic
from vlmsparse.demo.pretrain import PretrainConfig, encode_vqa, pretrain
from vlmsparse.eval.vqa import VQAReport, VQARow, evaluate_vqa
from vlmsparse.pruning import METHODS

__all__ = ["DemoConfig", "demo_config", "default_workdir", "run_demo", "load_or_train", "print_tables",
           "write_report", "with_budget", "METHODS", "PATTERNS", "ALLOCATIONS", "RESTORE_METHODS"]

logger = logging.getLogger(__name__)

PATTERNS = ("0.5", "0.7", "2:4")
ALLOCATIONS = ("equal", "language", "vision")
RESTORE_METHODS = ("lora", "lora-remask", "sparselora", "sparselora+distill")
ASKED = {"0.5": 0.5, "0.7": 0.7, "2:4": 0.5}
LABEL = {"0.5": "50%", "0.7": "70%", "2:4": "2:4"}


def default_workdir() -> Path:
    """``$XDG_CACHE_HOME/vlmsparse/demo`` (default ``~/.cache/vlmsparse/demo``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "vlmsparse" / "demo"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. ``restore_patterns`` are pruned with Wanda at the ``equal`` allocation and
    restored with each of ``restore_methods``; ``distill_lambda`` weights KL(dense teacher || student)."""

    workdir: str
    quick: bool = False
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    patterns: tuple[str, ...] = PATTERNS
    allocations: tuple[str, ...] = ALLOCATIONS
    restore_patterns: tuple[str, ...] = ("0.7", "2:4")
    restore_methods: tuple[str, ...] = RESTORE_METHODS
    num_eval: int = 500
    num_calibration: int = 64
    restore_examples: int = 3000
    restore_steps: int = 150
    restore_batch: int = 16
    restore_lr: float = 3e-3
    distill_lambda: float = 0.5
    min_dense_accuracy: float = 0.85
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self) -> None:
        for name, allowed in (("methods", METHODS), ("patterns", PATTERNS), ("allocations", ALLOCATIONS),
                              ("restore_patterns", PATTERNS), ("restore_methods", RESTORE_METHODS)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad:
                raise ValueError(f"DemoConfig.{name}: unknown {bad}; allowed: {list(allowed)}")
        for name in ("num_eval", "num_calibration", "restore_examples", "restore_steps", "restore_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0.0 <= self.distill_lambda <= 1.0:
            raise ValueError(f"DemoConfig.distill_lambda must be in [0, 1], got {self.distill_lambda!r}")


def demo_config(workdir: str | os.PathLike | None = None, quick: bool = False, seed: int = 0, **overrides: Any) -> DemoConfig:
    """The full grid, or with ``quick`` the reduced one (every method and pattern for the equal and language
    allocations; Wanda 70% and 2:4 restored with lora and sparselora; fewer evaluation questions)."""
    base: dict[str, Any] = dict(workdir=str(workdir or default_workdir()), quick=quick, seed=seed,
                                pretrain=PretrainConfig(seed=seed))
    if quick:
        base.update(allocations=("equal", "language"), restore_methods=("lora", "sparselora"), num_eval=300,
                    num_calibration=32, restore_steps=100)
    base.update(overrides)
    return DemoConfig(**base)


# ------------------------------------------------------------------------------------------ the dense model
def _pretrain_key(config: PretrainConfig) -> str:
    key = {**asdict(config), "vlmsparse": vlmsparse.__version__, "data": synthetic.DATA_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def load_or_train(config: DemoConfig, progress: bool = True) -> tuple[Any, Any, dict]:
    """The dense model and processor: loaded from ``workdir/dense-<config hash>`` when cached, else trained
    (:func:`vlmsparse.demo.pretrain.pretrain`) and saved there. Returns ``(model, processor, info)``."""
    from vlmsparse.eval.vqa import load_model_folder

    folder = Path(config.workdir) / f"dense-{_pretrain_key(config.pretrain)}"
    info_path = folder / "pretrain.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        model, processor = load_model_folder(folder)
        return model, processor, {**info, "cached": True, "path": str(folder)}
    result = pretrain(config.pretrain, progress=progress)
    info = {"steps": result.steps, "train_seconds": round(result.seconds, 2),
            "first_token_heldout_accuracy": result.heldout_accuracy, "history": result.history,
            "config": result.config}

    def write(tmp: Path) -> None:
        result.model.save_pretrained(tmp)
        result.processor.save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps(info, indent=2))

    write_folder_atomically(folder, write)
    return result.model, result.processor, {**info, "cached": False, "path": str(folder)}


# ---------------------------------------------------------------------------------------------- helpers
def heldout_rows(config: DemoConfig) -> list[VQARow]:
    """The evaluation set: ``num_eval`` held-out questions (layouts never seen in training); the answer is
    given as 10 agreeing annotators, so a correct prediction scores VQA accuracy 1."""
    samples = synthetic.make_vqa_samples(config.num_eval, seed=config.seed + 1000, split="heldout",
                                         image_size=config.pretrain.image_size)
    return [VQARow(s.image, s.question, (s.answer,) * 10, s.kind, f"heldout[{i}]") for i, s in enumerate(samples)]


def calibration_batches(config: DemoConfig, processor: Any, batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    """Calibration inputs for pruning: ``num_calibration`` training-split questions with their answers."""
    samples = synthetic.make_vqa_samples(config.num_calibration, seed=config.seed + 2000, split="train",
                                         image_size=config.pretrain.image_size)
    data = encode_vqa(processor, samples)
    keys = ("input_ids", "attention_mask", "pixel_values")
    return [{k: data[k][i:i + batch_size] for k in keys} for i in range(0, len(samples), batch_size)]


def measured_sparsity(model: Any, masks: Any) -> float:
    """Fraction of exact zeros in the weights of the modules listed in ``masks`` (read from the weights)."""
    modules = dict(model.named_modules())
    zeros = total = 0
    for name in masks:
        weight = modules[name].weight
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / total if total else 0.0


def _evaluate(model: Any, processor: Any, rows: list[VQARow]) -> VQAReport:
    return evaluate_vqa(model, processor, rows, batch_size=100, max_new_tokens=2)


def _row(report: VQAReport) -> dict:
    return {"accuracy": round(report.accuracy, 4), "exact_match": round(report.exact_match, 4),
            "per_kind": {k: round(v, 4) for k, v in report.per_kind.items()}}


# ------------------------------------------------------------------------------------------------- the run
def run_demo(config: DemoConfig, progress: bool = True) -> dict:
    """Run the grid of ``config`` and return the results (also written by :func:`write_report`)."""
    from vlmsparse.pipeline.save import transformers_bars_off

    with transformers_bars_off():  # one bar per stage (ours, with progress)
        return _run_grid(config, progress)


def _run_grid(config: DemoConfig, progress: bool) -> dict:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    dense, processor, train_info = load_or_train(config, progress)
    rows = heldout_rows(config)
    dense_report = _evaluate(dense, processor, rows)
    results: dict[str, Any] = {
        "config": {**asdict(config), "pretrain": asdict(config.pretrain)},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "vlmsparse": vlmsparse.__version__},
        "dense": {**_row(dense_report), "train_steps": train_info["steps"],
                  "train_seconds": train_info["train_seconds"], "cached": train_info["cached"],
                  "parameters": sum(p.numel() for p in dense.parameters())},
        "prune": [],
        "restore": [],
    }
    if dense_report.accuracy < config.min_dense_accuracy:
        logger.warning("dense held-out accuracy %.3f is below the target %.2f", dense_report.accuracy,
                       config.min_dense_accuracy)
    calibration = calibration_batches(config, processor)
    stages = {"dense": round(time.perf_counter() - start, 2)}
    t_grid = time.perf_counter()

    grid = [(m, p, a) for a in config.allocations for p in config.patterns for m in config.methods]
    for method, pattern, allocation in tqdm(grid, desc="prune grid", disable=not progress):
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        masks = vlmsparse.prune_model(model, method=method, sparsity=pattern, allocation=allocation,
                                      calibration=calibration, progress=False)
        seconds = time.perf_counter() - t0
        report = _evaluate(model, processor, rows)
        results["prune"].append({
            "method": method, "pattern": pattern, "allocation": allocation, "asked_sparsity": ASKED[pattern],
            "measured_sparsity": round(measured_sparsity(model, masks), 6), "modules": len(masks),
            "prune_seconds": round(seconds, 3), **_row(report),
        })

    stages["prune_grid"] = round(time.perf_counter() - t_grid, 2)
    t_restore = time.perf_counter()
    restore_jobs = [(p, r) for p in config.restore_patterns for r in config.restore_methods]
    for pattern, restore in tqdm(restore_jobs, desc="restore", disable=not progress):
        results["restore"].append(_restore(config, dense, processor, calibration, rows, pattern, restore, train_info))
    stages["restore"] = round(time.perf_counter() - t_restore, 2)
    results["stage_seconds"] = stages
    results["total_seconds"] = round(time.perf_counter() - start, 2)
    return results


def _restore(config: DemoConfig, dense: Any, processor: Any, calibration: list, rows: list[VQARow],
             pattern: str, restore: str, train_info: dict) -> dict:
    from vlmsparse.data.datasets import Example, ExampleDataset

    model = copy.deepcopy(dense)
    masks = vlmsparse.prune_model(model, method="wanda", sparsity=pattern, allocation="equal",
                                  calibration=calibration, progress=False)
    before = _evaluate(model, processor, rows)
    sparsity_before = measured_sparsity(model, masks)
    method = "sparselora" if restore == "sparselora+distill" else restore
    distill = config.distill_lambda if restore == "sparselora+distill" else 0.0
    finetune_config = vlmsparse.FinetuneConfig(
        method=method, max_steps=config.restore_steps, batch_size=config.restore_batch,
        learning_rate=config.restore_lr, lr_scheduler="linear", seed=config.seed, distill_lambda=distill,
        teacher=train_info["path"] if distill > 0 else None, logging_steps=10, progress=False,
    )
    samples = synthetic.make_vqa_samples(config.restore_examples, seed=config.seed + 3000, split="train",
                                         image_size=config.pretrain.image_size)
    dataset = ExampleDataset([Example(s.image, (("human", s.question), ("gpt", s.answer))) for s in samples], processor)
    out_dir = Path(config.workdir) / "restore" / f"wanda-{pattern.replace(':', 'of')}-{restore}"
    if out_dir.exists():  # a fresh run every time (same seed -> same numbers)
        shutil.rmtree(out_dir)
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)  # adapter init: independent of the jobs before this one
    record = vlmsparse.finetune(model, dataset, out_dir, finetune_config, masks=masks, processor=processor)
    seconds = time.perf_counter() - t0
    merged, _ = vlmsparse.load_pruned(record["merged_model"])
    after = _evaluate(merged, processor, rows)
    return {
        "prune_method": "wanda", "pattern": pattern, "allocation": "equal", "restore": restore,
        "asked_sparsity": ASKED[pattern], "sparsity_before": round(sparsity_before, 6),
        "sparsity_after": round(measured_sparsity(merged, masks), 6),
        "mask_kept": bool(record["mask_check"]["ok"]), "accuracy_before": round(before.accuracy, 4),
        "steps": record["steps"], "restore_seconds": round(seconds, 2), **_row(after),
    }


# ------------------------------------------------------------------------------------------------ output
def print_tables(results: dict, console: Any = None) -> None:
    """Print the dense, prune and restore tables with rich."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped output: do not squeeze the tables to 80 columns
            console = Console(width=120)
    d = results["dense"]
    how = "cached" if d["cached"] else f"trained in {d['train_seconds']:.0f}s"
    console.print(f"[bold]dense model[/bold]: held-out VQA accuracy {d['accuracy']:.3f} "
                  f"({d['parameters']:,} parameters, {d['train_steps']} training steps, {how})")
    prune = results["prune"]
    if prune:
        methods = list(dict.fromkeys(r["method"] for r in prune))
        table = Table(title="held-out accuracy after pruning (no restoration)")
        table.add_column("allocation")
        table.add_column("pattern")
        for m in methods:
            table.add_column(m, justify="right")
        table.add_column("sparsity", justify="right")
        for (alloc, pattern) in dict.fromkeys((r["allocation"], r["pattern"]) for r in prune):
            cells = {r["method"]: r for r in prune if r["allocation"] == alloc and r["pattern"] == pattern}
            spars = next(iter(cells.values()))["measured_sparsity"]
            table.add_row(alloc, LABEL[pattern], *[f"{cells[m]['accuracy']:.3f}" if m in cells else "-" for m in methods],
                          f"{spars:.3f}")
        console.print(table)
    restore = results["restore"]
    if restore:
        table = Table(title="Wanda (equal allocation) restored: held-out accuracy and sparsity after merging")
        for col in ("pattern", "restore", "acc. pruned", "acc. restored", "sparsity asked", "sparsity after", "mask kept"):
            table.add_column(col, justify="right" if col.startswith(("acc", "spars")) else "left", no_wrap=True)
        for r in restore:
            table.add_row(LABEL[r["pattern"]], r["restore"], f"{r['accuracy_before']:.3f}", f"{r['accuracy']:.3f}",
                          f"{r['asked_sparsity']:.3f}", f"{r['sparsity_after']:.3f}", "yes" if r["mask_kept"] else "no")
        console.print(table)
    console.print(f"total {results.get('total_seconds', 0):.1f}s")


def _markdown(results: dict) -> str:
    d = results["dense"]
    lines = ["# vlmsparse demo", "",
             f"Machine: {results['machine']['platform']}, {results['machine']['cpu_count']} CPUs "
             f"({results['machine']['torch_threads']} torch threads), torch {results['machine']['torch']}. "
             f"Total {results.get('total_seconds', 0):.0f}s.", "",
             f"Dense model: held-out VQA accuracy **{d['accuracy']:.3f}** ({d['parameters']:,} parameters, "
             f"{d['train_steps']} training steps).", ""]
    prune = results["prune"]
    if prune:
        methods = list(dict.fromkeys(r["method"] for r in prune))
        lines += ["## Pruning (held-out accuracy, no restoration)", "",
                  "| allocation | pattern | " + " | ".join(methods) + " | measured sparsity |",
                  "|---|---|" + "---:|" * len(methods) + "---:|"]
        for (alloc, pattern) in dict.fromkeys((r["allocation"], r["pattern"]) for r in prune):
            cells = {r["method"]: r for r in prune if r["allocation"] == alloc and r["pattern"] == pattern}
            spars = next(iter(cells.values()))["measured_sparsity"]
            lines.append(f"| {alloc} | {LABEL[pattern]} | "
                         + " | ".join(f"{cells[m]['accuracy']:.3f}" if m in cells else "-" for m in methods)
                         + f" | {spars:.3f} |")
        lines.append("")
    if results["restore"]:
        lines += ["## Restoration of Wanda, equal allocation", "",
                  "| pattern | method | accuracy pruned | accuracy restored | sparsity asked | sparsity after merge | mask kept |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for r in results["restore"]:
            lines.append(f"| {LABEL[r['pattern']]} | {r['restore']} | {r['accuracy_before']:.3f} | {r['accuracy']:.3f} | "
                         f"{r['asked_sparsity']:.3f} | {r['sparsity_after']:.3f} | {'yes' if r['mask_kept'] else 'no'} |")
        lines.append("")
    lines += ["Plots: `accuracy_vs_sparsity.png`, `restore.png`.", ""]
    return "\n".join(lines)


def _plots(results: dict, workdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    prune = results["prune"]
    if prune:
        allocations = list(dict.fromkeys(r["allocation"] for r in prune))
        patterns = list(dict.fromkeys(r["pattern"] for r in prune))
        methods = list(dict.fromkeys(r["method"] for r in prune))
        fig, axes = plt.subplots(1, len(allocations), figsize=(4.5 * len(allocations), 3.6), squeeze=False, sharey=True)
        width = 0.8 / len(methods)
        for ax, alloc in zip(axes[0], allocations):
            for i, m in enumerate(methods):
                acc = [next((r["accuracy"] for r in prune if r["allocation"] == alloc and r["pattern"] == p
                             and r["method"] == m), float("nan")) for p in patterns]
                ax.bar([j + i * width for j in range(len(patterns))], acc, width, label=m)
            ax.axhline(results["dense"]["accuracy"], color="black", linestyle="--", linewidth=1, label="dense")
            ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(patterns))], [LABEL[p] for p in patterns])
            ax.set_title(f"allocation: {alloc}")
            ax.set_ylim(0, 1)
            ax.set_xlabel("sparsity")
        axes[0][0].set_ylabel("held-out VQA accuracy")
        fig.legend(*axes[0][-1].get_legend_handles_labels(), fontsize=8, loc="center right")
        fig.tight_layout(rect=(0, 0, 0.86, 1))
        paths.append(_save_fig(fig, workdir / "accuracy_vs_sparsity.png"))
        plt.close(fig)
    restore = results["restore"]
    if restore:
        patterns = list(dict.fromkeys(r["pattern"] for r in restore))
        methods = list(dict.fromkeys(r["restore"] for r in restore))
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        width = 0.8 / (len(methods) + 1)
        for j, p in enumerate(patterns):
            before = next(r["accuracy_before"] for r in restore if r["pattern"] == p)
            axes[0].bar(j, before, width, color="grey", label="pruned" if j == 0 else None)
            for i, m in enumerate(methods):
                r = next((r for r in restore if r["pattern"] == p and r["restore"] == m), None)
                if r is None:
                    continue
                color = f"C{i}"
                axes[0].bar(j + (i + 1) * width, r["accuracy"], width, color=color, label=m if j == 0 else None)
                axes[1].bar(j + (i + 1) * width, r["sparsity_after"], width, color=color, label=m if j == 0 else None)
            axes[1].hlines(ASKED[p], j - width / 2, j + (len(methods) + 0.5) * width, colors="black", linestyles="--")
        for ax, ylabel in zip(axes, ("held-out VQA accuracy", "sparsity after merge")):
            ax.set_xticks([j + width * len(methods) / 2 for j in range(len(patterns))], [f"Wanda {LABEL[p]}" for p in patterns])
            ax.set_ylabel(ylabel)
            ax.set_ylim(0, 1)
        axes[0].axhline(results["dense"]["accuracy"], color="black", linestyle="--", linewidth=1)
        fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="center right")
        fig.tight_layout(rect=(0, 0, 0.84, 1))
        paths.append(_save_fig(fig, workdir / "restore.png"))
        plt.close(fig)
    return paths


def _save_fig(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return path


def write_report(results: dict, workdir: str | os.PathLike) -> dict[str, str]:
    """Write ``results.json``, ``report.md`` and the PNG plots into ``workdir``; returns their paths."""
    workdir = Path(workdir)
    out = {}

    def write_text(path: Path, text: str) -> None:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    write_text(workdir / "results.json", json.dumps(results, indent=2))
    out["results"] = str(workdir / "results.json")
    write_text(workdir / "report.md", _markdown(results))
    out["report"] = str(workdir / "report.md")
    for path in _plots(results, workdir):
        out[path.stem] = str(path)
    return out


def with_budget(config: DemoConfig, **changes: Any) -> DemoConfig:
    """A copy of ``config`` with fields replaced (``pretrain`` fields may be given as ``pretrain_<name>``)."""
    pre = {k[len("pretrain_"):]: v for k, v in changes.items() if k.startswith("pretrain_")}
    rest = {k: v for k, v in changes.items() if not k.startswith("pretrain_")}
    if pre:
        rest["pretrain"] = replace(config.pretrain, **pre)
    return replace(config, **rest)
