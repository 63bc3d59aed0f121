"""The same tiny finetune (SparseLoRA distilled from its dense self) under ``accelerate launch`` with 2
processes (DDP over gloo on CPU), ending with the same merged-sparsity guarantees."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from factories import pruned_tiny
from transformers import LlavaForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
from factories import pruned_tiny, synthetic_processor
from vlmsparse.data.datasets import SyntheticVQADataset
from vlmsparse.training.finetune import finetune

processor = synthetic_processor("llava")
model, masks = pruned_tiny("llava", "2:4", keep_dense=True)  # dense weights kept: the teacher is the model itself
data = SyntheticVQADataset(processor, num=8, seed=0)
finetune(model, data, sys.argv[1], masks=masks, processor=processor, max_steps=3, batch_size=2,
         learning_rate=2e-2, save_steps=2, distill_lambda=0.1, progress=False)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_two_processes(tmp_path):
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    # `--cpu` alone starts one process unless mpirun is set up; `--multi_gpu` on a machine without a
    # visible GPU starts N processes that join over gloo on CPU.
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(script), str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "finetune_record.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 3
    assert record["teacher"] == "self" and all(e["kl"] > 0 for e in record["losses"])
    assert record["mask_check"]["ok"] and record["sparsity_after"]["all"] == pytest.approx(0.5)
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoint-2").glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    _, masks = pruned_tiny("llava", "2:4")
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out" / "merged").state_dict()
    for name, mask in masks.items():
        assert int((merged[name + ".weight"][~mask] != 0).sum()) == 0, name
    original = pruned_tiny("llava", "2:4")[0].state_dict()
    name = next(iter(masks)) + ".weight"
    assert not torch.equal(merged[name], original[name])
