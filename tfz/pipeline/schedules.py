"""Build torch's runtime schedule for a tfz schedule name over this rank's stages."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from tfz import _torch_compat
from tfz.schedule import SCHEDULES, Schedule, dump_csv
from tfz.schedule.torch_io import TORCH_NAMES

__all__ = ["TORCH_SCHEDULE_CLASSES", "build_torch_schedule", "torch_schedule_stages"]

TORCH_SCHEDULE_CLASSES = {tfz_name: cls for cls, tfz_name in TORCH_NAMES.items()}
"""tfz schedule name -> torch schedule class name. ``zbh1`` has no torch class: it runs on
``_PipelineScheduleRuntime`` from a CSV written by tfz."""


def build_torch_schedule(
    schedule: Schedule,
    stages: Sequence[Any],
    loss_fn: Callable,
    *,
    scale_grads: bool = True,
    csv_dir: str | os.PathLike | None = None,
):
    """A torch schedule object that runs ``schedule`` with this rank's ``stages`` (PipelineStage objects,
    ascending stage index; one for single-stage schedules).

    Schedules torch ships use their own class (tfz's orders equal what they execute); ``zbh1`` and any
    custom schedule (``schedule.name`` not a torch class) are dumped to a compute-only CSV (in ``csv_dir``
    or a temporary folder) and loaded into ``_PipelineScheduleRuntime``.
    """
    from torch.distributed.pipelining import schedules

    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a tfz Schedule, got {type(schedule).__name__}")
    if not stages:
        raise ValueError("stages must hold this rank's PipelineStage objects, got none")
    base = _torch_compat.stage_base_class()
    for i, stage in enumerate(stages):
        if not isinstance(stage, base):
            raise TypeError(
                f"stages[{i}] must be a torch pipeline stage (PipelineStage), got {type(stage).__name__}"
            )
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    _check_stages(schedule, stages)
    n = schedule.num_microbatches
    name = TORCH_SCHEDULE_CLASSES.get(schedule.name)
    if name is not None:
        cls = getattr(schedules, name)
        single = issubclass(cls, schedules.PipelineScheduleSingle)
        if single and len(stages) != 1:
            raise ValueError(f"{schedule.name} runs one stage per rank, got {len(stages)} stages")
        target = stages[0] if single else list(stages)
        return cls(target, n, loss_fn=loss_fn, scale_grads=scale_grads)
    if schedule.name not in SCHEDULES and schedule.placement != "custom":
        raise ValueError(f"unknown schedule {schedule.name!r}")
    rank = stages[0].group_rank
    folder = csv_dir if csv_dir is not None else tempfile.mkdtemp(prefix="tfz-schedule-")
    path = os.path.join(folder, f"{schedule.name}_rank{rank}.csv")
    dump_csv(schedule, path)
    runtime_class = _torch_compat.runtime_schedule_class()
    runtime = runtime_class(list(stages), n, loss_fn=loss_fn, scale_grads=scale_grads)
    _torch_compat.load_schedule_csv(runtime, path)
    return runtime


def _check_stages(schedule: Schedule, stages: Sequence[Any]) -> None:
    """Refuse stages that do not match ``schedule`` on their rank: torch would wait for messages that
    never come (a hang until the collectives' timeout) or fail on an assertion inside a step."""
    from tfz.pipeline.stage import check_microbatches

    rank = stages[0].group_rank
    if not 0 <= rank < schedule.num_ranks:
        raise ValueError(
            f"schedule {schedule.name!r} has {schedule.num_ranks} ranks, got stages of rank {rank}"
        )
    for i, stage in enumerate(stages):
        if stage.num_stages != schedule.num_stages:
            raise ValueError(
                f"stages[{i}] (stage {stage.stage_index}) was built with num_stages={stage.num_stages}, "
                f"but schedule {schedule.name!r} has {schedule.num_stages} stages"
            )
    got, want = [s.stage_index for s in stages], list(schedule.stages_of(rank))
    if got != want:
        raise ValueError(
            f"schedule {schedule.name!r} runs stages {want} on rank {rank} (in this order), got stages {got}"
        )
    for stage in stages:
        state = getattr(stage, "tfz", None)
        if state is not None:
            check_microbatches(stage.stage_index, state.provider, schedule.num_microbatches)


def torch_schedule_stages(schedule) -> list:
    """This rank's stages of a torch schedule object (e.g. the one torchtitan's ``pipeline_llm``
    returns), in the schedule's order: ``[make_freeze_aware(s, ...) for s in torch_schedule_stages(pp)]``."""
    return _torch_compat.schedule_stages(schedule)
