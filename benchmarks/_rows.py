"""What every benchmark row carries and how rows are saved: one copy for all of benchmarks/ (issue 17).

``environment(device)`` gives the fields common to every row (machine, device, versions, git commit, date, host);
a benchmark adds its own fields after them (and may override ``device`` or ``machine`` with its own wording).
``results_machine(device, cpu)`` is the machine part of a results file name and ``append_rows(path, rows)`` appends
rows to a JSONL file, one line each; ``model_bytes(model)`` is the bytes a model holds (the ``model_mb`` field).

Imported as a plain module from the benchmarks folder (``sys.path`` holds it), like ``bench_linear`` is from
``bench_e2e``. It imports neither vlmsparse nor, at import time, torch: bench_overhead's child processes import the
vlmsparse of their own PYTHONPATH.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()


def git_commit() -> tuple[str | None, bool | None]:
    """``(short commit, with "+dirty" if the tree has changes; whether it has)``, ``(None, None)`` without git."""
    try:
        commit = _git("rev-parse", "--short", "HEAD") or None
        dirty = bool(_git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return None, None
    if commit is None:
        return None, None
    return commit + ("+dirty" if dirty else ""), dirty


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name, else ``platform``) and the number of CPUs: "<model> x<n>"."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} x{os.cpu_count()}"


def _is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def environment(device=None) -> dict:
    """The fields every row carries. ``device``: a torch device or its name (default: cuda if available, else cpu).

    ``machine`` (the CPU model and count, or the GPU name), ``device`` (the GPU name, or the CPU's
    ``platform.processor()``), ``torch``, ``triton`` and ``cuda`` (None where absent), ``python``, ``commit`` (short,
    "+dirty" when the tree has changes), ``dirty``, ``date`` (UTC, ISO 8601, seconds) and ``host``.
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = _is_cuda(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit, dirty = git_commit()
    gpu = torch.cuda.get_device_name(torch.device(device)) if cuda else None
    return {
        "machine": gpu or cpu_name(),
        "device": gpu or platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "commit": commit,
        "dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
    }


def results_machine(device, cpu: str = "cpu") -> str:
    """The machine part of a results file name: the GPU's name in lower case with dashes, or ``cpu``."""
    if _is_cuda(device):
        import torch

        return torch.cuda.get_device_name(torch.device(device)).lower().replace(" ", "-")
    return cpu


def append_rows(path, rows: Iterable[dict]) -> Path:
    """Appends ``rows`` to the JSONL file ``path``, one line each, creating its folder; returns the path.

    All lines are written by one ``write`` to a file opened in append mode: another writer's lines do not land
    between them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
    return path


def model_bytes(model) -> int:
    """Bytes of the parameters and buffers a ``torch.nn.Module`` holds (each storage once): a row's ``model_mb``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())
