"""vlmsparse: prune vision-language models, restore them with SparseLoRA, run them fast."""

import os
import platform
import subprocess
import sys

from setuptools import find_packages, setup

NATIVE_SOURCES = ["csrc/sparse_cpu/ops.cpp", "csrc/sparse_cpu/kernels_scalar.cpp"]
NATIVE_X86_SOURCES = ["csrc/sparse_cpu/kernels_avx2.cpp", "csrc/sparse_cpu/kernels_avx512.cpp",
                      "csrc/sparse_cpu/kernels_avx512bf16.cpp"]
NATIVE_AMX_SOURCE = "csrc/sparse_cpu/kernels_amx.cpp"  # only where the compiler knows AMX (GCC >= 11, clang >= 12)


def _import_target_torch() -> bool:
    """Import the torch of the environment being installed into; False when there is none.

    Inside pip's isolated build environment torch is hidden, so the installing interpreter is asked where its
    torch lives and that folder is appended to sys.path (the extension must match that torch's ABI anyway).
    """
    try:
        import torch  # noqa: F401

        return True
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    probe = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"
    try:
        found = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError):
        return False
    if found.returncode != 0 or not found.stdout.strip():
        return False
    sys.path.append(found.stdout.strip().splitlines()[-1])
    try:
        import torch  # noqa: F401,F811
    except ImportError:
        return False
    return True


def _compiler_knows_amx() -> bool:
    """Whether the C++ compiler (``$CXX``, else ``c++``) compiles AMX intrinsics; an older one builds every other
    tier, and the amx tier is then not offered."""
    code = '#include <immintrin.h>\n__attribute__((target("amx-tile,amx-bf16"))) void f() { _tile_release(); }\n'
    compiler = os.environ.get("CXX", "c++").split()
    try:
        probe = subprocess.run([*compiler, "-x", "c++", "-c", "-", "-o", os.devnull], input=code, text=True,
                               capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def _native_build() -> dict:
    """setup() arguments for the native CPU kernels (csrc/), or none when they cannot be built here.

    VLMSPARSE_NATIVE=0 skips them; without them vlmsparse runs its pure-torch paths.
    """
    if os.environ.get("VLMSPARSE_NATIVE", "1") == "0":
        return {}
    if sys.platform != "linux" or not _import_target_torch():
        print("vlmsparse: native CPU kernels not built (needs Linux and torch installed first)", file=sys.stderr)
        return {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    class LenientBuild(BuildExtension):
        """A compiler failure leaves the pure-torch paths instead of failing the install."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 -- any compiler or linker failure
                print(f"vlmsparse: native CPU kernels not built ({error}); using pure-torch paths",
                      file=sys.stderr)
                self.extensions = []  # nothing built: nothing for an editable or wheel install to copy

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    amx = x86 and _compiler_knows_amx()
    extension = CppExtension(
        "vlmsparse._native_cpu",
        NATIVE_SOURCES + (NATIVE_X86_SOURCES if x86 else []) + ([NATIVE_AMX_SOURCE] if amx else []),
        # -fopenmp: at::parallel_for is an OpenMP loop in torch's headers (serial without it); the library links
        # libgomp.so.1, the soname torch's own copy has, so one OpenMP runtime (and torch.set_num_threads) rules.
        extra_compile_args=["-O3", "-std=c++20", "-fopenmp"] + (["-DVLMSPARSE_X86_TIERS"] if x86 else [])
        + (["-DVLMSPARSE_AMX"] if amx else []),
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": LenientBuild}}


setup(
    name="vlmsparse",
    version="0.1.0",
    description="Prune vision-language models (magnitude, Wanda, SparseGPT; unstructured and N:M), "
    "restore them with mask-preserving SparseLoRA, and run 2:4 weights fast.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vlmsparse", "vlmsparse.*"]),
    # torch is installed first, by itself (a CPU wheel or the CUDA build the user wants):
    # a bare "torch" here would let pip fetch a multi-GB CUDA build.
    # Lower bounds: the oldest versions CI tests (.ci/constraints-oldest.txt; torch 2.11 is the lent GPU's).
    install_requires=[
        "torch>=2.11",
        "transformers>=5.17",
        "peft>=0.21",
        "accelerate>=1.15",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "rich",
        "pillow",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        # gguf: tests of benchmarks/bench_prune.py --model FILE.gguf (transformers dequantizes GGUF with it)
        "dev": ["triton>=3.6", "pytest>=8", "ruff>=0.6", "matplotlib", "gguf>=0.17"],
        # benchmarks/bench_prune.py --compare-llmcompressor only; llmcompressor 0.14 pins transformers<=5.17
        "compare": ["llmcompressor>=0.14"],
    },
    entry_points={"console_scripts": ["vlmsparse=vlmsparse.cli:main"]},
    **_native_build(),
)
