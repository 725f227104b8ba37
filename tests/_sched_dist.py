"""Spawned gloo workers for the schedule tests: run torch pipeline schedules on CPU and record what runs.

Each rank builds the same small float64 MLP (seeded), keeps its stage slice, wraps it in a
``PipelineStage`` subclass that logs every compute call, runs one training step and writes
``rank<r>.json`` with the logged actions and its stage gradients. The parent compares the logs with
tfz's orders and the gradients with plain autograd on the whole model (:func:`reference_grads`).
"""

from __future__ import annotations

WIDTH = 8
LAYERS_PER_STAGE = 2
ROWS_PER_MICROBATCH = 2


def make_model(num_stages: int):
    """float64 [Linear(8, 8), Tanh] * (2 * num_stages), identical on every process."""
    import torch

    torch.manual_seed(1234)
    layers = []
    for _ in range(LAYERS_PER_STAGE * num_stages):
        layers += [torch.nn.Linear(WIDTH, WIDTH, dtype=torch.float64), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers)


def stage_slice(model, stage: int):
    """The layers of ``stage`` (a view sharing parameters with ``model``)."""
    per = 2 * LAYERS_PER_STAGE
    return model[stage * per : (stage + 1) * per]


def make_batch(microbatches: int):
    """x, y: float64 [microbatches * 2, 8]."""
    import torch

    g = torch.Generator().manual_seed(99)
    n = microbatches * ROWS_PER_MICROBATCH
    return (
        torch.randn(n, WIDTH, dtype=torch.float64, generator=g),
        torch.randn(n, WIDTH, dtype=torch.float64, generator=g),
    )


def reference_grads(num_stages: int, microbatches: int) -> dict[int, list[list[float]]]:
    """Per stage, flattened parameter grads of the mean over microbatches of each microbatch's MSE."""
    import torch.nn.functional as F

    model = make_model(num_stages)
    x, y = make_batch(microbatches)
    loss = sum(F.mse_loss(model(xm), ym) for xm, ym in zip(x.chunk(microbatches), y.chunk(microbatches)))
    (loss / microbatches).backward()
    return {
        s: [p.grad.reshape(-1).tolist() for p in stage_slice(model, s).parameters()]
        for s in range(num_stages)
    }


def _recording_stage_class():
    from torch.distributed.pipelining import PipelineStage

    class RecordingStage(PipelineStage):
        """A PipelineStage that logs ``<stage><F|B|I|W><mb>`` for every compute call, in call order."""

        log: list[str]

        def forward_one_chunk(self, fwd_chunk_id, *args, **kwargs):
            self.log.append(f"{self.stage_index}F{fwd_chunk_id}")
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

        def backward_one_chunk(self, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
            self.log.append(f"{self.stage_index}{'B' if full_backward else 'I'}{bwd_chunk_id}")
            return super().backward_one_chunk(
                bwd_chunk_id, loss=loss, full_backward=full_backward, last_backward=last_backward
            )

        def backward_weight_one_chunk(self, bwd_chunk_id, last_backward=False):
            self.log.append(f"{self.stage_index}W{bwd_chunk_id}")
            return super().backward_weight_one_chunk(bwd_chunk_id, last_backward=last_backward)

    return RecordingStage


def _run(rank: int, world: int, run: dict) -> dict:
    """One training step of ``run`` on this rank (one stage per rank)."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.pipelining import schedules

    M = run["microbatches"]
    model = make_model(world)
    stage = _recording_stage_class()(stage_slice(model, rank), rank, world, torch.device("cpu"))
    stage.log = []
    loss_fn = lambda out, target: F.mse_loss(out, target)  # noqa: E731
    if run["kind"] == "csv":
        sched = schedules._PipelineScheduleRuntime([stage], M, loss_fn=loss_fn)
        sched._load_csv(run["path"])
    else:
        sched = schedules.get_schedule_class(run["schedule"])(stage, M, loss_fn=loss_fn)
    x, y = make_batch(M)
    losses: list = []
    args = (x,) if rank == 0 else ()
    kwargs = {"target": y, "losses": losses} if rank == world - 1 else {}
    sched.step(*args, **kwargs)
    return {
        "log": stage.log,
        "grads": [p.grad.reshape(-1).tolist() for p in stage.submod.parameters()],
        "losses": [float(v.detach()) for v in losses],
    }


def _rank(rank: int, world: int, runs: list[dict]) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    return [_run(rank, world, run) for run in runs]


def spawn(runs: list[dict], world: int, timeout: float = 60.0) -> list[list[dict]]:
    """Run ``runs`` on ``world`` spawned gloo ranks; results[rank][run]. Raises (never hangs) on a
    timeout or a rank's error, with that rank's traceback (``tfz.pipeline.launch``)."""
    from tfz.pipeline import launch

    return launch(_rank, world, runs, timeout=timeout, init_timeout=30)
