"""``TimelyFreeze``: measure the pipeline, solve the freeze-ratio LP, apply and maintain the plan.

Phases (step counts are optimizer steps from the first ``step_end`` call; lengths from
:class:`~tfz.controller.TimelyFreezeConfig`, W = warmup, M = monitor, K = check_every)::

    WARMUP          [0, W)          nothing frozen, nothing recorded
    MONITOR_UPPER   [W, W+M)        nothing frozen; times recorded (active fraction 1)
    MONITOR_LOWER   [W+M, W+2M)     ``monitoring="partial"``: B/W actions at the ``monitor_ratios``
                                    in turn (default 0 and 0.8: unfrozen and partly frozen
                                    microbatches in every step); ``"frozen"``: every unit frozen but
                                    ``keep_trainable_units`` on the last stage; times recorded
    SOLVING         [W+2M, A)       nothing frozen while the LP runs (rank 0, background thread)
    RAMP            [A, A+ramp)     plan ratios x progress, progress rising linearly to 1
    STABLE          [A+ramp, ...)   plan ratios; re-plan on drift

A is the first decision step (a multiple of K) after the solve was submitted at which the plan is
ready; every rank learns that through a broadcast, so all switch at the same step. The first
``discard_steps`` steps of each monitoring half are not recorded; the last ``window`` recorded steps
count. Bounds: for every local B/W action, ``t = a + b x`` in the active fraction x (the realised,
FLOP-weighted fraction of its stage's units its masks left trainable) is fitted through the medians
of each level (:func:`~tfz.controller.estimates.fit_linear`, the unfrozen half at x = 1; with a 0
in ``monitor_ratios``, an action that ran both unfrozen and partly frozen in the second half's
recorded steps is fitted from those steps alone, both ends measured at the same moments): unfrozen
bound u = a + b, frozen bound l = a. F and I actions keep the median of both halves (of the second
alone with a 0 level) as their fixed time. The bounds of all ranks are gathered as float32.

Gap: when ``step_end`` is given the measured batch time, the unfrozen half also records it; with
the bounds, the ranks agree on the slowest rank's median and fit the time between actions that the
DAG lacks, one overhead g per action (:func:`~tfz.controller.estimates.fit_gap`). The LP and
:meth:`TimelyFreeze.predicted_batch_time` use ``u + g`` and ``l + g``. The stable phase records the
batch times too: the drift check (below) refits g from them. Without batch times g = 0.

Partial monitoring: in the k-th step of the half, microbatch m of a stage runs at ratio
``monitor_ratios[(k + m) % len(monitor_ratios)]``, masks drawn as in the plan's phases (covering or
independent), redrawn every step. Every step trains; with the covering layout every unit of a stage
trains in some microbatch of every step.

Masks: for a local (stage, microbatch) ``tfz.masks.select(units, r * progress, stage, mb,
step=decision, seed, policy)`` with r the plan ratio of its B or W action (or ``select_covering``,
or ``select_row_arcs`` for ``mask_layout="arcs"``, over the stage's microbatches). ``decision``
counts the redraws, which happen at every decision step, at every phase or plan change and at every
step of partial monitoring; each redraw draws the masks
of every local (stage, microbatch) at once (with the policy's state of that moment) and they hold
until the next. Everything the masks depend on (seed, plan, decision, progress, and the policy's
state for its own stages) is the same on every rank, so ranks agree without communication.

Drift (STABLE, ``config.replan``): at each decision step with a full window of steps recorded under
the current plan, each rank sums its actions' times per stage for every step of the window, and its
window medians against the prediction ``u (1 - r) + l r`` per (stage, kind); one all-reduce adds the
sums of all ranks. When a stage's summed time is off the prediction by more than
``drift_threshold`` in at least 3/4 of the window's steps, u and l are refitted from the medians
(:mod:`tfz.controller.estimates`) and rank 0 re-solves warm-started from the current plan, in the
background; the old plan stays in force until the new one is broadcast at a decision step. With
batch times on every rank, the slowest rank's batch of each step is compared likewise with the
simulated batch of the (refitted) times plus g: the time between actions drifted when the batch is
off by more than the threshold in 3/4 of the steps while no stage did (u and l are kept). Either
drift re-plans, and g is refitted (:func:`~tfz.controller.estimates.fit_gap` on the
current ratios' durations, to the slowest rank's median batch) before the solve starts: g measures
the machine, so the prediction of the plan still in force uses it at once.

All of this is one :class:`~tfz.controller.state.ControllerState`, checkpointed by
:meth:`TimelyFreeze.state_dict`.

Without a process group (``group=None``) one process plays every rank: ``step_end`` takes the
timings of every action, ``stage_modules`` holds every stage, and the collectives are skipped.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from tfz._validate import check_int, check_number, is_int, short_repr
from tfz.controller._comm import Comm
from tfz.controller._solve import (
    SolveJob,
    pack_plan,
    packed_size,
    solve_with_retry,
    unpack_plan,
)
from tfz.controller.config import TimelyFreezeConfig
from tfz.controller.estimates import (
    MAX_TIMING_MS,
    assess_drift,
    bound_estimates,
    drift_stats,
    drifting_stages,
    fit_gap,
    fit_linear,
    parse_timings,
    refit,
    stage_sums,
)
from tfz.controller.policy import ObservingPolicy, StatefulPolicy
from tfz.controller.state import NO_MASKS, ControllerState, Layout, Pending, Phase
from tfz.dag import DAG, build_dag, simulate
from tfz.masks import (
    RandomPolicy,
    SelectionPolicy,
    StageMasks,
    StageUnits,
    select,
    select_covering,
    select_row_arcs,
    stage_module,
)
from tfz.plan import Plan, solve
from tfz.schedule import FREEZABLE_KINDS, Schedule

__all__ = ["Phase", "TimelyFreeze"]

logger = logging.getLogger("tfz.controller")


def _policy_kind(policy: Any) -> str:
    """The selection policy a state belongs to: its class, and for a dataclass its fields (a resume
    under another policy would draw other masks)."""
    kind = f"{type(policy).__module__}.{type(policy).__qualname__}"
    return repr(policy) if dataclasses.is_dataclass(policy) else kind


class TimelyFreeze:
    """TimelyFreeze controller of one pipeline rank; a :class:`tfz.masks.MaskProvider`.

    Args:
        config: phases, windows and limits.
        schedule: the pipeline schedule (a :class:`tfz.schedule.Schedule` or its :class:`tfz.dag.DAG`).
        stage_modules: ``{stage: module}`` for this rank's stages (every stage without a group).
            Units are ``StageUnits.from_module(module, block_rows, include_tensors)``.
        group: the pipeline process group (its size is the number of pipeline ranks), or None.
        replica_group: with data parallelism, the group of the ranks that hold this pipeline rank in
            every replica (e.g. ``mesh["dp"].get_group()``). Times are averaged over the replicas
            and replica 0's pipeline rank 0 solves, so every replica runs the same plan and masks
            (DDP and FSDP need the same frozen parameters on every replica).
        policy: which units to freeze first; any :class:`tfz.masks.SelectionPolicy`, optionally also
            :class:`~tfz.controller.ObservingPolicy` / :class:`~tfz.controller.StatefulPolicy`.
            Default :class:`tfz.masks.RandomPolicy`.
        solver: function with :func:`tfz.plan.solve`'s signature (default ``tfz.plan.solve``).

    Per optimizer step the training loop calls :meth:`masks_for` before every backward (through the
    pipeline runtime), :meth:`observe` after ``optimizer.step()`` and :meth:`step_end` with the step's
    action times. All ranks must call ``step_end`` for the same steps: it runs collectives at the
    end of monitoring and at decision steps while a solve is pending or drift is checked.
    """

    def __init__(
        self,
        config: TimelyFreezeConfig,
        schedule: Schedule | DAG,
        stage_modules: Mapping[int, Any],
        *,
        group=None,
        replica_group=None,
        policy: SelectionPolicy | None = None,
        solver: Callable[..., Plan] | None = None,
    ):
        if not isinstance(config, TimelyFreezeConfig):
            raise TypeError(f"config must be a TimelyFreezeConfig, got {type(config).__name__}")
        if isinstance(schedule, DAG):
            self.dag = schedule
        elif isinstance(schedule, Schedule):
            self.dag = build_dag(schedule)
        else:
            raise TypeError(f"schedule must be a Schedule or a DAG, got {type(schedule).__name__}")
        self.config = config
        dag = self.dag
        self._comm = Comm(group, replica_group)
        if self._comm.distributed and self._comm.size != dag.num_ranks:
            raise ValueError(
                f"the process group has {self._comm.size} ranks, but schedule {dag.schedule.name!r} "
                f"has {dag.num_ranks} pipeline ranks"
            )
        ranks = [self._comm.rank] if self._comm.distributed else list(range(dag.num_ranks))
        where = f"rank {self._comm.rank}" if self._comm.distributed else "this process (no group)"
        stages = sorted(s for r in ranks for s in dag.schedule.stages_of(r))
        if not isinstance(stage_modules, Mapping):
            raise TypeError(f"stage_modules must map stage -> module, got {type(stage_modules).__name__}")
        for key, module in stage_modules.items():
            if not is_int(key) or not hasattr(module, "named_parameters"):
                raise TypeError(
                    f"stage_modules must map stage index (int) -> module, got {short_repr(key)} -> "
                    f"{type(module).__name__}"
                )
        if sorted(stage_modules) != stages:
            raise ValueError(
                f"stage_modules has stages {sorted(stage_modules)}, but {where} runs stages {stages}"
            )
        self.stage_modules = {s: stage_module(stage_modules[s]) for s in stages}  # names without DDP's
        units: dict[int, StageUnits] = {}
        for s, module in self.stage_modules.items():
            try:
                units[s] = StageUnits.from_module(
                    module, block_rows=config.block_rows, include_tensors=config.include_tensors
                )
            except ValueError as exc:
                raise ValueError(f"stage {s}: {exc}") from None
        last = dag.num_stages - 1
        keep = config.keep_trainable_units
        if config.monitoring == "frozen" and last in units and keep >= len(units[last]):
            raise ValueError(
                f"keep_trainable_units ({keep}) must be smaller than the {len(units[last])} units "
                f"of the last stage {last}"
            )
        self.policy = RandomPolicy() if policy is None else policy
        if not isinstance(self.policy, SelectionPolicy):
            raise TypeError(f"policy must have a rank(units, *, stage, microbatch, rng) method: {policy!r}")
        if config.mask_layout == "arcs" and policy is not None:
            raise ValueError(
                f"mask_layout='arcs' draws its arcs at random and takes no policy, got {policy!r}"
            )
        if solver is not None and not callable(solver):
            raise TypeError(f"solver must be a function like tfz.plan.solve, got {short_repr(solver)}")
        self._solver = solve if solver is None else solver

        local = np.flatnonzero(np.isin(dag.rank, ranks))
        self._layout = Layout(config, dag, self._comm.rank, where, local, units)
        self._local_pos = {dag.names[i]: j for j, i in enumerate(local.tolist())}
        self._freezable = dag.kind_mask(*FREEZABLE_KINDS)
        # (stage, microbatch) -> its B or W action
        self._bw = np.full((dag.num_stages, dag.schedule.num_microbatches), -1, dtype=np.int64)
        idx = np.flatnonzero(self._freezable)
        self._bw[dag.stage[idx], dag.microbatch[idx]] = idx
        self._s = ControllerState.initial(self._layout)
        if config.warmup == 0:
            self._enter(Phase.MONITOR_UPPER, "monitoring the unfrozen bound")

    # ------------------------------------------------------------------ read-only views

    @property
    def rank(self) -> int:
        """Rank in the pipeline group (0 without a group)."""
        return self._comm.rank

    @property
    def local_stages(self) -> tuple[int, ...]:
        return tuple(self._layout.units)

    @property
    def num_microbatches(self) -> int:
        """Microbatches per step: freeze-aware stages prepare every mask of a step when it starts."""
        return self.dag.schedule.num_microbatches

    @property
    def units(self) -> dict[int, StageUnits]:
        """Freezable units per local stage."""
        return dict(self._layout.units)

    @property
    def phase(self) -> Phase:
        return self._s.phase

    @property
    def plan(self) -> Plan | None:
        """The plan in force (None before the first)."""
        return self._s.plan

    @property
    def replans(self) -> int:
        """Plans adopted after the first (drift re-plans)."""
        return self._s.replans

    @property
    def history(self) -> list[tuple[int, str, str]]:
        """(first step under the change, phase, text) of every event, in order."""
        return list(self._s.history)

    @property
    def progress(self) -> float:
        """Ramp factor applied to the plan ratios (0 before the plan, 1 when stable)."""
        return self._s.progress

    @property
    def decision(self) -> int:
        """Number of mask redraws so far (the ``step`` of :func:`tfz.masks.select`)."""
        return self._s.decision

    @property
    def estimates(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(upper, lower) float64 [n] in ms behind the current plan, None before the first plan; the
        actions alone, without :attr:`gap`."""
        if self._s.upper is None:
            return None
        return self._s.upper.copy(), self._s.lower.copy()

    @property
    def gap(self) -> float:
        """Time (ms) between actions that the plan adds to every action (0 until fitted at the end of
        monitoring, and without batch times)."""
        return self._s.gap

    @property
    def solving(self) -> bool:
        """A solve (initial or re-plan) is pending."""
        return self._s.pending is not None

    @property
    def _where(self) -> str:
        return self._layout.where

    @property
    def _ratios(self) -> np.ndarray:
        plan = self._s.plan
        return plan.ratios if plan is not None else np.zeros(self.dag.num_actions)

    def _event(self, text: str) -> None:
        """Log ``text`` and add (step, phase, text) to ``history``; step is the first step that runs
        under the change (the step after the ``step_end`` that made it)."""
        s = self._s
        step = s.done if s.origin is None else s.origin + s.done
        s.history.append((step, s.phase.value, text))
        logger.info("tfz.controller step %s [%s]: %s", step, s.phase.value, text)

    def _enter(self, phase: Phase, text: str) -> None:
        self._s.phase = phase
        self._s.phase_start = self._s.done
        self._event(text)

    # ------------------------------------------------------------------ masks

    def masks_for(self, stage: int, microbatch: int) -> StageMasks | None:
        """Masks of a local (stage, microbatch) for the current step; None when nothing is frozen."""
        if stage not in self._layout.units:
            raise ValueError(f"stage {stage!r} is not a stage of {self._where} (local: {self.local_stages})")
        M = self.num_microbatches
        if not is_int(microbatch) or not 0 <= microbatch < M:
            raise ValueError(f"microbatch must be an integer in [0, {M}), got {microbatch!r}")
        return self._s.masks.get((int(stage), int(microbatch)))

    @property
    def _partial(self) -> bool:
        """Partial monitoring is running: masks at the monitor ratios, redrawn every step."""
        return self._s.phase is Phase.MONITOR_LOWER and self.config.monitoring == "partial"

    def _ratio_now(self, stage: int, microbatch: int) -> float:
        """The ratio asked of (stage, microbatch)'s B or W action now: its monitoring level, or plan x
        ramp progress (<= 1)."""
        s = self._s
        if self._partial:
            levels = self.config.monitor_levels
            return levels[(s.done - s.phase_start + microbatch) % len(levels)]
        return min(1.0, float(self._ratios[self._bw[stage, microbatch]]) * s.progress)

    def _all_frozen(self, stage: int) -> StageMasks:
        """``monitoring="frozen"``: every unit frozen; the last stage keeps its smallest
        ``keep_trainable_units`` trainable (the measured bound is then closest to full freezing)."""
        units = self._layout.units[stage]
        frozen = np.ones(len(units), dtype=bool)
        if stage == self.dag.num_stages - 1 and self.config.keep_trainable_units:
            keep = np.argsort(units.weights, kind="stable")[: self.config.keep_trainable_units]
            frozen[keep] = False
        return StageMasks(units=units, ratio=1.0, frozen=frozen)

    def _draw(self, stage: int, microbatch: int) -> StageMasks | None:
        ratio = self._ratio_now(stage, microbatch)
        if ratio <= 0.0:
            return None
        return select(
            self._layout.units[stage],
            ratio,
            stage=stage,
            microbatch=microbatch,
            step=self._s.decision,
            seed=self.config.seed,
            policy=self.policy,
        )

    def _redraw(self) -> None:
        """New masks for every local (stage, microbatch), drawn now: they depend on the policy's state
        at this decision, not on when the runtime first asks."""
        s = self._s
        s.decision += 1
        masks: dict[tuple[int, int], StageMasks | None] = {}
        if s.phase not in NO_MASKS:
            M = self.num_microbatches
            frozen_window = s.phase is Phase.MONITOR_LOWER and not self._partial
            for stage in self._layout.units:
                if frozen_window:
                    drawn = [self._all_frozen(stage)] * M
                elif self._covering:
                    drawn = self._draw_covering(stage)
                else:
                    drawn = [self._draw(stage, mb) for mb in range(M)]
                for mb, m in enumerate(drawn):
                    masks[stage, mb] = None if m is None or not m.frozen.any() else m
        s.masks = masks

    @property
    def _covering(self) -> bool:
        layout = self.config.mask_layout
        return layout in ("cover", "arcs") or (layout == "auto" and type(self.policy) is RandomPolicy)

    def _draw_covering(self, stage: int) -> list[StageMasks | None]:
        M = self.num_microbatches
        ratios = [self._ratio_now(stage, mb) for mb in range(M)]
        if not any(r > 0.0 for r in ratios):
            return [None] * M
        units, step, seed = self._layout.units[stage], self._s.decision, self.config.seed
        if self.config.mask_layout == "arcs":
            drawn = select_row_arcs(units, ratios, stage=stage, step=step, seed=seed)
        else:
            drawn = select_covering(units, ratios, stage=stage, step=step, seed=seed, policy=self.policy)
        return [m if r > 0.0 else None for m, r in zip(drawn, ratios)]

    def requested_ratios(self) -> np.ndarray:
        """float64 [n]: the freeze ratio asked for every action now (plan x progress; the monitoring
        level, or 1 in the all-frozen window, on every freezable action while monitoring the frozen
        side; 0 otherwise)."""
        s = self._s
        if s.phase is Phase.MONITOR_LOWER:
            if not self._partial:
                return self._freezable.astype(np.float64)
            out = np.zeros(self.dag.num_actions)
            for i in np.flatnonzero(self._freezable).tolist():
                out[i] = self._ratio_now(int(self.dag.stage[i]), int(self.dag.microbatch[i]))
            return out
        if s.phase in (Phase.RAMP, Phase.STABLE):
            return self._ratios * s.progress
        return np.zeros(self.dag.num_actions)

    def stage_freeze_ratio(self) -> dict[int, float]:
        """Mean realised frozen fraction over the microbatches of each local stage, for this step."""
        M = self.num_microbatches
        out = {}
        for s in self._layout.units:
            masks = [self.masks_for(s, mb) for mb in range(M)]
            out[s] = float(np.mean([0.0 if m is None else m.frozen_fraction for m in masks]))
        return out

    def timeline_durations(self) -> np.ndarray | None:
        """float64 [n]: predicted durations (ms) of every action under the current ratios, from the
        estimates behind the plan (None before the first plan), without :attr:`gap`; for
        ``tfz.timeline``."""
        s = self._s
        if s.upper is None:
            return None
        r = self._ratios * s.progress if s.phase in (Phase.RAMP, Phase.STABLE) else 0.0
        return s.upper - r * (s.upper - s.lower)

    def predicted_batch_time(self) -> float | None:
        """Simulated batch time (ms) under the current ratios, :attr:`gap` included:
        ``plan.makespan_planned`` once stable, the unfrozen makespan while solving; None before the
        first plan."""
        durations = self.timeline_durations()
        return None if durations is None else simulate(self.dag, durations + self._s.gap).makespan

    # ------------------------------------------------------------------ training-loop hooks

    def observe(self, step: int) -> None:
        """Forward ``policy.observe(step, stage_modules)`` (after ``optimizer.step()``, before
        ``zero_grad()``); a no-op for policies without ``observe``."""
        if not is_int(step):
            raise TypeError(f"step must be an integer, got {short_repr(step)}")
        if isinstance(self.policy, ObservingPolicy):
            self.policy.observe(step, self.stage_modules)

    def step_end(
        self, step: int, timings: Mapping[str, float], *, batches: int = 1, batch_ms: float | None = None
    ) -> None:
        """End optimizer step ``step`` with this rank's action times.

        Args:
            step: the training loop's step number; the first call fixes the origin, later calls must
                be consecutive.
            timings: ms per action name (``"2W3"``) for exactly this rank's actions (every action
                without a group), e.g. ``ActionTimer.collect()``.
            batches: pipeline batches summed in ``timings`` (gradient accumulation); times are divided
                by it.
            batch_ms: this rank's wall time (ms) of the ``batches`` pipeline batches, from the step's
                start (all ranks together) to the end of its last action, optimizer step excluded.
                Optional; the unfrozen monitoring fits the time between actions from it (the
                module docstring's gap).
        """
        if not is_int(step):
            raise TypeError(f"step must be an integer, got {step!r}")
        batches = check_int("batches", batches, 1)
        s = self._s
        if s.origin is not None and step != s.origin + s.done:
            raise ValueError(
                f"step_end: expected step {s.origin + s.done} (steps must be consecutive), got {step}"
            )
        values = parse_timings(timings, self._local_pos, self.dag, self._where) / batches
        batch_ms = check_number(
            "batch_ms", batch_ms, low=0.0, low_open=True, high=MAX_TIMING_MS, optional=True, unit="ms"
        )
        if s.origin is None:
            s.origin = int(step)
            # events before the first step (warmup 0) were recorded relative to step 0
            s.history = [(h[0] + s.origin, h[1], h[2]) for h in s.history]
        self._record(values, None if batch_ms is None else batch_ms / batches)
        s.done += 1
        changed = self._transitions()
        check = s.done % self.config.check_every == 0
        if check:
            changed |= self._decide()
            changed |= self._transitions()
        if changed or check or self._partial:
            self._redraw()

    def _record(self, values: np.ndarray, batch_ms: float | None) -> None:
        s = self._s
        k = s.done  # relative index of the step that ended
        discard = self.config.discard_steps
        if s.phase is Phase.MONITOR_UPPER and k - s.phase_start >= discard:
            s.upper_window.append(values)
            if batch_ms is not None:
                s.batch_window.append(np.array([batch_ms]))
        elif s.phase is Phase.MONITOR_LOWER and k - s.phase_start >= discard:
            s.lower_window.append(values, *self._applied())
        elif s.phase is Phase.STABLE and self.config.replan and s.pending is None and k - s.anchor >= discard:
            s.drift_window.append(values)
            if batch_ms is not None:
                s.batch_window.append(np.array([batch_ms]))

    def _applied(self) -> tuple[np.ndarray, np.ndarray]:
        """(active fraction, asked ratio) [k] of the masks this step's local actions ran with (1 and 0
        for actions that cannot freeze)."""
        local = self._layout.local
        active, level = np.ones(len(local)), np.zeros(len(local))
        for j, i in enumerate(local.tolist()):
            if self._freezable[i]:
                key = (int(self.dag.stage[i]), int(self.dag.microbatch[i]))
                m = self._s.masks.get(key)
                level[j] = self._ratio_now(*key) if self._partial else 1.0
                active[j] = 1.0 if m is None else 1.0 - m.frozen_fraction
        return active, level

    def _transitions(self) -> bool:
        """Phase changes due by step count; True if any happened."""
        cfg, s = self.config, self._s
        moved = False
        while True:
            elapsed = s.done - s.phase_start
            if s.phase is Phase.WARMUP and s.done >= cfg.warmup:
                self._enter(Phase.MONITOR_UPPER, "monitoring the unfrozen bound")
            elif s.phase is Phase.MONITOR_UPPER and elapsed >= cfg.monitor:
                what = "partly frozen" if cfg.monitoring == "partial" else "all frozen"
                self._enter(Phase.MONITOR_LOWER, f"monitoring the frozen bound ({what})")
            elif s.phase is Phase.MONITOR_LOWER and elapsed >= cfg.monitor:
                upper, lower = self._fitted_bounds()
                batch = self._measured_batch()
                s.gap = 0.0 if batch is None else fit_gap(self.dag, upper, batch)
                self._submit("initial", upper, lower, warm=None)
                gap = "" if batch is None else f" ({s.gap:.3g} ms between actions, batch {batch:.4g} ms)"
                self._enter(Phase.SOLVING, "solving the freeze-ratio LP" + gap)
            elif s.phase is Phase.RAMP and s.done - s.ramp_start >= cfg.ramp:
                s.progress = 1.0
                s.anchor = s.done
                self._restart_drift()
                self._enter(Phase.STABLE, "plan fully applied")
            else:
                return moved
            moved = True

    def _decide(self) -> bool:
        """Work of a decision step: poll a pending solve, advance the ramp, check drift."""
        s = self._s
        if s.pending is not None and s.done > s.pending.submitted_at:
            return self._poll()
        if s.phase is Phase.RAMP:
            progress = min(1.0, (s.done - s.ramp_start + 1) / self.config.ramp)
            changed = progress != s.progress
            s.progress = progress
            return changed
        if s.phase is Phase.STABLE and self.config.replan and s.pending is None and s.drift_window.full:
            self._check_drift()
        return False

    # ------------------------------------------------------------------ estimates

    def _fitted_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Collective: (upper, lower) [n] of every action from both monitoring windows (the module
        docstring's fit), gathered from all ranks; the windows are emptied."""
        s = self._s
        up_rows = s.upper_window.rows()
        times, active, level = s.lower_window.rows()
        a, b = fit_linear(
            np.vstack([np.ones_like(up_rows), active]),
            np.vstack([up_rows, times]),
            np.vstack([np.zeros_like(up_rows), level]),
        )
        if self.config.paired_monitoring:  # both ends from the same steps, where an action ran both
            fixed = ~self._freezable[self._layout.local]
            paired = (level == 0.0).any(axis=0) & ((level > 0.0).any(axis=0) | fixed)
            pa, pb = fit_linear(active, times, level)
            a, b = np.where(paired, pa, a), np.where(paired, pb, b)
        s.upper_window.clear()
        s.lower_window.clear()
        upper = np.full(self.dag.num_actions, np.nan)
        lower = np.full(self.dag.num_actions, np.nan)
        upper[self._layout.local] = a + b
        lower[self._layout.local] = a
        upper = self._comm.gather_actions(upper, self.dag.names)
        lower = self._comm.gather_actions(lower, self.dag.names)
        return bound_estimates(self.dag, upper, lower)

    def _ranks_columns(self, column: np.ndarray | None, length: int) -> np.ndarray | None:
        """Collective: float64 [length, ranks], every rank's ``column`` side by side; None unless every
        rank gave one (``length`` values, the same on every rank)."""
        comm = self._comm
        packed = np.zeros((length + 1, comm.size))
        if column is not None:
            packed[:length, comm.rank] = column
            packed[length, comm.rank] = 1.0
        total = comm.all_reduce_sum(packed)
        return total[:length] if np.all(total[length] == 1.0) else None

    def _measured_batch(self) -> float | None:
        """Collective: the slowest rank's median batch time of the unfrozen window, None unless every
        rank recorded some; the window is emptied."""
        s = self._s
        median = s.batch_window.median() if len(s.batch_window) else None
        s.batch_window.clear()
        medians = self._ranks_columns(median, 1)
        return None if medians is None else float(medians[0].max())

    def _restart_drift(self) -> None:
        """Empty the stable phase's windows (a plan took effect, or a drift was acted on)."""
        self._s.drift_window.clear()
        self._s.batch_window.clear()

    def _check_drift(self) -> None:
        """Collective: sum the window's per-stage times and the refit sums over the ranks, gather the
        batch times, re-plan if some stage or the time between actions drifted for the window."""
        dag, s = self.dag, self._s
        local = self._layout.local
        rows = s.drift_window.rows()
        window = s.batch_window
        # every rank's batch of each step of the drift window, where every rank has them all
        batches = self._ranks_columns(window.rows()[:, 0] if len(window) == len(rows) else None, len(rows))
        threshold = self.config.drift_threshold
        stats = drift_stats(dag, local, np.median(rows, axis=0), s.upper, s.lower, self._ratios)
        sums = stage_sums(dag, local, rows)
        total = self._comm.all_reduce_sum(np.concatenate([stats.ravel(), sums.ravel()]))
        stats = total[: stats.size].reshape(stats.shape)
        deviation = assess_drift(total[stats.size :].reshape(sums.shape), stats)
        drifting = drifting_stages(deviation, threshold)
        stage_drift = bool(drifting.any())
        # a stage's drift is often the machine's (every stage slower): then every stage is refitted
        upper, lower = refit(dag, stats, s.upper, s.lower) if stage_drift else (s.upper, s.lower)
        durations = upper - self._ratios * (upper - lower)
        between = None
        if batches is not None:
            predicted = simulate(dag, durations + s.gap).makespan
            between = (batches.max(axis=1) - predicted) / predicted
        gap_drift = between is not None and bool(drifting_stages(between[:, None], threshold)[0])
        if not (stage_drift or gap_drift):
            return
        if stage_drift:
            typical = np.median(deviation, axis=0)
            worst = int(np.flatnonzero(drifting)[np.argmax(np.abs(typical[drifting]))])
            text = f"drift on stage {worst}: measured time off the prediction by {typical[worst]:+.1%}"
        else:
            text = f"drift between actions: measured batch off the prediction by {np.median(between):+.1%}"
        text += f" over a window of {len(rows)} step(s) (threshold {threshold:.1%})"
        if batches is not None:
            old, s.gap = s.gap, fit_gap(dag, durations, float(np.median(batches, axis=0).max()))
            text += f"; {old:.3g} -> {s.gap:.3g} ms between actions"
        self._event(text + "; re-planning")
        self._restart_drift()
        self._submit("replan", upper, lower, warm=s.plan)

    # ------------------------------------------------------------------ solving

    def _submit(self, kind: str, upper: np.ndarray, lower: np.ndarray, warm: Plan | None) -> None:
        self._s.pending = self._job(Pending(kind, upper, lower, self._s.done), warm)

    def _job(self, pending: Pending, warm: Plan | None) -> Pending:
        """``pending`` with its solve started on the leader, on the bounds plus the gap."""
        gap = self._s.gap
        if self._comm.leader:
            pending.job = SolveJob(
                solve_with_retry,
                (self._solver, self.dag, pending.upper + gap, pending.lower + gap, self.config.plan, warm),
                {},
                background=self.config.async_solve,
            )
        return pending

    def _poll(self) -> bool:
        """Collective (rank 0 broadcasts): adopt a finished plan on every rank. True if adopted."""
        s = self._s
        pending = s.pending
        job = pending.job
        status = 0.0
        if job is not None and job.done():
            status = -1.0 if job.error is not None else 1.0
        flag = self._comm.broadcast_from_first(np.array([status]))[0]
        if flag == 0:
            return False
        if flag < 0:
            s.pending = None
            cause = job.error if job is not None else None
            text = f"{pending.kind} solve failed on rank 0" + (f": {cause!r}" if cause is not None else "")
            self._event(text)
            if pending.kind == "initial":
                raise RuntimeError(f"tfz.controller: {text}") from cause
            logger.warning("tfz.controller: %s; keeping the current plan", text)
            return False
        if job is not None:
            payload = pack_plan(job.result, self.dag.num_stages)
        else:
            payload = np.zeros(packed_size(self.dag))
        values = self._comm.broadcast_from_first(payload)
        plan = job.result if job is not None else unpack_plan(values, self.dag, self.config.plan)
        self._adopt(plan, pending)
        return True

    def _adopt(self, plan: Plan, pending: Pending) -> None:
        if plan.names != self.dag.names:
            raise RuntimeError("the solver returned a plan for another DAG (action names differ)")
        s = self._s
        s.pending = None
        s.plan = plan
        s.upper, s.lower = pending.upper, pending.lower
        text = (
            f"plan: batch time {plan.makespan_unfrozen:.4g} -> {plan.makespan_planned:.4g} ms "
            f"(speedup {plan.speedup:.3f}), stage mean ratios {[round(r, 3) for r in plan.stage_mean_ratio]}"
        )
        if pending.kind == "initial":
            if self.config.ramp == 0:
                s.progress = 1.0
                s.anchor = s.done
                self._restart_drift()
                self._enter(Phase.STABLE, text)
            else:
                s.ramp_start = s.done
                s.progress = min(1.0, 1.0 / self.config.ramp)
                self._enter(Phase.RAMP, text)
        else:
            s.replans += 1
            s.anchor = s.done
            self._restart_drift()
            self._event(f"re-{text} (warm start: {plan.warm})")

    def wait_for_solve(self, timeout: float | None = None) -> bool:
        """Block until this rank's pending solve finishes (tests, shutdown); True if none is running."""
        job = None if self._s.pending is None else self._s.pending.job
        return True if job is None else job.wait(timeout)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume in the same phase with the same plan and masks, with what it
        must be resumed into (schedule, rank, config, each stage's unit layout); plain python types
        (JSON-able when the policy's state is). A solve in flight is stored as its inputs and re-run
        on resume. Windows hold this rank's actions only, so each rank saves its own.

        Not stored: the LP solver's basis inside the plan (``Plan.to_dict`` drops it), so the first
        re-plan after a resume starts cold; it reaches the same optimum within the LP tolerance (a
        degenerate optimum may pick another optimal vertex)."""
        state = self._s.to_dict(self._layout)
        state["policy"] = self.policy.state_dict() if isinstance(self.policy, StatefulPolicy) else None
        state["policy_kind"] = _policy_kind(self.policy)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a pending solve is re-run (on rank 0, in the background unless
        ``async_solve=False``).

        The whole state is checked first (:meth:`ControllerState.from_dict`): a state of another
        schedule, rank, config or unit layout, or with a missing, malformed or inconsistent field,
        raises ValueError naming it and leaves this controller unchanged. The policy's state is loaded
        last; if the policy refuses it, its previous state is put back.
        """
        new = ControllerState.from_dict(state, self._layout)
        if "policy" not in state:
            raise ValueError("state is missing key 'policy'")
        kind, mine = state.get("policy_kind"), _policy_kind(self.policy)
        if kind is not None and kind != mine:  # None: saved before the policy was recorded
            raise ValueError(
                f"state.policy_kind: the state was saved under {kind!r}, this controller runs {mine!r}"
            )
        saved = state["policy"]
        stateful = isinstance(self.policy, StatefulPolicy)
        if saved is not None and not stateful:
            raise ValueError(
                "state.policy: the state holds a policy state, but the policy has no load_state_dict"
            )
        if stateful:
            if saved is None:
                raise ValueError("state.policy: the policy is stateful, but the state holds no policy state")
            before = self.policy.state_dict()
            try:
                self.policy.load_state_dict(saved)
            except Exception as exc:
                self.policy.load_state_dict(before)
                raise ValueError(f"state.policy: the policy refused its state: {exc!r}") from exc
        self._s = new
        if new.pending is not None:
            warm = new.plan if new.pending.kind == "replan" else None
            self._job(new.pending, warm)
            self._event(f"resumed; re-running the pending {new.pending.kind} solve")
