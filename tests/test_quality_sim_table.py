"""bench/quality_sim.py's table: each seed against its reference, computed by hand on made-up runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def qs():
    spec = importlib.util.spec_from_file_location("quality_sim", ROOT / "bench" / "quality_sim.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(variant, seed, seq_loss, curve, wall_s):
    return {
        "task": "finetune",
        "split": "tune",
        "steps": 4,
        "variant": variant,
        "seed": seed,
        "seq_loss": seq_loss,
        "val_loss": sum(seq_loss) / len(seq_loss),
        "curve": curve,  # (step, simulated seconds, validation loss)
        "wall_s": wall_s,
        "plan_stage_means": None if variant == "none" else [0.5, 0.75],
    }


NONE = _row("none", 1, [2.0, 2.0, 2.0, 2.0], [[0, 0.0, 3.0], [2, 5.0, 2.4], [4, 10.0, 2.0]], 10.0)
FAST = _row("fast", 1, [2.1, 2.0, 2.2, 2.1], [[0, 0.0, 3.0], [4, 8.0, 2.1]], 8.0)


def test_a_seed_against_its_reference_by_hand(qs):
    c = qs._compare(FAST, NONE)
    assert c["rel"] == pytest.approx(0.1 / 2.0)
    # differences 0.1, 0, 0.2, 0.1: sample sd sqrt(0.02 / 3), over sqrt(4) and the mean 2
    assert c["se"] == pytest.approx((0.02 / 3) ** 0.5 / 2 / 2.0)
    # none at 8 s: between (5, 2.4) and (10, 2.0): 2.4 - 0.4 * 3 / 5 = 2.16
    assert c["equal_time"] == pytest.approx(2.1 / 2.16 - 1)
    assert c["speedup"] == pytest.approx(10.0 / 8.0)
    slow = {**FAST, "wall_s": 12.0}
    assert qs._compare(slow, NONE)["equal_time"] is None  # past the reference's run


def test_table_prints_each_variant_and_draws_the_tradeoff(qs, tmp_path, capsys):
    runs = tmp_path / "runs.jsonl"
    runs.write_text("\n".join(json.dumps(r) for r in (NONE, FAST, _row("orphan", 2, [2.0], [[0, 0, 2]], 1))))
    png = tmp_path / "tradeoff.png"
    qs.main(["table", str(runs), "--png", str(png)])
    out = capsys.readouterr().out
    assert "| fast | +5.00% (+5.00%) |" in out and "| 1.250x | 0.50 0.75 |" in out
    assert f"{2.1 / 2.16 - 1:+.2%}" in out
    assert "orphan" not in out  # its seed has no reference run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
