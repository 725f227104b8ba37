"""tfz: pipeline-aware parameter freezing for torch.distributed.pipelining.

The data path, lowest layer first:

``tfz.schedule`` (per-rank action orders) -> ``tfz.dag`` (dependencies, simulation) ->
``tfz.plan`` (freeze-ratio LP) -> ``tfz.masks`` (ratios -> row-block masks) ->
``tfz.nn`` + ``tfz.kernels`` (FreezableLinear, masked wgrad) ->
``tfz.pipeline`` / ``tfz.controller`` / ``tfz.timing`` (runtime) -> ``tfz`` CLI.

``import tfz`` is cheap: it imports neither torch's CUDA runtime nor triton. Submodules load on
first attribute access.
"""

import importlib

from tfz._version import __version__

_SUBMODULES = (
    "schedule",
    "dag",
    "profile",
    "timeline",
    "plan",
    "masks",
    "nn",
    "kernels",
    "optim",
    "timing",
    "pipeline",
    "controller",
    "metrics",
    "models",
)

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"tfz.{name}")
    raise AttributeError(f"module 'tfz' has no attribute {name!r}")
