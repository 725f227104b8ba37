"""Every script in examples/ runs at its tiny size (26 steps, the shortest run TimelyFreezeConfig.for_run
accepts) with --check-grads: each step's gradients are compared inside the script with float64 autograd
on the whole model, masked exactly like the freezing applied to each (stage, microbatch), and the
script fails on a mismatch. Here: the run finished, a plan was applied within it, and gradients were
checked both with freezing off (warm-up) and on (the partly frozen monitoring steps, and the plan's).

The HuggingFace example needs transformers and the torchtitan one torchtitan (both in the ``examples``
extra, which ``test`` includes; about 20 s and 40 s to install on the CI machine): without them they
skip, saying so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 26
RTOL = 1e-4


def needs(module: str, cost: str):
    missing = importlib.util.find_spec(module) is None
    why = f"{module} not installed (pip install -e '.[examples]'; {cost})"
    return pytest.mark.skipif(missing, reason=why)


def run_example(tmp_path, script: str, *flags: str, torchrun: bool = False) -> dict:
    out = tmp_path / "result.json"
    args = [str(ROOT / "examples" / script), "--steps", str(STEPS), "--check-grads", "--json", str(out)]
    args += flags
    if torchrun:
        launcher = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        command = [launcher, "--nproc-per-node", "2", *args]
    else:
        command = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "gradients matched the masked float64 reference" in proc.stdout
    return json.loads(out.read_text())


def check(result: dict) -> None:
    steps = result["steps"]
    assert len(steps) == STEPS
    assert result["plan_step"] is not None and result["plan_step"] < STEPS, "no plan applied within the run"
    assert result["checked_steps"] == STEPS
    # freezing on: at least the monitoring steps that freeze part of every stage (the plan's own
    # ratios depend on the measured times); freezing off: at least the warm-up
    on, off = result["checked_frozen_steps"], STEPS - len(result["frozen_steps"])
    assert on >= 3 and off >= 3, f"steps checked with freezing on: {on}, off: {off}"
    assert result["max_grad_err"] <= RTOL
    # how much the plan freezes follows the measured times (on a loaded 2-core machine it may choose
    # little); that it exists and was in force is what this checks
    assert result["plan"] is not None and all(r["plan"] for r in steps[result["plan_step"] :])
    assert all(r["loss"] == r["loss"] for r in steps if r.get("loss") is not None)


@pytest.mark.parametrize(
    ("script", "flags", "env", "error"),
    [
        (
            "vit_gpipe.py",
            ["--steps", "10"],
            {},
            "--steps 10 is too short for TimelyFreeze's phases: use >= 26 or",
        ),
        (
            "vit_gpipe.py",
            ["--steps", "0", "--no-freeze"],
            {},
            "argument --steps: must be an integer >= 1, got '0'",
        ),
        ("vit_gpipe.py", ["--steps=-3"], {}, "argument --steps: must be an integer >= 1, got '-3'"),
        (
            "tracer_pipeline.py",
            ["--json", "/nonexistent/dir/r.json"],
            {},
            "folder /nonexistent/dir does not exist",
        ),
        ("vit_gpipe.py", [], {"RANK": "0", "WORLD_SIZE": "3"}, "runs on exactly 2 ranks, got WORLD_SIZE=3"),
    ],
)
def test_bad_flags_are_refused_in_one_line_before_any_rank_starts(script, flags, env, error):
    command = [sys.executable, str(ROOT / "examples" / script), *flags]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1].startswith(f"{script}: error: ") and error in proc.stderr


@needs("transformers", "about 20 s")
@pytest.mark.distributed
@pytest.mark.parametrize("schedule", ["1f1b", "zbv"])
def test_huggingface_llama(tmp_path, schedule):
    from _pipe_workers import runnable

    if not runnable(schedule):
        pytest.skip("this torch cannot run V placements on gloo")
    check(run_example(tmp_path, "hf_llama.py", "--schedule", schedule))


@needs("transformers", "about 20 s")
@pytest.mark.distributed
def test_huggingface_llama_under_torchrun(tmp_path):
    check(run_example(tmp_path, "hf_llama.py", torchrun=True))


@needs("transformers", "about 20 s")
def test_huggingface_cut_equals_the_whole_model():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import hf_llama
    finally:
        sys.path.remove(str(ROOT / "examples"))
    assert hf_llama.check_cut() == 0.0


@pytest.mark.distributed
def test_tracer_stages(tmp_path):
    check(run_example(tmp_path, "tracer_pipeline.py"))


@pytest.mark.distributed
def test_vit_gpipe(tmp_path):
    check(run_example(tmp_path, "vit_gpipe.py"))


@needs("torchtitan", "about 40 s, Python 3.11+")
@pytest.mark.distributed
def test_torchtitan_pipeline(tmp_path):
    result = run_example(tmp_path, "torchtitan_llama.py")
    check(result)
    # the first step's loss is the mean cross-entropy of a plain forward of its batch
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import torchtitan_llama as tt
    finally:
        sys.path.remove(str(ROOT / "examples"))
    x, y = tt.batch(0)
    with torch.no_grad():
        plain = float(F.cross_entropy(tt.llama3_debug()[1](x).flatten(0, 1), y.flatten()))
    assert abs(result["steps"][0]["loss"] - plain) <= 1e-4 * plain, (result["steps"][0]["loss"], plain)
