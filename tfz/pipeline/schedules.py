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

    if not stages:
        raise ValueError("stages must hold this rank's PipelineStage objects, got none")
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


def torch_schedule_stages(schedule) -> list:
    """This rank's stages of a torch schedule object (e.g. the one torchtitan's ``pipeline_llm``
    returns), in the schedule's order: ``[make_freeze_aware(s, ...) for s in torch_schedule_stages(pp)]``."""
    return _torch_compat.schedule_stages(schedule)
