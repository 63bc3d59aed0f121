"""benchmarks/_rows.py: the fields every benchmark row carries and the JSONL appender (issue 17)."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _rows():
    spec = importlib.util.spec_from_file_location("_rows", ROOT / "benchmarks" / "_rows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_environment_fields():
    rows = _rows()
    env = rows.environment("cpu")
    assert {"machine", "device", "torch", "triton", "cuda", "python", "commit", "dirty", "date", "host"} <= set(env)
    assert env["torch"] == torch.__version__ and env["python"] == platform.python_version()
    assert env["cuda"] is None and env["machine"] == rows.cpu_name() and env["machine"].endswith(f"x{os.cpu_count()}")
    date = datetime.datetime.fromisoformat(env["date"])
    assert date.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - date).total_seconds()) < 600
    if env["commit"] is not None:  # a checkout with git
        assert env["commit"].endswith("+dirty") == env["dirty"]
        assert len(env["commit"].removesuffix("+dirty")) >= 7
    json.dumps(env)  # a row field: JSON-serialisable
    assert rows.results_machine("cpu") == "cpu" and rows.results_machine("cpu", cpu="cpu-2core") == "cpu-2core"


def test_environment_without_git(monkeypatch):
    rows = _rows()

    def no_git(*args):
        raise OSError("no git")

    monkeypatch.setattr(rows, "_git", no_git)
    env = rows.environment("cpu")
    assert env["commit"] is None and env["dirty"] is None


def test_append_rows_appends_and_creates_the_folder(tmp_path):
    rows = _rows()
    existing = tmp_path / "rows.jsonl"
    existing.write_text(json.dumps({"old": 1}) + "\n")
    assert rows.append_rows(existing, [{"a": 1}, {"b": [2, 3]}]) == existing
    assert [json.loads(line) for line in existing.read_text().splitlines()] == [{"old": 1}, {"a": 1}, {"b": [2, 3]}]
    missing = tmp_path / "new" / "folder" / "rows.jsonl"
    rows.append_rows(str(missing), [{"c": None}])
    rows.append_rows(missing, [])
    assert missing.read_text() == '{"c": null}\n'
