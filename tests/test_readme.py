"""Every Python snippet of README.md runs, with a prelude defining the names a snippet leaves to the
reader; the pipeline snippets run on 2 gloo ranks. A new snippet fails the test until it is listed here.
(The quick start's shell commands are checked by hand from a clean clone.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


ROWS_PRELUDE = """
import torch
from torch import nn
torch.manual_seed(0)
stage_module = nn.Sequential(nn.Linear(8, 128), nn.Tanh(), nn.Linear(128, 8))
x = torch.randn(4, 8)
loss = stage_module(x).square().mean()
outputs = stage_module(x)
grads = torch.ones_like(outputs)
"""

KERNEL_PRELUDE = """
import torch
x, dy = torch.randn(6, 5), torch.randn(6, 4)
mask = torch.tensor([True, False, True, True])
weight = torch.nn.Parameter(torch.randn(4, 5))
weight.main_grad = torch.zeros(4, 5)
"""


def find(marker: str) -> str:
    found = [s for s in snippets() if marker in s]
    assert len(found) == 1, f"README has {len(found)} snippets with {marker!r}"
    return found[0]


MARKERS = {
    "plan": "from tfz.schedule import build_schedule, dump_csv",
    "rows": "model = tfz.nn.convert_to_freezable(stage_module)",
    "pipeline": 'schedule = build_schedule("zbv"',
    "engine": "pp_schedule, model_parts, _, _ = pipeline_llm(",
    "kernel": "from tfz.kernels import wgrad, wgrad_gemm_accum_fp32",
}


def test_every_snippet_is_covered():
    unknown = [s.splitlines()[0] for s in snippets() if not any(m in s for m in MARKERS.values())]
    assert not unknown, f"README snippets without a test: {unknown}"


def test_simulate_and_plan_snippet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(find(MARKERS["plan"]), namespace)
    assert namespace["plan"].makespan_planned <= namespace["plan"].makespan_unfrozen
    assert (tmp_path / "step.png").exists() and (tmp_path / "zbh1.csv").exists()


def test_row_freezing_snippet():
    namespace: dict = {}
    exec(ROWS_PRELUDE + find(MARKERS["rows"]), namespace)
    assert namespace["m"].frozen_fraction > 0


def test_kernel_snippet():
    namespace: dict = {}
    exec(KERNEL_PRELUDE + find(MARKERS["kernel"]), namespace)
    assert namespace["dW"][1].abs().max() == 0  # frozen row


@pytest.mark.distributed
def test_pipeline_snippet_on_two_ranks():
    from _pipe_workers import gloo_runs_v_placements
    from _readme_ranks import PIPELINE_PRELUDE, run_snippet

    from tfz.pipeline import launch

    if not gloo_runs_v_placements():
        pytest.skip("this torch cannot run V placements on gloo")
    r0, r1 = launch(run_snippet, 2, PIPELINE_PRELUDE, find(MARKERS["pipeline"]), timeout=600)
    assert (r0["local"], r1["local"]) == ([0, 3], [1, 2])  # stages, not ranks
    assert r0["plan"] and r1["plan"], "no plan applied within the snippet's 26 steps"
    assert r0["freeze_aware"] and r0["schedule"] == "zbv"


@pytest.mark.distributed
def test_engine_snippet_on_two_ranks():
    from _readme_ranks import TORCHTITAN_PRELUDE, run_snippet

    from tfz.pipeline import launch

    code = find(MARKERS["engine"]).replace("pipeline_llm(model, ...)", "pipeline_llm(model)")
    r0, r1 = launch(run_snippet, 2, TORCHTITAN_PRELUDE, code, timeout=300)
    assert r0["freeze_aware"] and r1["freeze_aware"]
    assert r0["schedule"] == "1f1b" and (r0["local"], r1["local"]) == ([0], [1])
