"""The Triton kernels compile for a Hopper GPU (sm_90) on a machine without one, with the launch configs the
launchers pick on CUDA: catches GPU-compiler errors (tile shapes, dtypes, shared memory) that the CPU
interpreter accepts. Also checks the decode split-K choice and the shims for older Triton (3.6)."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles real GPU code: run in the plain tier", allow_module_level=True)


import triton.language as tl  # noqa: E402

from vlmsparse.kernels import _fused  # noqa: E402

CUDA = torch.device("cuda")
pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")


@pytest.fixture
def h100(monkeypatch):
    monkeypatch.setattr(_fused, "_num_sms", lambda device: 132)


def test_decode_splits_along_k(h100):
    up = _fused.forward_config(1, 11008, 4096, torch.float16, CUDA, packed=True, lora=False)
    down = _fused.forward_config(16, 4096, 11008, torch.float16, CUDA, packed=True, lora=False)
    # 11008 / 16 = 688 column tiles >= 4 programs per SM: no K split
    assert (up.block_m, up.block_n, up.block_k, up.split_k) == (16, 16, 256, 1)
    # 4096 / 16 = 256 column tiles: split K until >= 4 programs per SM (4 x 256 = 1024 >= 528)
    assert (down.block_n, down.split_k) == (16, 4)
    lora = _fused.forward_config(1, 11008, 4096, torch.float16, CUDA, packed=True, lora=True)
    assert lora.block_n == 32
    prefill = _fused.forward_config(2048, 11008, 4096, torch.float16, CUDA)
    assert prefill.split_k == 1 and prefill.block_m == 128


def _compile(kernel, dtype: str, cfg: _fused.TileConfig, packed: bool, lora: bool = True, split: int = 1):
    compiled = _fused.compile_for_target(kernel, dtype, cfg, packed, lora, bias=split == 1, split=split)
    assert "cubin" in compiled.asm and compiled.metadata.shared <= 227 * 1024
    return compiled


FORWARD_CASES = [  # (dtype, tokens, packed, lora)
    ("fp16", 1, True, False), ("fp16", 1, True, True), ("fp16", 1, False, True), ("fp16", 32, True, True),
    ("fp16", 2048, True, False), ("fp16", 2048, True, True), ("fp16", 2048, False, True),
    ("bf16", 1, True, False), ("bf16", 16, True, True), ("fp32", 1, True, False),
]
_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.mark.parametrize("dtype,m,packed,lora", FORWARD_CASES)
def test_forward_compiles_for_sm90(h100, dtype, m, packed, lora):
    torch_dtype = _TORCH[dtype]
    cfg = _fused.forward_config(m, 11008, 4096, torch_dtype, CUDA, packed, lora)
    _compile(_fused._forward_kernel, dtype, cfg, packed, lora, cfg.split_k)


@pytest.mark.parametrize("packed", [True, False])
def test_backward_compiles_for_sm90(packed):
    cfg = _fused.backward_config(2048, 4096, 4096, torch.float16, CUDA, packed)
    _compile(_fused._grad_input_kernel, "fp16", cfg, packed)
    _compile(_fused._grad_lora_kernel, "fp16", cfg, packed)


def test_split_k_forward_compiles_for_sm90(h100):
    cfg = _fused.forward_config(1, 4096, 11008, torch.float16, CUDA, packed=True, lora=False)
    assert cfg.split_k > 1
    _compile(_fused._forward_kernel, "fp16", cfg, True, False, cfg.split_k)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_old_triton_select_compiles_for_sm90(h100, monkeypatch, tmp_path, dtype):
    """The packed prefill forward without LoRA with the select added for Triton < 3.7 compiles, and the flag
    really changes the kernel (on Triton 3.6 the kernel without it is the known compiler abort)."""
    cfg = _fused.forward_config(2048, 11008, 4096, _TORCH[dtype], CUDA, packed=True, lora=False)
    assert cfg.block_m >= 64
    # Triton hashes a kernel's globals once per process: without this a cached binary of the other flag comes
    # back (and its binaries would go under the other flag's key in the user's cache).
    monkeypatch.setenv("TRITON_ALWAYS_COMPILE", "1")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_fused, "OLD_TRITON_TRANS_FIX", tl.constexpr(True))
    fixed = _compile(_fused._forward_kernel, dtype, cfg, True, False)
    if _fused._triton_version() >= (3, 7):
        monkeypatch.setattr(_fused, "OLD_TRITON_TRANS_FIX", tl.constexpr(False))
        plain = _compile(_fused._forward_kernel, dtype, cfg, True, False)
        assert fixed.asm["ttir"].count("arith.select") > plain.asm["ttir"].count("arith.select")


def test_old_triton_flag_follows_the_version(monkeypatch):
    assert bool(_fused.OLD_TRITON_TRANS_FIX) == (_fused._triton_version() < (3, 7))
    for version, expected in [("3.6.0", (3, 6)), ("3.9.0+git1234", (3, 9)), ("3.10.1", (3, 10)), ("3.7rc1", (3, 7))]:
        monkeypatch.setattr(_fused.triton, "__version__", version)
        assert _fused._triton_version() == expected


def _old_patch_lang_tensor(tensor, scope):
    """Stand-in for Triton 3.6's ``_patch_lang_tensor``: ``int`` on a 1-element array."""
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


def _new_patch_lang_tensor(tensor, scope):
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))


class _Scope:
    def set_attr(self, obj, name, value):
        setattr(obj, name, value)


def test_interpreter_index_fix():
    """``range(scalar)`` in the interpreter works after the fix even with an old interpreter under NumPy >= 2.4;
    an interpreter that already squeezes, or an already wrapped one, is left alone."""

    class Scalar:
        def __init__(self, value):
            self.handle = types.SimpleNamespace(data=np.array([value], dtype=np.int32))

    old = types.SimpleNamespace(_patch_lang_tensor=_old_patch_lang_tensor)
    assert _fused.fix_interpreter_index(old)
    old._patch_lang_tensor(Scalar, _Scope())
    assert list(range(Scalar(3))) == [0, 1, 2]
    wrapped = old._patch_lang_tensor
    assert not _fused.fix_interpreter_index(old) and old._patch_lang_tensor is wrapped
    new = types.SimpleNamespace(_patch_lang_tensor=_new_patch_lang_tensor)
    assert not _fused.fix_interpreter_index(new) and new._patch_lang_tensor is _new_patch_lang_tensor


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_effective_weight_kernel_compiles_for_sm90(dtype):
    from vlmsparse.kernels.effective_weight import compile_for_target

    compiled = compile_for_target(dtype)
    assert "cubin" in compiled.asm and compiled.metadata.shared <= 227 * 1024


@pytest.mark.parametrize("nm_m", [0, 4, 8])
def test_sparsegpt_column_steps_compile_for_sm90(nm_m):
    """SparseGPT's column-steps kernel (a [128, 32] register tile, unstructured and N:M) compiles for Hopper."""
    from vlmsparse.kernels import obs

    compiled = obs.compile_for_target(nm_m)
    assert "cubin" in compiled.asm and compiled.metadata.shared <= 227 * 1024
