"""Freeze-aware pipeline runtime on ``torch.distributed.pipelining`` (``tfz.pipeline``).

- :func:`make_freeze_aware` / :class:`FreezeAwareStage`: stages that apply a mask provider's
  freezing per (stage, microbatch), time every F/B/I/W action and count skipped W FLOPs
  (:mod:`tfz.pipeline.stage`, :mod:`tfz.pipeline.engine`);
- :class:`FixedMasks`, :class:`RatioMasks`: simple mask providers;
- :func:`launch`, :func:`run_from_env`: spawn ranks with failure propagation and a watchdog that
  names a rank that hangs (:func:`heartbeat`, :class:`RankHangError`), or run under torchrun;
- :func:`build_torch_schedule`: torch's schedule object for a tfz schedule (CSV runtime for zbh1);
  :func:`torch_schedule_stages`: the stages of a torch schedule someone else built.

The stage names load on first access (they import ``torch.distributed.pipelining``).
"""

from __future__ import annotations

import importlib

from tfz.pipeline.counters import MicrobatchStats, StageStats
from tfz.pipeline.launch import RankError, RankHangError, heartbeat, launch, run_from_env
from tfz.pipeline.providers import FixedMasks, RatioMasks

__all__ = [
    "FixedMasks",
    "FreezeAwareStage",
    "FreezeState",
    "MicrobatchStats",
    "RankError",
    "RankHangError",
    "RatioMasks",
    "StageStats",
    "build_torch_schedule",
    "heartbeat",
    "launch",
    "make_freeze_aware",
    "run_from_env",
    "torch_schedule_stages",
]

_LAZY = {
    "FreezeAwareStage": "tfz.pipeline.stage",
    "FreezeState": "tfz.pipeline.stage",
    "make_freeze_aware": "tfz.pipeline.stage",
    "build_torch_schedule": "tfz.pipeline.schedules",
    "torch_schedule_stages": "tfz.pipeline.schedules",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'tfz.pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
