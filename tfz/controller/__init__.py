"""The TimelyFreeze controller (``tfz.controller``): phases, measuring, solving, re-planning.

:class:`TimelyFreeze` is the :class:`tfz.masks.MaskProvider` of one pipeline rank. It warms up,
measures every action unfrozen and partly frozen (fitting its time as a line in the active fraction
of its W FLOPs, while every step still trains), solves the freeze-ratio LP (:mod:`tfz.plan`) on one
rank beside training, ramps the plan in, re-plans when measured times drift, and checkpoints all of
it (:meth:`TimelyFreeze.state_dict`, one :class:`~tfz.controller.state.ControllerState`, validated
whole before it loads). :class:`TimelyFreezeConfig` holds the knobs, with the paper's experiment
defaults; ``TimelyFreezeConfig.for_run(total_steps)`` fits them to a short run. Selection policies
plug in through :mod:`tfz.controller.policy`.

Training-loop protocol, per optimizer step::

    # the pipeline runtime calls controller.masks_for(stage, mb) before each backward
    start = time.perf_counter()
    schedule.step(...)
    batch_ms = (time.perf_counter() - start) * 1e3
    optimizer.step()
    controller.observe(step)                   # metric policies (APF, AutoFreeze) update here
    optimizer.zero_grad()
    controller.step_end(step, timer.collect(), batch_ms=batch_ms)  # action and batch times (ms)
"""

from tfz.controller.config import TimelyFreezeConfig
from tfz.controller.policy import ObservingPolicy, StatefulPolicy
from tfz.controller.timely import Phase, TimelyFreeze

__all__ = ["ObservingPolicy", "Phase", "StatefulPolicy", "TimelyFreeze", "TimelyFreezeConfig"]
