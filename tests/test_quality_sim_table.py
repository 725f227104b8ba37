"""bench/quality_sim.py's table: each seed against its reference, computed by hand on made-up runs."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def qs(bench_script):
    return bench_script("quality_sim")


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


def test_the_reference_is_evaluated_every_step_of_the_second_half(qs):
    """No freezing's curve is dense where faster variants end, so their equal-time comparison reads it
    one step apart; a variant keeps the regular points. The last point is the final evaluation."""
    from tfz.demo import DemoConfig

    tiny = dict(task="pretrain", vocab_size=256, dim=32, n_heads=2, ffn_dim=64, seq_len=16, microbatches=4)
    tiny.update(microbatch_size=2, block_rows=8, val_sequences=8, steps=8, eval_every=4, lr_warmup=2)
    profile = [{"F": 1.0, "B": 2.0, "B_frozen": 1.5}] * 2
    for method, steps in (("none", [0, 4, 5, 6, 7, 8]), ("apf", [0, 4, 8])):
        cfg = DemoConfig(methods=("none", method) if method != "none" else ("none",), **tiny)
        res = qs.train(cfg, method, None, 0, "val", profile, qs._corpus(cfg), None)
        assert [c[0] for c in res["curve"]] == steps, method
        assert res["curve"][-1][2] == pytest.approx(res["val_loss"])
        walls = [c[1] for c in res["curve"]]
        assert walls == sorted(walls) and walls[-1] == pytest.approx(res["wall_s"])
