"""vlmsparse: prune vision-language models, restore them with SparseLoRA, run them fast."""

from setuptools import find_packages, setup

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
        "dev": ["triton>=3.6", "pytest>=8", "ruff>=0.6", "matplotlib"],
    },
    entry_points={"console_scripts": ["vlmsparse=vlmsparse.cli:main"]},
)
