"""How selection policies plug into the controller.

The controller takes any :class:`tfz.masks.SelectionPolicy` (``rank(units, *, stage, microbatch, rng)``):
the LP decides *how much* of each (stage, microbatch) to freeze, the policy decides *which* units.
A policy may also implement either or both of the optional protocols below; the controller detects
them with ``isinstance`` and forwards:

- :class:`ObservingPolicy`: ``observe(step, stage_modules)``. The training loop calls
  ``TimelyFreeze.observe(step)`` once per optimizer step, after ``optimizer.step()`` and before
  ``zero_grad()`` (weights updated, gradients still present), and the controller passes it on with
  this rank's ``{stage: module}``. Metric policies (APF, AutoFreeze) update their statistics here.
- :class:`StatefulPolicy`: ``state_dict()`` / ``load_state_dict(state)``. The policy's state is stored
  under ``"policy"`` in the controller's state dict and restored with it.

Masks only change at the controller's decision steps (every ``check_every`` steps), so a metric
policy's new statistics take effect at the next redraw. A policy must rank deterministically from
its own state and ``rng``; its state must agree on every process that holds the same stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["ObservingPolicy", "StatefulPolicy"]


@runtime_checkable
class ObservingPolicy(Protocol):
    """A policy that watches training (see the module docstring for when it is called)."""

    def observe(self, step: int, stage_modules: Mapping[int, Any]) -> None: ...


@runtime_checkable
class StatefulPolicy(Protocol):
    """A policy whose state is checkpointed with the controller."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
