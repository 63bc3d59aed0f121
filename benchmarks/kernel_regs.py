"""Registers and spills of the Triton kernels for a GPU target, without a GPU (a tuning aid).

Compiles ``vlmsparse.kernels._fused`` kernels for sm_90 with ``triton.compile`` and runs the ptxas bundled with
Triton in verbose mode. Each config is ``KERNEL DTYPE PACKED LORA BM BN BK SPLIT WARPS STAGES`` (``fwd``) or
``KERNEL DTYPE PACKED BM BN BK WARPS STAGES`` (``dx`` / ``glora``), PACKED / LORA as T or F, e.g.::

    python benchmarks/kernel_regs.py "fwd fp16 T F 16 16 256 1 4 3" "dx fp16 T 64 64 64 4 3"

With no arguments it reports the configs the launchers pick for the LLaVA-7B 4096x11008 layer. Works with
Triton 3.6 and 3.9 (checked: no spills for those configs on either).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from vlmsparse.kernels import _fused  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
WIDE = {"x_ptr", "w_ptr", "bias_ptr", "dy_ptr", "dx_ptr"}


def report(kernel, dtype: str, packed: bool, lora: bool, bm: int, bn: int, bk: int, split: int, warps: int,
           stages: int) -> str:
    cfg = _fused.TileConfig(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=warps, num_stages=stages)
    compiled = _fused.compile_for_target(kernel, dtype, cfg, packed, lora, bias=True, split=split)
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
    if not ptxas.exists():
        ptxas = ptxas.with_name("ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        result = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                                capture_output=True, text=True, timeout=300)
    finally:
        os.remove(f.name)
    lines = (result.stderr + result.stdout).splitlines()
    regs = [line.split("Used ")[1].split(",")[0] for line in lines if "Used " in line]
    spills = [line.strip() for line in lines if "spill" in line]
    return f"{', '.join(regs) or 'ptxas: ' + ' '.join(lines[-2:])}; {'; '.join(spills)}; smem {compiled.metadata.shared}"


def _parse(line: str):
    parts = line.split()
    kernel = {"fwd": _fused._forward_kernel, "dx": _fused._grad_input_kernel, "glora": _fused._grad_lora_kernel}[parts[0]]
    flag = {"T": True, "F": False}
    if parts[0] == "fwd":
        dtype, packed, lora, *ints = parts[1:]
        return kernel, dtype, flag[packed], flag[lora], *map(int, ints)
    dtype, packed, bm, bn, bk, warps, stages = parts[1:]
    return kernel, dtype, flag[packed], True, int(bm), int(bn), int(bk), 1, int(warps), int(stages)


def _defaults() -> list[str]:
    _fused._num_sms = lambda device: 132  # an H100 SXM
    cuda, lines = torch.device("cuda"), []
    for m in (1, 2048):
        for packed in (True, False):
            for lora in (False, True):
                c = _fused.forward_config(m, 11008, 4096, torch.float16, cuda, packed, lora)
                lines.append(f"fwd fp16 {'TF'[not packed]} {'TF'[not lora]} {c.block_m} {c.block_n} {c.block_k} "
                             f"{c.split_k} {c.num_warps} {c.num_stages}")
    return lines


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    for line in argv or _defaults():
        try:
            print(f"{line:40s} -> {report(*_parse(line))}", flush=True)
        except Exception as exc:  # report and go on with the next config
            print(f"{line:40s} -> ERROR {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
