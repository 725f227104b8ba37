"""tfz's ZB-H1, exported as torch's compute-only CSV, runs one training step on torch's
_PipelineScheduleRuntime with 2 gloo ranks on CPU, in tfz's order and with exact gradients."""

import numpy as np
import pytest
from _sched_dist import make_batch, make_model, reference_grads, spawn

from tfz.schedule import build_schedule
from tfz.schedule.csv_io import dump_csv

pytest.importorskip("torch")

MICROBATCHES = (4, 3, 1)


@pytest.mark.distributed
def test_zbh1_csv_runs_on_torch_runtime(tmp_path):
    runs, schedules = [], []
    for M in MICROBATCHES:
        sched = build_schedule("zbh1", 2, M)
        path = tmp_path / f"zbh1_m{M}.csv"
        dump_csv(sched, path)
        runs.append({"kind": "csv", "path": str(path), "microbatches": M})
        schedules.append(sched)
    results = spawn(runs, 2)

    import torch.nn.functional as F

    for i, (M, sched) in enumerate(zip(MICROBATCHES, schedules)):
        ref = reference_grads(2, M)
        for r in range(2):
            got = results[r][i]
            # the runtime called the stage methods in exactly tfz's order (F, I, W; no B)
            assert got["log"] == [str(a) for a in sched.orders[r]], f"M={M} rank {r}"
            assert len(got["grads"]) == len(ref[r]) == 2 * 2  # two Linear layers: weight, bias
            for g, g_ref in zip(got["grads"], ref[r]):
                np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-10)
        # the last rank's per-microbatch losses are the plain forward's
        model = make_model(2)
        x, y = make_batch(M)
        expected = [float(F.mse_loss(model(a), b).detach()) for a, b in zip(x.chunk(M), y.chunk(M))]
        np.testing.assert_allclose(results[1][i]["losses"], expected, rtol=1e-12)
