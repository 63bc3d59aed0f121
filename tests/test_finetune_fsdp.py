"""The tiny SparseLoRA finetune under FSDP2 (``fully_shard``) with 2 CPU processes over gloo, against a
single process with the same global batch (2 per step x 2 accumulation steps).

accelerate 1.15 takes its FSDP branch only for GPU-like process groups: on CPU (``MULTI_CPU``, gloo) an FSDP
config or ``TrainingArguments(fsdp=...)`` silently runs plain DDP (``accelerate/state.py``,
``AcceleratorState.__init__``). The launched script therefore switches that state to FSDP after accelerate
built it (``FORCE_FSDP`` below); everything else (``accelerate launch`` with an FSDP2 config, the Trainer's
``fully_shard`` wrapping, its sharded optimizer and FSDP checkpoints) is the stock path a GPU user runs. The
test checks that the switch was needed, so it fails once accelerate runs FSDP on CPU by itself.
"""

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

FORCE_FSDP = """
import json, os
import accelerate.state as S
from accelerate.utils import DistributedType

_init = S.AcceleratorState.__init__
_plugin = []  # the FSDP plugin of the first construction: every later one copies MULTI_CPU back in


def _init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    path = os.path.join(os.environ["PROBE_DIR"], f"state_{os.environ['RANK']}.json")
    if not os.path.exists(path):  # what accelerate itself chose, the first time
        with open(path, "w") as f:
            json.dump({"accelerate_chose": str(self.distributed_type), "plugin": fsdp_plugin is not None}, f)
    if fsdp_plugin is not None and not _plugin:
        _plugin.append(fsdp_plugin)
    if self.distributed_type == DistributedType.MULTI_CPU and _plugin:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = _plugin[0]


S.AcceleratorState.__init__ = _init_fsdp_on_cpu
"""

SCRIPT = """
import json, os, sys
import torch.distributed
from factories import pruned_tiny, synthetic_processor
from transformers import TrainerCallback
from vlmsparse.data.datasets import SyntheticVQADataset
from vlmsparse.training.finetune import finetune


class Probe(TrainerCallback):  # what the model looks like while it trains
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            name, param = next((n, p) for n, p in model.named_parameters() if n.endswith("lora_A.default.weight"))
            local = param.to_local() if hasattr(param, "to_local") else param
            with open(os.path.join(os.environ["PROBE_DIR"], f"model_{args.process_index}.json"), "w") as f:
                json.dump({"cls": type(model).__name__, "param": type(param).__name__,
                           "global": list(param.shape), "local": list(local.shape)}, f)


out, batch, accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
processor = synthetic_processor("llava")
model, masks = pruned_tiny("llava", "2:4", keep_dense=True)  # dense weights kept: the teacher is the model itself
data = SyntheticVQADataset(processor, num=8, seed=0)
finetune(model, data, out, masks=masks, processor=processor, max_steps=3, batch_size=batch, grad_accum=accum,
         learning_rate=2e-2, save_steps=2, logging_steps=1, distill_lambda=0.1, progress=False,
         resume=len(sys.argv) > 4, callbacks=[Probe()])
if torch.distributed.is_initialized():  # as torch asks of a launched script (the CLI does it too)
    torch.distributed.destroy_process_group()
# Everything this test reads is written by now. A rank of torch 2.13 + gloo on CPU sometimes aborts in the
# interpreter's own teardown ("terminate called without an active exception", SIGABRT; seen about once in a dozen
# runs, more often on a loaded machine), which would fail the launch for a reason that is not under test.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""

FSDP2_CONFIG = """
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
mixed_precision: 'no'
use_cpu: true
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer,CLIPEncoderLayer
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
"""

# fp32 on CPU: FSDP's reduce-scatter of 2 ranks and the single process's 2 accumulation steps add the same
# two per-micro-batch gradients; only the order of fp32 additions may differ (observed: bit-equal).
RTOL = 1e-6
ATOL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _record(out: Path) -> dict:
    return json.loads((out / "finetune_record.json").read_text())


def _merged(out: Path) -> dict[str, torch.Tensor]:
    return LlavaForConditionalGeneration.from_pretrained(out / "merged").state_dict()


def _setup(tmp_path: Path, config: str) -> tuple[list[str], dict]:
    """Scripts and accelerate config under ``tmp_path``: ``(accelerate launch command, environment)``."""
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    (tmp_path / "run.py").write_text(textwrap.dedent(SCRIPT))
    (tmp_path / "run_fsdp.py").write_text(textwrap.dedent(FORCE_FSDP) + textwrap.dedent(SCRIPT))
    (tmp_path / "fsdp2.yaml").write_text(config)
    (tmp_path / "probes").mkdir()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PROBE_DIR": str(tmp_path / "probes"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return [accelerate, "launch", "--config_file", str(tmp_path / "fsdp2.yaml")], env


def _checkpoint_files(checkpoint: Path) -> list[str]:
    """What a checkpoint holds; never the frozen model (the Trainer's ``pytorch_model_fsdp*`` under FSDP)."""
    return sorted(p.name for p in checkpoint.iterdir())


def _fsdp_checkpoint(optimizer: str) -> list[str]:
    """Trainable tensors, run config, optimizer (``optimizer_0/`` sharded, ``optimizer.bin`` gathered: accelerate
    follows fsdp_state_dict_type), scheduler, RNG state per rank, Trainer state."""
    return sorted([optimizer, "rng_state_0.pth", "rng_state_1.pth", "scheduler.pt", "trainable.safetensors",
                   "trainer_state.json", "vlmsparse_finetune.json"])


@pytest.mark.slow
def test_fsdp2_sharded_state_dict_checkpoints_and_resume(tmp_path):
    """accelerate's FSDP2 default (SHARDED_STATE_DICT): checkpoints still hold the full trainable tensors (each
    gathered alone, not the whole model), no model file, and resume from them ends where the run ended."""
    config = "\n".join(line for line in FSDP2_CONFIG.splitlines() if "state_dict_type" not in line)
    launch, env = _setup(tmp_path, config)
    out = tmp_path / "out"
    _run([*launch, "--main_process_port", str(_free_port()), str(tmp_path / "run_fsdp.py"), str(out), "2", "1"], env)
    checkpoint = out / "checkpoint-2"
    assert _checkpoint_files(checkpoint) == _fsdp_checkpoint("optimizer_0")
    from safetensors.torch import load_file

    trainable = load_file(checkpoint / "trainable.safetensors")
    pairs = [(n, n.replace("lora_A", "lora_B")) for n in trainable if "lora_A" in n]
    assert pairs
    for a, b in pairs:  # full tensors: each rank holds half of A's rows (the rank) and half of B's rows
        rank = 4 if "vision_tower" in a else 8  # FinetuneConfig's rank_vision / rank_language
        assert trainable[a].shape[0] == trainable[b].shape[1] == rank, (a, trainable[a].shape, trainable[b].shape)

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(checkpoint, resumed_dir / "checkpoint-2")
    _run([*launch, "--main_process_port", str(_free_port()), str(tmp_path / "run_fsdp.py"), str(resumed_dir),
          "2", "1", "resume"], env)
    resumed, first = _record(resumed_dir), _record(out)
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["steps"] == 3
    assert resumed["losses"][-1]["loss"] == pytest.approx(first["losses"][-1]["loss"], rel=RTOL)
    merged_first = _merged(out)
    for name, tensor in _merged(resumed_dir).items():
        torch.testing.assert_close(tensor, merged_first[name], rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.slow
def test_fsdp2_two_cpu_processes_match_one(tmp_path):
    launch, env = _setup(tmp_path, FSDP2_CONFIG)
    probes = tmp_path / "probes"

    _run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "one"), "2", "2"], env)
    _run([*launch, "--main_process_port", str(_free_port()), str(tmp_path / "run_fsdp.py"), str(tmp_path / "fsdp"),
          "2", "1"], env)

    # accelerate alone would have run DDP; with the switch the model trained sharded
    for rank in (0, 1):
        state = json.loads((probes / f"state_{rank}.json").read_text())
        assert state == {"accelerate_chose": "DistributedType.MULTI_CPU", "plugin": True}
        seen = json.loads((probes / f"model_{rank}.json").read_text())
        assert seen["cls"] == "FSDPLlavaForConditionalGeneration" and seen["param"] == "DTensor"
        assert seen["local"][0] * 2 == seen["global"][0]  # each rank holds half of the adapter rows

    one, fsdp = _record(tmp_path / "one"), _record(tmp_path / "fsdp")
    assert one["world_size"] == 1 and fsdp["world_size"] == 2 and fsdp["steps"] == 3
    assert [e["step"] for e in fsdp["losses"]] == [1, 2, 3]
    for a, b in zip(one["losses"], fsdp["losses"], strict=True):
        for key in ("loss", "ce", "kl", "grad_norm"):  # ce / kl: means over both processes, as the loss
            assert b[key] == pytest.approx(a[key], rel=RTOL, abs=1e-6), (a["step"], key)
    assert fsdp["losses"][-1]["loss"] < fsdp["losses"][0]["loss"]
    assert fsdp["mask_check"] == {"ok": True, "required": True, "modules_violating": 0, "pruned_entries_nonzero": 0}
    assert fsdp["sparsity_after"]["all"] == pytest.approx(0.5)

    # checkpoints: the trainable tensors gathered to full size (as one process writes them), an RNG state per rank
    checkpoint = tmp_path / "fsdp" / "checkpoint-2"
    assert _checkpoint_files(checkpoint) == _fsdp_checkpoint("optimizer.bin")
    from safetensors.torch import load_file

    trainable = load_file(checkpoint / "trainable.safetensors")
    trainable_one = load_file(tmp_path / "one" / "checkpoint-2" / "trainable.safetensors")
    assert trainable and trainable.keys() == trainable_one.keys()
    for name, tensor in trainable_one.items():
        torch.testing.assert_close(trainable[name], tensor, rtol=RTOL, atol=ATOL, msg=name)

    # the merged model loads, keeps the masks exactly and equals the single-process one
    _, masks = pruned_tiny("llava", "2:4")
    merged_one, merged_fsdp = _merged(tmp_path / "one"), _merged(tmp_path / "fsdp")
    for name, mask in masks.items():
        assert int((merged_fsdp[name + ".weight"][~mask] != 0).sum()) == 0, name
    for name, tensor in merged_one.items():
        torch.testing.assert_close(merged_fsdp[name], tensor, rtol=RTOL, atol=ATOL, msg=name)
    original = pruned_tiny("llava", "2:4")[0].state_dict()
    name = next(iter(masks)) + ".weight"
    assert not torch.equal(merged_fsdp[name], original[name])

    # resume from checkpoint-2 (trainable tensors re-sharded, optimizer restored) ends where the uninterrupted run ended
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(checkpoint, resumed_dir / "checkpoint-2")
    _run([*launch, "--main_process_port", str(_free_port()), str(tmp_path / "run_fsdp.py"), str(resumed_dir),
          "2", "1", "resume"], env)
    resumed = _record(resumed_dir)
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["steps"] == 3
    assert resumed["losses"][-1]["loss"] == pytest.approx(fsdp["losses"][-1]["loss"], rel=RTOL)
    for name, tensor in _merged(resumed_dir).items():
        torch.testing.assert_close(tensor, merged_fsdp[name], rtol=RTOL, atol=ATOL, msg=name)
