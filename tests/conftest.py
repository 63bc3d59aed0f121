"""Shared fixtures. Interpreter-tier tests (marker ``interpret``) need TRITON_INTERPRET=1 set before any
kernel module is imported; .ci/run runs them in a separate pytest process with it set."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_interp = pytest.mark.skip(reason="Triton-interpreter tier: run with TRITON_INTERPRET=1")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "interpret" in item.keywords and not INTERPRET:
            item.add_marker(skip_interp)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_backend_cache():
    """Every test starts and ends with an empty backend-resolution cache (vlmsparse.ops.clear_backend_cache):
    tests change what a resolution depends on (the tables, a simulated missing build) through monkeypatch, which
    is undone after the test body, before this fixture's teardown."""
    from vlmsparse import ops

    ops.clear_backend_cache()
    yield
    ops.clear_backend_cache()


@pytest.fixture
def one_thread():
    """Tiny matrices: on a shared 2-core machine a second thread only adds waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def without_native(monkeypatch):
    """As on an install without the C++ extension: the native CPU kernels report themselves unavailable."""
    from vlmsparse.kernels import cpu

    monkeypatch.setattr(cpu, "_LOAD_RESULT", "not built (simulated by the test)")
    yield


class _OpSpy:
    """Stands for torch.ops.vlmsparse_native: records the name of each op looked up on it (``names``)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __getattr__(self, name):
        self.names.append(name)
        return getattr(torch.ops.vlmsparse_native, name)


@pytest.fixture
def op_spy(native):
    """A fresh :class:`_OpSpy`, for a test to put in place of ``vlmsparse.kernels.cpu._ops``."""
    return _OpSpy()


@pytest.fixture
def native():
    """The native CPU kernels (vlmsparse.kernels.cpu); skips where they are not built, fails instead when
    VLMSPARSE_REQUIRE_NATIVE=1 (CI sets it: there a missing build is a defect, not a skip)."""
    from vlmsparse.kernels import cpu

    if not cpu.native_available():
        if os.environ.get("VLMSPARSE_REQUIRE_NATIVE") == "1":
            pytest.fail(f"VLMSPARSE_REQUIRE_NATIVE=1 but {cpu.unavailable_reason()}")
        pytest.skip(cpu.unavailable_reason())
    return cpu
