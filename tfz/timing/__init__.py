"""Timing of pipeline actions on CUDA streams (``tfz.timing``).

``ActionTimer`` records a start and an end per ``with timer.action("3W5"): ...`` block into a stream
timer and resolves them in one batch (one synchronisation per stream) on ``collect()``:

- "cuda-events": native ``tfz._C.StreamTimer`` with a pre-created CUDA event pool (libcudart loaded at
  run time);
- "native-host": the same native timer on the host steady clock (no GPU, or TFZ_TIMER_FORCE_CPU=1);
- "python": pure Python when ``tfz._C`` is not built or TFZ_FORCE_SKIP_CPP=1 (``time.perf_counter_ns``,
  or ``torch.cuda.Event`` on CUDA devices); warns once when the native module is missing.

``import tfz.timing`` does not import torch; it is imported when a CUDA device is requested.
"""

from tfz.timing._backend import BACKENDS, backend
from tfz.timing._pytimers import PythonHostTimer, TorchEventTimer
from tfz.timing.action import ActionSpan, ActionTimer

__all__ = ["BACKENDS", "ActionSpan", "ActionTimer", "PythonHostTimer", "TorchEventTimer", "backend"]
