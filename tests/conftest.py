"""Test setup shared by every test module.

Without a CUDA device (``torch.cuda.is_available()`` is False) Triton kernels run under the
interpreter, so ``TRITON_INTERPRET`` is set here, before any module that defines a ``@triton.jit``
function is imported. Tests marked ``gpu`` skip without a CUDA device. The demo's cache (learned
vocabularies, encoded text, base models) goes to one temporary folder per session, not the user's.
"""

import atexit
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["TFZ_CACHE_DIR"] = tempfile.mkdtemp(prefix="tfz-test-cache-")
atexit.register(shutil.rmtree, os.environ["TFZ_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bench_script():
    """Load a script of bench/ by name (``bench_script("quality_sim")``) as a module."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def one_rank_group():
    """A one-rank gloo process group for the test (skips if this process already has one)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
