"""Every private torch API tfz uses, in one place.

torch gives no stability promise for these names (underscored, or members of underscored classes), so
tfz reaches them only through this module, and ``tests/test_torch_compat.py`` checks each one against
the installed torch: when a torch release renames or reshapes one, that test names the API and the
torch version. :data:`PRIVATE_APIS` lists them with what tfz relies on. torch is imported inside the
functions, so importing this module imports nothing.

Tested with torch 2.11 (oldest: ``bash .ci/oldest-torch``) to 2.13; pyproject caps torch at the
newest version tested.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

__all__ = [
    "PRIVATE_APIS",
    "STAGE_BACKWARD_FUNCTIONS",
    "STAGE_COMM_METHODS",
    "TorchCompatError",
    "cuda_raw_stream_getter",
    "load_schedule_csv",
    "run_schedule_loop",
    "runtime_schedule_class",
    "schedule_base_class",
    "schedule_stages",
    "set_stage_backward",
    "split_backward_functions",
    "stage_backward",
    "stage_base_class",
    "tls_get",
    "tls_has",
    "tls_remove",
    "tls_stash",
    "tls_supported",
    "will_engine_execute_node",
]

PRIVATE_APIS: dict[str, str] = {
    "torch.distributed.pipelining.stage._PipelineStageBase": (
        "base class of PipelineStage and the tracer's _PipelineStage; tfz overrides forward_one_chunk, "
        "backward_one_chunk, backward_weight_one_chunk, backward_maybe_with_nosync and "
        "clear_runtime_states, and reads submod, stage_index, fwd_cache, has_backward, dw_builder"
    ),
    "torch.distributed.pipelining.stage.stage_backward{,_input,_weight}": (
        "module-level functions the stage calls for B / I / W; tfz wraps them (same leading parameters)"
    ),
    "torch.distributed.pipelining._backward.stage_backward_{input,weight}": (
        "torch's own I/W split, probed once for custom autograd.Function support"
    ),
    "torch.distributed.pipelining.schedules._PipelineSchedule": "base class of every torch schedule",
    "torch.distributed.pipelining.schedules._PipelineScheduleRuntime": (
        "runtime schedule that runs a compute-only CSV (_load_csv); tfz runs zbh1 and custom orders on it"
    ),
    "torch schedules' _step_microbatches / _stage(s)_forward_initialized / _stage / _stages": (
        "a schedule's step loop, run with recording stages to read its executed order; its stages"
    ),
    "torch._C._will_engine_execute_node": "whether the running backward needs a graph node (skips dW)",
    "torch._C._{stash,get,is_key_in,remove}_obj{_in,_from}_tls": (
        "Python objects in torch's C++ thread-local state, copied into autograd's worker threads"
    ),
    "torch._C._cuda_getCurrentRawStream": "the current CUDA stream handle without a Stream object",
}
"""Private API -> what tfz relies on (documentation; the checks are in tests/test_torch_compat.py)."""


class TorchCompatError(RuntimeError):
    """The installed torch lacks (or changed) a private API tfz relies on."""


def _version() -> str:
    import torch

    return torch.__version__


def _missing(api: str, detail: str) -> TorchCompatError:
    return TorchCompatError(
        f"torch {_version()} changed {api}: {detail}. tfz is tested with torch 2.11-2.13; "
        "install one of those (see tfz/_torch_compat.py)"
    )


# ---------------------------------------------------------------- pipelining stages


def stage_base_class() -> type:
    """``torch.distributed.pipelining.stage._PipelineStageBase``."""
    from torch.distributed.pipelining import stage

    cls = getattr(stage, "_PipelineStageBase", None)
    if cls is None:
        raise _missing("torch.distributed.pipelining.stage._PipelineStageBase", "the class is gone")
    return cls


STAGE_BACKWARD_FUNCTIONS = {
    "stage_backward": ("stage_output", "output_grads", "input_values"),
    "stage_backward_input": ("stage_outputs_or_loss", "output_grads", "input_values"),
    "stage_backward_weight": (),
}
"""Module-level functions of ``torch.distributed.pipelining.stage`` that run B, I and W, with the
leading parameter names tfz binds (W's arguments are not read)."""


def stage_backward(name: str) -> Callable:
    """The current ``torch.distributed.pipelining.stage.<name>`` (possibly tfz's wrapper)."""
    from torch.distributed.pipelining import stage

    if name not in STAGE_BACKWARD_FUNCTIONS:
        raise ValueError(f"not a stage backward function: {name!r}")
    fn = getattr(stage, name, None)
    if fn is None:
        raise _missing(f"torch.distributed.pipelining.stage.{name}", "the function is gone")
    return fn


def set_stage_backward(name: str, fn: Callable) -> None:
    """Replace ``torch.distributed.pipelining.stage.<name>`` (the stage looks it up at each call)."""
    from torch.distributed.pipelining import stage

    stage_backward(name)  # checks it exists
    setattr(stage, name, fn)


def split_backward_functions() -> tuple[Callable, Callable]:
    """torch's own ``(stage_backward_input, stage_backward_weight)`` of ``pipelining._backward``."""
    from torch.distributed.pipelining import _backward

    try:
        return _backward.stage_backward_input, _backward.stage_backward_weight
    except AttributeError as exc:
        raise _missing("torch.distributed.pipelining._backward", str(exc)) from None


STAGE_COMM_METHODS = (
    "get_fwd_recv_ops",
    "get_fwd_send_ops",
    "get_bwd_recv_ops",
    "get_bwd_send_ops",
    "_get_init_p2p_neighbors_ops",
    "set_local_fwd_input",
    "set_local_bwd_input",
    "get_local_bwd_output",
    "perform_reduce_grad",
    "clear_runtime_states",
)
"""Stage methods torch's schedules call besides compute (``tfz.schedule.torch_io``'s recording stages
stand in for them)."""


# ---------------------------------------------------------------- schedules


def schedule_base_class() -> type:
    """``torch.distributed.pipelining.schedules._PipelineSchedule``."""
    from torch.distributed.pipelining import schedules

    cls = getattr(schedules, "_PipelineSchedule", None)
    if cls is None:
        raise _missing("torch.distributed.pipelining.schedules._PipelineSchedule", "the class is gone")
    return cls


def runtime_schedule_class() -> type:
    """``torch.distributed.pipelining.schedules._PipelineScheduleRuntime``."""
    from torch.distributed.pipelining import schedules

    cls = getattr(schedules, "_PipelineScheduleRuntime", None)
    if cls is None or not callable(getattr(cls, "_load_csv", None)):
        raise _missing(
            "torch.distributed.pipelining.schedules._PipelineScheduleRuntime", "no class with _load_csv"
        )
    return cls


def load_schedule_csv(runtime: Any, path: str) -> None:
    """``runtime._load_csv(path)``: a compute-only CSV (one row per rank) into a runtime schedule."""
    runtime._load_csv(str(path))


def run_schedule_loop(schedule: Any) -> None:
    """Run a schedule's per-step loop once (``_step_microbatches``) with its stages marked initialized,
    so no metadata is exchanged (stand-in stages record the compute calls)."""
    schedule._stage_forward_initialized = True  # single-stage schedules
    schedule._stages_forward_initialized = True  # multi-stage schedules
    schedule._step_microbatches()


def schedule_stages(schedule: Any) -> list:
    """The stages a torch schedule object runs on this rank (``_stage`` of single-stage schedules,
    ``_stages`` of the others)."""
    if not isinstance(schedule, schedule_base_class()):
        raise TypeError(f"expected a torch pipeline schedule object, got {type(schedule).__name__}")
    stages = getattr(schedule, "_stages", None)
    if stages is None:
        single = getattr(schedule, "_stage", None)
        if single is None:
            raise _missing(type(schedule).__name__, "its stages are in neither _stages nor _stage")
        return [single]
    return list(stages)


# ---------------------------------------------------------------- autograd


def will_engine_execute_node(node: Any) -> bool:
    """``torch._C._will_engine_execute_node``: inside a backward, whether the engine runs ``node``.
    Raises RuntimeError where the engine cannot tell (a leaf under ``autograd.grad``)."""
    import torch

    return torch._C._will_engine_execute_node(node)


_TLS_FUNCTIONS = ("_stash_obj_in_tls", "_get_obj_in_tls", "_is_key_in_tls", "_remove_obj_from_tls")


@functools.cache
def tls_supported() -> bool:
    """Whether torch can keep Python objects in its C++ thread-local state (copied into autograd's
    worker threads); without it tfz keeps the state in a Python thread-local only."""
    import torch

    return all(hasattr(torch._C, name) for name in _TLS_FUNCTIONS)


def tls_stash(key: str, value: Any) -> None:
    import torch

    torch._C._stash_obj_in_tls(key, value)


def tls_get(key: str) -> Any:
    import torch

    return torch._C._get_obj_in_tls(key)


def tls_has(key: str) -> bool:
    import torch

    return torch._C._is_key_in_tls(key)


def tls_remove(key: str) -> None:
    import torch

    torch._C._remove_obj_from_tls(key)


# ---------------------------------------------------------------- CUDA


def cuda_raw_stream_getter() -> Callable[[int], int] | None:
    """``torch._C._cuda_getCurrentRawStream`` (device index -> stream handle), None when absent."""
    import torch

    return getattr(torch._C, "_cuda_getCurrentRawStream", None)
