"""Config choice of the Triton wgrad launcher without a GPU: the table, split-K, device properties,
start-up tuning (``tfz.kernels.tune``) and the device guard.

The launch itself is replaced by a recorder where only the host side is under test; the interpreter
runs the kernel where numbers are checked.
"""

import json
import os

import numpy as np
import pytest
import torch
from tfz.kernels import ActiveRows, configs, has_triton, tune, wgrad
from tfz.kernels.configs import FALLBACK_CONFIG, SPLIT_K, TABLE, WgradConfig

pytestmark = pytest.mark.skipif(not has_triton(), reason="needs triton")

H100 = ("NVIDIA H100 (simulated)", (9, 0), "sm90", 132, 232448)


@pytest.fixture
def launcher(monkeypatch):
    """tfz.kernels._wgrad_triton on a simulated H100, the table in force, kernel launches recorded."""
    from tfz.kernels import _wgrad_triton as mod

    info = mod.DeviceInfo(*H100)
    monkeypatch.setattr(mod, "pinned_config", None)
    monkeypatch.setattr(mod, "device_info", lambda device: info)
    monkeypatch.setattr(mod, "tuned", {})
    mod.clear_picks()
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **meta: launches.append((self.name, grid, args, meta))

    monkeypatch.setattr(mod, "wgrad_kernel", Recorder("wgrad"))
    monkeypatch.setattr(mod, "bias_kernel", Recorder("bias"))
    mod.launches = launches
    yield mod
    mod.clear_picks()


def _unit_mask(n_rows: int, ratio: float, seed: int) -> np.ndarray:
    """Random 64-row units frozen at ``ratio`` (as tfz.masks draws them)."""
    units = -(-n_rows // 64)
    frozen = np.random.default_rng(seed).permutation(units)[: round(ratio * units)]
    mask = np.ones(units * 64, dtype=bool)
    for u in frozen:
        mask[u * 64 : (u + 1) * 64] = False
    return mask[:n_rows]


def _call(mod, n_rows, n_in, tokens, mask=None, dtype=torch.bfloat16, out_dtype=torch.float32, **kw):
    x = torch.empty(tokens, n_in, dtype=dtype)
    dy = torch.empty(tokens, n_rows, dtype=dtype)
    dw = torch.empty(n_rows, n_in, dtype=out_dtype)
    rows = None if mask is None else ActiveRows(mask)
    return mod.wgrad_triton(x, dy, dw, rows, kw.get("accumulate", True), kw.get("db"), True)


def test_table_has_every_key():
    """(The compiled shared memory of every entry is checked against the GPUs' limits in
    test_wgrad_aot.py.)"""
    for fam in ("sm90", "sm80"):
        for dclass in ("16bit", "tf32"):
            for bucket in ("narrow", "wide"):
                by_block = TABLE[(fam, dclass, bucket)]
                assert sorted(by_block) == sorted(configs.BLOCK_M_CHOICES)
                for block_m, cfg in by_block.items():
                    assert cfg.block_m == block_m and cfg.split_k == 1


def test_config_does_not_depend_on_the_active_rows(launcher):
    """Masks with 25-90% of 64-row units frozen all launch the same kernel (64-row blocks)."""
    picked = set()
    for ratio in (0.25, 0.5, 0.75, 0.9):
        for seed in range(3):
            cfg = _call(launcher, 14336, 4096, 4096, _unit_mask(14336, ratio, seed))
            picked.add(cfg)
    assert picked == {TABLE[("sm90", "16bit", "wide")][64]}
    assert _call(launcher, 14336, 4096, 4096) == TABLE[("sm90", "16bit", "wide")][128]
    assert _call(launcher, 14336, 1024, 4096) == TABLE[("sm90", "16bit", "narrow")][128]
    assert _call(launcher, 4096, 4096, 4096, dtype=torch.float32) == TABLE[("sm90", "tf32", "wide")][128]


def test_launch_grid_covers_the_active_blocks_only(launcher):
    mask = _unit_mask(4096, 0.5, 1)
    cfg = _call(launcher, 4096, 4096, 1024, mask)
    name, grid, args, meta = launcher.launches[-1]
    n_blocks = sum(bool(mask[i : i + cfg.block_m].any()) for i in range(0, 4096, cfg.block_m))
    assert name == "wgrad" and grid == (n_blocks * (4096 // cfg.block_n) * cfg.split_k,)
    assert args[4].tolist() == [b for b in range(4096 // cfg.block_m) if mask[b * cfg.block_m]]
    assert meta["BLOCK_M"] == cfg.block_m and meta["HAS_MASK"] and meta["ACCUMULATE"]


def test_small_launches_switch_to_64_rows_then_split(launcher):
    """A k/v projection (1024 rows) at 75% frozen fills few SMs: 64-row blocks, then split-K x4."""
    mask = _unit_mask(1024, 0.75, 0)
    cfg = _call(launcher, 1024, 1024, 16384, mask)
    assert cfg.block_m == 64 and cfg.split_k == SPLIT_K
    all_active = _call(launcher, 512, 512, 16384)
    assert all_active.block_m == 64 and all_active.split_k == SPLIT_K  # 4 x 4 tiles of 128 rows


@pytest.mark.parametrize("case", ["deterministic", "bf16-destination", "few-tokens"])
def test_split_k_is_never_chosen_when_it_must_not(launcher, case):
    mask = _unit_mask(1024, 0.75, 0)
    if case == "deterministic":
        torch.use_deterministic_algorithms(True)
        try:
            cfg = _call(launcher, 1024, 1024, 16384, mask)
        finally:
            torch.use_deterministic_algorithms(False)
    elif case == "bf16-destination":
        cfg = _call(launcher, 1024, 1024, 16384, mask, out_dtype=torch.bfloat16)
    else:
        cfg = _call(launcher, 1024, 1024, 512, mask)
    assert cfg.split_k == 1
    assert not any(meta["SPLIT_K"] > 1 for _, _, _, meta in launcher.launches)


def test_split_rule_against_brute_force():
    """split_k_for over a grid: split exactly when allowed and the grid is under half full."""
    cfg64 = WgradConfig(block_m=64, block_n=128, block_k=64)
    for tiles in (1, 10, 65, 66, 67, 200):
        for tokens in (64, 1023, 1024, 16384):
            for fp32_out in (False, True):
                for det in (False, True):
                    for cfg in (cfg64, WgradConfig(block_m=128, block_n=128, block_k=64)):
                        got = configs.split_k_for(
                            cfg,
                            tiles=tiles,
                            tokens=tokens,
                            sm_count=132,
                            fp32_out=fp32_out,
                            deterministic=det,
                        )
                        want = (
                            SPLIT_K
                            if (not det and fp32_out and cfg.block_m == 64 and 2 * tiles <= 132)
                            and tokens >= SPLIT_K * 4 * 64
                            else 1
                        )
                        assert got == want, (tiles, tokens, fp32_out, det, cfg)


def test_shared_memory_comes_from_the_device(launcher, monkeypatch):
    """The same call on an H100's 227 KB per block runs the table's config; on a device with 40 KB
    (whose properties say so) the fallback, which needs 16 KB."""
    assert _call(launcher, 14336, 4096, 4096) == TABLE[("sm90", "16bit", "wide")][128]
    tiny = launcher.DeviceInfo("small (simulated)", (9, 0), "sm90", 132, 40 * 1024)
    monkeypatch.setattr(launcher, "device_info", lambda device: tiny)
    assert _call(launcher, 14336, 4096, 4096) == FALLBACK_CONFIG


def test_device_properties_are_read_from_torch(monkeypatch):
    from tfz.kernels import _wgrad_triton as mod

    class Props:
        name, major, minor, multi_processor_count = "NVIDIA H200", 9, 0, 132
        shared_memory_per_block_optin, shared_memory_per_block = 232448, 49152

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    mod.device_info.cache_clear()
    try:
        info = mod.device_info(torch.device("cuda", 3))
    finally:
        mod.device_info.cache_clear()
    assert info == mod.DeviceInfo("NVIDIA H200", (9, 0), "sm90", 132, 232448)


def test_bias_has_its_own_launch_over_64_row_blocks(launcher):
    """One program per active 64-row block; the tokens split over 4 (atomics) when the blocks fill
    less than half of the SMs, except in deterministic mode."""
    mask = _unit_mask(4096, 0.5, 2)
    n64 = sum(bool(mask[i : i + 64].any()) for i in range(0, 4096, 64))
    grids = []
    for det, n_rows, m in ((False, 4096, mask), (True, 4096, mask), (False, 14336, None)):
        torch.use_deterministic_algorithms(det)
        try:
            _call(launcher, n_rows, 4096, 4096, m, db=torch.empty(n_rows))
        finally:
            torch.use_deterministic_algorithms(False)
        ((name, grid, args, meta),) = [entry for entry in launcher.launches if entry[0] == "bias"]
        launcher.launches.clear()
        assert meta["BLOCK_M"] == 64 and meta["SPLIT_T"] == grid[1]
        grids.append(grid)
    assert grids == [(n64, SPLIT_K), (n64, 1), (14336 // 64, 1)]


def test_nothing_is_measured_during_calls(launcher, monkeypatch):
    import triton.testing

    def refuse(*args, **kwargs):
        raise AssertionError("benchmark inside a wgrad call")

    monkeypatch.setattr(triton.testing, "do_bench", refuse)
    for ratio in (0.0, 0.5, 0.9):
        _call(launcher, 4096, 4096, 2048, _unit_mask(4096, ratio, 0))
    assert len(launcher.launches) == 3


def test_device_guard(monkeypatch):
    from contextlib import nullcontext

    from tfz.kernels import _wgrad_triton as mod

    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda index: entered.append(index) or nullcontext())
    assert isinstance(mod._guard(torch.device("cpu")), nullcontext)
    assert isinstance(mod._guard(torch.device("cuda", 0)), nullcontext) and entered == []
    mod._guard(torch.device("cuda", 1))
    assert entered == [1]


# ---------------------------------------------------------------- tune (interpreter)

_interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_interpreter = pytest.mark.skipif(not _interpreting, reason="needs TRITON_INTERPRET=1")
CANDIDATES = [
    WgradConfig(block_m=64, block_n=64, block_k=64),
    WgradConfig(block_m=64, block_n=32, block_k=32),
    WgradConfig(block_m=128, block_n=64, block_k=64),
    WgradConfig(block_m=128, block_n=32, block_k=64),
]


@pytest.fixture
def interp(monkeypatch):
    from tfz.kernels import _wgrad_triton as mod

    monkeypatch.setattr(mod, "tuned", {})
    mod.clear_picks()
    yield mod
    mod.clear_picks()


@needs_interpreter
def test_tune_picks_the_fastest_caches_and_is_used(interp, monkeypatch, tmp_path):
    measured = []
    real = interp.wgrad_triton

    def spy(*args, config=None, **kw):
        measured.append(config)
        return real(*args, config=config, **kw)

    def bench(fn):  # runs the candidate once under the interpreter; the "time" prefers narrow tiles
        fn()
        return 1.0 if measured[-1].block_n == 32 else 2.0

    monkeypatch.setattr(interp, "wgrad_triton", spy)
    cache = tmp_path / "tuning.json"
    found = tune(
        [(64, 200, 48)], dtype=torch.bfloat16, device="cpu", cache=cache, bench=bench, candidates=CANDIDATES
    )
    assert len(measured) == 4  # two candidates per BLOCK_M
    assert {k[4]: c for k, c in found.items()} == {64: CANDIDATES[1], 128: CANDIDATES[3]}
    entries = json.loads(cache.read_text())["entries"]
    assert {(e["block_m"], e["config"]["block_n"]) for e in entries} == {(64, 32), (128, 32)}

    # later calls use the tuned configs and measure nothing
    monkeypatch.setattr(interp, "pinned_config", None)
    launched, kernel = [], interp.wgrad_kernel

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append(meta) or kernel[grid](*args, **meta)

    monkeypatch.setattr(interp, "wgrad_kernel", Spy())
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(64, 48, generator=g).bfloat16(), torch.randn(64, 200, generator=g).bfloat16()
    mask = torch.from_numpy(_unit_mask(200, 0.5, 0))
    dw = wgrad(x, dy, active_rows=mask, backend="triton")
    assert launched[-1]["BLOCK_N"] == 32 and launched[-1]["BLOCK_M"] == 64
    want = torch.where(mask[:, None], dy.float().t() @ x.float(), torch.zeros(()))
    torch.testing.assert_close(dw, want, rtol=1e-5, atol=1e-4)

    # a new process state reads the cache instead of measuring
    interp.tuned.clear()
    interp.clear_picks()

    def refuse(fn):
        raise AssertionError("measured although cached")

    again = tune(
        [(64, 200, 48)], dtype=torch.bfloat16, device="cpu", cache=cache, bench=refuse, candidates=CANDIDATES
    )
    assert again == found


@needs_interpreter
@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        '{"format": "other", "version": 1, "entries": []}',
        '{"format": "tfz-wgrad-tuning", "version": 1, "entries": [{"device": "x"}]}',
    ],
)
def test_bad_tuning_cache_is_refused_and_changes_nothing(interp, tmp_path, text):
    cache = tmp_path / "bad.json"
    cache.write_text(text)
    with pytest.raises(ValueError, match="bad.json"):
        tune([(64, 200, 48)], device="cpu", cache=cache, bench=lambda fn: 1.0, candidates=CANDIDATES)
    assert interp.tuned == {} and cache.read_text() == text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shapes": []}, "empty"),
        ({"shapes": [(64, 0, 48)]}, r"shapes\[0\]\[1\]"),
        ({"shapes": [(64, 48)]}, r"shapes\[0\]"),
        ({"shapes": [(64, 8, 8)], "dtype": torch.float64}, "dtype"),
    ],
)
def test_tune_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tune(device="cpu", bench=lambda fn: 1.0, **kwargs)
