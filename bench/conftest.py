"""Benchmarks (pytest-benchmark). Run: ``python -m pytest bench -q --benchmark-enable``.

Results are reported as ratios measured in the same run; see bench/RESULTS.md. Without a CUDA device
(``torch.cuda.is_available()`` False) Triton runs under its interpreter and benchmarks marked ``gpu``
skip, unless ``TFZ_FAKE_GPU=1`` asks for the CPU rehearsal of the GPU benchmarks (bench/gpu_check.sh).
"""

import os
import platform

import pytest
import torch

from tfz._validate import env_flag

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_benchmark_update_machine_info(config, machine_info):
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()}
    if HAS_CUDA:
        info["gpu"] = torch.cuda.get_device_name()
    elif env_flag("TFZ_FAKE_GPU"):
        info["gpu"] = "none (TFZ_FAKE_GPU=1 rehearsal on CPU)"
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional
        pass
    machine_info["tfz"] = info


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA or env_flag("TFZ_FAKE_GPU"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
