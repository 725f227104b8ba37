"""Optimizer semantics of row freezing, for torch's own optimizers (``tfz.optim``).

:func:`attach_row_freezing` registers step pre/post hooks on an optimizer. Per FreezableLinear of the
model it reads the layer's ``row_usage`` (which rows received a weight-gradient contribution since
the last step) and guarantees:

- **Rows frozen in every microbatch of the step** keep their weight and optimizer state bit for bit:
  no momentum / moment update, no weight decay. The bias entry of such a row is treated the same way.
  The rows are snapshotted before ``optimizer.step()`` and restored after it. A layer frozen in every
  microbatch has ``.grad is None``, so torch skips it on its own (and does not advance its step).
- **Rows frozen in only some microbatches** get the sum of their gradients over the microbatches in
  which they were active: no rescaling by default (the TimelyFreeze choice). With ``rescale=True`` each
  row's gradient is multiplied by ``calls / active_calls`` (microbatches through the layer / those in
  which the row was active), making it an unbiased estimate of the full sum.
- ``step_scale`` (s) scales the step a partly frozen row takes by ``(calls / active_calls) ** s``:
  after the optimizer's step the row is set to ``before + factor * (after - before)``, its optimizer
  state as the step left it. Adam normalises each gradient by its running RMS, and a row's gradient
  from k of n microbatches carries about n/k times the noise variance of one from all n, so where
  noise dominates the row moves about sqrt(k/n) as far along the signal per step: ``s = 0.5`` gives
  that back (``tfz demo``'s setting, chosen by measurement: bench/RESULTS.md). ``s = -1`` scales the
  step by the row's share of the data. 0 (default) leaves the optimizer's step.
- Per-tensor scalar state advances whenever some row of the tensor is active, e.g. Adam's ``step``:
  a row that wakes up after being frozen uses the tensor's bias correction with its own (older)
  moments.
- When a parameter's state is created by a step in which some of its rows are frozen, those rows of
  its state tensors are set to zero: the initial value of Adam/AdamW/RMSprop moments; for SGD
  momentum, a zero buffer then gives ``momentum * 0 + grad``, which equals torch's first-step
  ``clone(grad)`` when ``dampening == 0``. (Optimizers with non-zero lazy initial state, such as
  Rprop's ``step_size``, see zeros there.)
- Layers with no backward through them since the last step (``row_usage.calls == 0``) are left to the
  optimizer unchanged, as are all other parameters.

For a plain ``torch.optim.AdamW`` all of this runs in one pass per FreezableLinear tensor
(:mod:`tfz.optim.row_adamw`: C++ on CPU, a Triton kernel on CUDA without host synchronisation); the
hooks around torch's step serve every other optimizer and setting (``fused=False`` forces them).

Supported optimizers are those whose per-parameter state tensors are scalars or have the parameter's
shape (SGD, Adam, AdamW, Adagrad, RMSprop, ...); other state layouts raise TypeError. Several
optimizers may share a model if each FreezableLinear's trainable weight and bias are in one of them
(ValueError otherwise): each step resets the usage of its own layers only. Usage is reset
after each step; call :meth:`RowFreezing.reset` (or ``tfz.nn.reset_row_usage``) when a step is skipped
(e.g. by a GradScaler on overflow). Weights tied to other modules are not supported.
"""

from tfz.optim.row_adamw import NATIVE
from tfz.optim.row_freezing import RowFreezing, attach_row_freezing

__all__ = ["NATIVE", "RowFreezing", "attach_row_freezing"]
