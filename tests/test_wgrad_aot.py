"""Ahead-of-time compilation (no GPU) of every wgrad kernel the launcher can pick, and of the row-AdamW
kernel, for sm_80 and sm_90.

The launcher's own decision (``launch_config``) runs over a grid of calls on simulated A100 / H100
devices; every config it returns must be among the kernels ``kernels/aot.py`` compiles with the real
launch specialisation, and that script must find no spill byte, no shared memory over the
architecture's limit, tensor-core MMA in every GEMM kernel and atomics exactly in the split ones.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tfz.kernels import configs, has_triton

pytestmark = pytest.mark.skipif(not has_triton(), reason="needs triton")

AOT = Path(__file__).resolve().parents[1] / "kernels" / "aot.py"
# (family, SMs, shared memory per block): A100 and H100/H200
DEVICES = {80: ("sm80", 108, 166912), 90: ("sm90", 132, 232448)}


def _counts(mask: np.ndarray):
    """count(block_m): active row blocks of ``mask``, by brute force."""

    def count(block: int) -> int:
        return sum(bool(mask[i : i + block].any()) for i in range(0, mask.size, block))

    return count


def _masks(n_rows: int, rng: np.random.Generator):
    yield np.ones(n_rows, dtype=bool)
    for ratio in (0.25, 0.5, 0.75, 0.9):  # random 64-row units, as tfz.masks draws them
        units = -(-n_rows // 64)
        keep = rng.permutation(units)[: max(1, round((1 - ratio) * units))]
        mask = np.zeros(units * 64, dtype=bool)
        for u in keep:
            mask[u * 64 : (u + 1) * 64] = True
        yield mask[:n_rows]


def launchable(arch: int) -> set[tuple]:
    """(operand class, dW dtype, config) of every launch over the grid, on a simulated ``arch`` GPU."""
    from tfz.kernels._wgrad_triton import DeviceInfo, clear_picks, launch_config

    fam, sms, smem = DEVICES[arch]
    info = DeviceInfo(f"simulated sm_{arch}", (arch // 10, arch % 10), fam, sms, smem)
    rng = np.random.default_rng(0)
    seen = set()
    try:
        for n_rows in (64, 1024, 4096, 14336):
            for mask in _masks(n_rows, rng):
                count = _counts(mask)
                for n_in in (512, 1024, 2048, 4096, 14336):
                    for tokens in (128, 4096, 16384):
                        for dtype, outs in (
                            (torch.bfloat16, (torch.float32, torch.bfloat16)),
                            (torch.float16, (torch.float32, torch.float16)),
                            (torch.float32, (torch.float32,)),
                        ):
                            for out in outs:
                                for det in (False, True):
                                    cfg = launch_config(info, dtype, out, n_rows, n_in, tokens, count, det)
                                    dw = "fp32" if out == torch.float32 else "16bit"
                                    seen.add(("tf32" if dtype == torch.float32 else "16bit", dw, cfg))
    finally:
        clear_picks()
    return seen


def test_every_launchable_config_compiles_without_spills(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(AOT), "--arch", "90", "--arch", "80", "--jobs", "2", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("ptxas not available in this triton install")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results and all(r["spills"] == 0 for r in results)
    compiled = {
        (
            r["case"]["arch"],
            "tf32" if r["case"]["dtype"] == "fp32" else "16bit",
            "fp32" if r["case"]["dw_dtype"] == "fp32" else "16bit",
            configs.WgradConfig(**r["case"]["config"]),
        )
        for r in results
        if r["case"]["kernel"] == "wgrad"
    }
    for arch in DEVICES:
        picked = launchable(arch)
        assert any(cfg.split_k > 1 for _, _, cfg in picked), "the grid never reached split-K"
        missing = [(dc, dw, cfg) for dc, dw, cfg in picked if (arch, dc, dw, cfg) not in compiled]
        assert not missing, f"sm_{arch}: launchable but not compiled ahead of time: {missing}"
        mma = {r["mma"] for r in results if r["case"]["arch"] == arch and r["case"]["kernel"] == "wgrad"}
        assert mma == {"wgmma" if arch == 90 else "mma.sync"}
    bias = [r for r in results if r["case"]["kernel"] == "bias"]
    assert {r["case"]["arch"] for r in bias} == set(DEVICES)
    from tfz.kernels.row_adamw import BLOCK

    adamw = [r for r in results if r["case"]["kernel"] == "row_adamw"]
    assert {(r["case"]["arch"], r["case"]["dtype"]) for r in adamw} == {
        (a, d) for a in DEVICES for d in ("bf16", "fp32")
    }
    assert all(r["case"]["config"]["block"] == BLOCK and r["mma"] == "none" for r in adamw)
