"""tfz installs and plans without a C++ compiler: the native builds fail with a warning, the install
succeeds, tfz.plan.solve runs on the HiGHS fallback with the generic LP's optimum, and tfz.optim's
AdamW steps through the hooks."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("tfz", "kernels", "csrc", "setup.py", "pyproject.toml", "README.md")

CHECK = """
import sys

# an editable install of this checkout would resolve tfz's direct children (tfz._row_adamw) there
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
import numpy as np
import tfz.plan
from tfz.dag import build_dag
from tfz.plan import flow, solve, solve_generic
from tfz.schedule import build_schedule

assert not flow.NATIVE, "the native solver is there"
dag = build_dag(build_schedule("1f1b", 3, 6))
rng = np.random.default_rng(0)
up = rng.uniform(1.0, 2.0, dag.num_actions)
low = np.where(dag.kind_mask("B"), 0.5 * up, up)
plan, ref = solve(dag, up, low), solve_generic(dag, up, low)
assert abs(plan.makespan_planned - ref.makespan_planned) <= 1e-9 * ref.makespan_planned
assert abs(plan.total_ratio - ref.total_ratio) <= 1e-9 * ref.total_ratio

import torch
import tfz.optim
from tfz.nn import FreezableLinear

assert not tfz.optim.NATIVE, "the native AdamW pass is there"
layer = FreezableLinear(4, 3)
opt = torch.optim.AdamW(layer.parameters())
hooks = tfz.optim.attach_row_freezing(opt, layer)
layer(torch.randn(2, 4)).sum().backward()
opt.step()
assert hooks.fused_tensors == 0
print(tfz.plan.__file__)
"""


def test_install_without_a_compiler_plans_with_highs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(path, src / name)
    env = dict(os.environ, CC="/nonexistent/cc", CXX="/nonexistent/c++")
    env.pop("TFZ_SKIP_CPP_BUILD", None)
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--target", str(target), str(src)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    if (
        done.returncode != 0
        and "installing build dependencies" in output.lower()
        and "error" in output.lower()
    ):
        if "Could not find a version" in output or "No matching distribution" in output:
            pytest.skip("no package index for the build requirements (setuptools, pybind11)")
    assert done.returncode == 0, output[-3000:]
    assert "WARNING: tfz.plan._sidesimplex not built" in output
    assert "WARNING: tfz._row_adamw not built" in output
    assert not list(target.rglob("_sidesimplex*")), "a native solver was installed"
    assert not list((target / "tfz").glob("_row_adamw*")), "a native AdamW pass was installed"
    run_env = dict(os.environ, PYTHONPATH=str(target))
    check = subprocess.run(
        [sys.executable, "-c", CHECK], env=run_env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip().startswith(str(target)), check.stdout
