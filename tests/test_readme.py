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
import numpy as np
import torch
x, dy = torch.randn(6, 5, device=DEVICE), torch.randn(6, 4, device=DEVICE)
mask_numpy = np.array([True, False, True, True])
weight = torch.nn.Parameter(torch.randn(4, 5, device=DEVICE))
weight.main_grad = torch.zeros(4, 5, device=DEVICE)
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
    "kernel": "from tfz.kernels import ActiveRows, tune, wgrad, wgrad_gemm_accum_fp32",
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


def test_kernel_snippet(tmp_path, monkeypatch):
    """On the CPU the snippet's masks live there, and tune (which measures on a GPU) is left out."""
    torch = pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)  # tune's cache file
    code = find(MARKERS["kernel"])
    if not torch.cuda.is_available():
        code = code.replace('"cuda"', '"cpu"')
        code = "\n".join(line for line in code.splitlines() if not line.startswith("tune("))
    namespace: dict = {"DEVICE": "cuda" if torch.cuda.is_available() else "cpu"}
    exec(KERNEL_PRELUDE + code, namespace)
    assert namespace["dW"][1].abs().max() == 0  # frozen row
    main_grad = namespace["weight"].main_grad
    assert main_grad[1].abs().max() == 0 and main_grad[0].abs().max() > 0


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


def _table_rows(text: str) -> dict[str, list[str]]:
    """Method name -> cells of each markdown table row that starts with a demo method."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ("none", "timelyfreeze"):
            rows.setdefault(cells[0], cells)
    return rows


def test_demo_table_is_the_reported_run():
    """README's demo table is copied from docs/demo/report.md (the run whose plots it shows): every cell
    of its rows is a cell of the report's row for the same method."""
    readme = _table_rows((ROOT / "README.md").read_text())
    report = _table_rows((ROOT / "docs" / "demo" / "report.md").read_text())
    assert set(readme) == {"none", "timelyfreeze"}
    for name, cells in readme.items():
        missing = [c for c in cells if c not in report[name]]
        assert not missing, f"README's {name} row has cells the report lacks: {missing}"
