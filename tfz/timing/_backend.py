"""Which stream timer is active: the native ``tfz._C`` or a pure-Python fallback.

Environment (switches read by ``tfz._validate.env_flag``: 1/true/yes/on, 0/false/no/off or empty,
anything else is a ValueError naming the variable):
- ``TFZ_FORCE_SKIP_CPP=1``: never use ``tfz._C`` (pure Python, no warning);
- ``TFZ_TIMER_FORCE_CPU=1``: host clock even for CUDA devices (native or Python);
- ``TFZ_CUDART_PATH``: libcudart file for ``tfz._C`` (see csrc/timer.cpp).

torch is imported only when a CUDA device is requested (or already imported by the caller).
"""

from __future__ import annotations

import sys
import warnings

from tfz._validate import env_flag, is_int
from tfz.timing._pytimers import PythonHostTimer, TorchEventTimer, check_capacity

__all__ = ["BACKENDS", "backend", "make_stream_timer", "native_module", "resolve_device"]

BACKENDS = ("cuda-events", "native-host", "python")

_state = {"module": None, "error": None, "warned": set()}


def _warn_once(key: str, message: str) -> None:
    if key not in _state["warned"]:
        _state["warned"].add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def native_module():
    """``tfz._C`` or None (forced off by TFZ_FORCE_SKIP_CPP=1, or not built: warns once)."""
    if env_flag("TFZ_FORCE_SKIP_CPP"):
        return None
    if _state["module"] is None and _state["error"] is None:
        try:
            from tfz import _C
        except ImportError as exc:
            _state["error"] = exc
        else:
            _state["module"] = _C
    if _state["module"] is None:
        _warn_once(
            "missing",
            f"tfz._C (native stream timer) is not available ({_state['error']}); using Python timing. "
            "Rebuild with `pip install -e . --no-build-isolation` (needs a C++ compiler and pybind11).",
        )
    return _state["module"]


def resolve_device(device) -> int | None:
    """CUDA device index for ``device``, or None for host timing.

    None: CUDA (current device) when torch is already imported and sees a GPU, else host; "cpu": host;
    "cuda", "cuda:N", N (int) or a torch.device: that CUDA device (ValueError when CUDA is unavailable).
    """
    if device is None:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return None
        return torch.cuda.current_device()
    kind, index = _parse_device(device)
    if kind == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but torch.cuda.is_available() is False")
    count = torch.cuda.device_count()
    if index is None:
        index = torch.cuda.current_device()
    if not 0 <= index < count:
        raise ValueError(f"device={device!r} out of range: {count} CUDA device(s)")
    return index


def _parse_device(device) -> tuple[str, int | None]:
    if is_int(device):
        if device < 0:
            raise ValueError(f"device index must be >= 0, got {device}")
        return "cuda", int(device)
    if isinstance(device, str):
        kind, _, index = device.partition(":")
        if kind == "cpu" and not index:
            return "cpu", None
        if kind == "cuda" and (not index or index.isdigit()):
            return "cuda", int(index) if index else None
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    kind = getattr(device, "type", None)
    if kind in ("cpu", "cuda"):
        return kind, getattr(device, "index", None)
    raise TypeError(f"device must be None, 'cpu', 'cuda[:N]', an int or a torch.device, got {device!r}")


def _choose(index: int | None) -> str:
    native = native_module()
    host = env_flag("TFZ_TIMER_FORCE_CPU")  # read (and checked) for every device
    if index is None or host:
        return "native-host" if native is not None else "python"
    if native is None:
        return "python"
    info = native.runtime_info()
    if info["clock"] == "cuda-events":
        return "cuda-events"
    _warn_once(
        "no-cudart",
        f"tfz._C cannot use CUDA events ({info['reason']}); timing with torch.cuda.Event instead.",
    )
    return "python"


def backend(device=None) -> str:
    """Backend an ``ActionTimer(device)`` uses: "cuda-events" (native CUDA events), "native-host"
    (native steady clock) or "python" (``time.perf_counter_ns``, or ``torch.cuda.Event`` on CUDA)."""
    return _choose(resolve_device(device))


def make_stream_timer(device, capacity: int):
    """``(timer, backend name, CUDA device index or None for a host clock)`` for ``device``."""
    capacity = check_capacity(capacity)
    index = resolve_device(device)
    name = _choose(index)
    if name == "cuda-events":
        timer = native_module().StreamTimer(capacity, clock="cuda-events", device=index)
    elif name == "native-host":
        timer, index = native_module().StreamTimer(capacity, clock="host"), None
    elif index is not None and not env_flag("TFZ_TIMER_FORCE_CPU"):
        timer = TorchEventTimer(capacity, device=index)
    else:
        timer, index = PythonHostTimer(capacity), None
    return timer, name, index
