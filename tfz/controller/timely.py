"""``TimelyFreeze``: measure the pipeline, solve the freeze-ratio LP, apply and maintain the plan.

Phases (step counts are optimizer steps from the first ``step_end`` call; lengths from
:class:`~tfz.controller.TimelyFreezeConfig`, W = warmup, M = monitor, K = check_every)::

    WARMUP          [0, W)          nothing frozen, nothing recorded
    MONITOR_UPPER   [W, W+M)        nothing frozen; times recorded -> unfrozen bound u
    MONITOR_LOWER   [W+M, W+2M)     every unit frozen, except ``keep_trainable_units`` on the last
                                    stage; times recorded -> frozen bound l
    SOLVING         [W+2M, A)       nothing frozen while the LP runs (rank 0, background thread)
    RAMP            [A, A+ramp)     plan ratios x progress, progress rising linearly to 1
    STABLE          [A+ramp, ...)   plan ratios; re-plan on drift

A is the first decision step (a multiple of K) after the solve was submitted at which the plan is
ready; every rank learns that through a broadcast, so all switch at the same step. The first
``discard_steps`` steps of each monitoring half are not recorded. Medians over the last ``window``
recorded steps, gathered across the pipeline ranks as float32, give u and l for every action; F and I
actions keep u as their fixed time, and l <= u. The lower bound of the last stage, measured with a few
units trainable, is extrapolated to full freezing along the linear model.

Masks: for a local (stage, microbatch) ``tfz.masks.select(units, r * progress, stage, mb,
step=decision, seed, policy)`` with r the plan ratio of its B or W action. ``decision`` counts the
redraws, which happen at every decision step and at every phase or plan change; each redraw draws
the masks of every local (stage, microbatch) at once (with the policy's state of that moment) and
they hold until the next. Everything the masks depend on (seed, plan, decision, progress, and the
policy's state for its own stages) is the same on every rank, so ranks agree without communication.

Drift (STABLE, ``config.replan``): at each decision step with a full window of steps recorded under
the current plan, each rank sums its actions' times per stage for every step of the window, and its
window medians against the prediction ``u (1 - r) + l r`` per (stage, kind); one all-reduce adds the
sums of all ranks. When a stage's summed time is off the prediction by more than
``drift_threshold`` in at least 3/4 of the window's steps, u and l are refitted from the medians
(:mod:`tfz.controller.estimates`) and rank 0 re-solves warm-started from the current plan, in the
background; the old plan stays in force until the new one is broadcast at a decision step.

Without a process group (``group=None``) one process plays every rank: ``step_end`` takes the
timings of every action, ``stage_modules`` holds every stage, and the collectives are skipped.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

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
    TimingWindow,
    assess_drift,
    bound_estimates,
    drift_stats,
    drifting_stages,
    extrapolate_lower,
    parse_timings,
    refit,
    stage_sums,
)
from tfz.controller.policy import ObservingPolicy, StatefulPolicy
from tfz.dag import DAG, build_dag, simulate
from tfz.masks import RandomPolicy, SelectionPolicy, StageMasks, StageUnits, select, select_covering
from tfz.plan import Plan, solve
from tfz.schedule import FREEZABLE_KINDS, Schedule

__all__ = ["Phase", "TimelyFreeze"]

logger = logging.getLogger("tfz.controller")

STATE_VERSION = 1


class Phase(str, enum.Enum):
    """Controller phases, in order (see the module docstring)."""

    WARMUP = "warmup"
    MONITOR_UPPER = "monitor_upper"
    MONITOR_LOWER = "monitor_lower"
    SOLVING = "solving"
    RAMP = "ramp"
    STABLE = "stable"


_NO_MASKS = (Phase.WARMUP, Phase.MONITOR_UPPER, Phase.SOLVING)


@dataclass
class _Pending:
    """A solve between submission and adoption. ``job`` exists on the leader only (pipeline rank 0 of
    replica 0)."""

    kind: str
    """"initial" or "replan"."""
    upper: np.ndarray
    lower: np.ndarray
    submitted_at: int
    """Relative step count at submission; the first poll is at a later decision step."""
    job: SolveJob | None = None


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
    end of each monitoring half and at decision steps while a solve is pending or drift is checked.
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
        self._where = f"rank {self._comm.rank}" if self._comm.distributed else "this process (no group)"
        stages = sorted(s for r in ranks for s in dag.schedule.stages_of(r))
        if not isinstance(stage_modules, Mapping):
            raise TypeError(f"stage_modules must map stage -> module, got {type(stage_modules).__name__}")
        if sorted(stage_modules) != stages:
            raise ValueError(
                f"stage_modules has stages {sorted(stage_modules)}, but {self._where} runs stages {stages}"
            )
        self.stage_modules = {s: stage_modules[s] for s in stages}
        self._units: dict[int, StageUnits] = {}
        for s in stages:
            try:
                self._units[s] = StageUnits.from_module(
                    stage_modules[s], block_rows=config.block_rows, include_tensors=config.include_tensors
                )
            except ValueError as exc:
                raise ValueError(f"stage {s}: {exc}") from None
        last = dag.num_stages - 1
        keep = config.keep_trainable_units
        if last in self._units and keep >= len(self._units[last]):
            raise ValueError(
                f"keep_trainable_units ({keep}) must be smaller than the {len(self._units[last])} units "
                f"of the last stage {last}"
            )
        self.policy = RandomPolicy() if policy is None else policy
        if not isinstance(self.policy, SelectionPolicy):
            raise TypeError(f"policy must have a rank(units, *, stage, microbatch, rng) method: {policy!r}")
        self._solver = solve if solver is None else solver

        self._local = np.flatnonzero(np.isin(dag.rank, ranks))
        self._local_pos = {dag.names[i]: j for j, i in enumerate(self._local.tolist())}
        freezable = dag.kind_mask(*FREEZABLE_KINDS)
        self._freezable = freezable
        # (stage, microbatch) -> its B or W action
        self._bw = np.full((dag.num_stages, dag.schedule.num_microbatches), -1, dtype=np.int64)
        idx = np.flatnonzero(freezable)
        self._bw[dag.stage[idx], dag.microbatch[idx]] = idx
        self._reset()

    # ------------------------------------------------------------------ state

    def _reset(self) -> None:
        cfg = self.config
        width = len(self._local)
        self._origin: int | None = None
        self._done = 0
        self.phase = Phase.WARMUP
        self._phase_start = 0
        self._decision = 0
        self._progress = 0.0
        self._upper_window = TimingWindow(cfg.median_window, width)
        self._lower_window = TimingWindow(cfg.median_window, width)
        self._drift_window = TimingWindow(cfg.median_window, width)
        self._upper: np.ndarray | None = None
        self._lower: np.ndarray | None = None
        self._measured_upper: np.ndarray | None = None
        self.plan: Plan | None = None
        self._ratios = np.zeros(self.dag.num_actions)
        self._pending: _Pending | None = None
        self._ramp_start = 0
        self._anchor = 0
        self.replans = 0
        self.history: list[tuple[int, str, str]] = []
        self._masks: dict[tuple[int, int], StageMasks | None] = {}
        if cfg.warmup == 0:
            self._enter(Phase.MONITOR_UPPER, "monitoring the unfrozen bound")

    @property
    def rank(self) -> int:
        """Rank in the pipeline group (0 without a group)."""
        return self._comm.rank

    @property
    def local_stages(self) -> tuple[int, ...]:
        return tuple(self._units)

    @property
    def units(self) -> dict[int, StageUnits]:
        """Freezable units per local stage."""
        return dict(self._units)

    @property
    def progress(self) -> float:
        """Ramp factor applied to the plan ratios (0 before the plan, 1 when stable)."""
        return self._progress

    @property
    def decision(self) -> int:
        """Number of mask redraws so far (the ``step`` of :func:`tfz.masks.select`)."""
        return self._decision

    @property
    def estimates(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(upper, lower) float64 [n] in ms behind the current plan, None before the first plan."""
        if self._upper is None:
            return None
        return self._upper.copy(), self._lower.copy()

    @property
    def solving(self) -> bool:
        """A solve (initial or re-plan) is pending."""
        return self._pending is not None

    def _event(self, text: str) -> None:
        """Log ``text`` and add (step, phase, text) to ``history``; step is the first step that runs
        under the change (the step after the ``step_end`` that made it)."""
        step = self._done if self._origin is None else self._origin + self._done
        self.history.append((step, self.phase.value, text))
        logger.info("tfz.controller step %s [%s]: %s", step, self.phase.value, text)

    def _enter(self, phase: Phase, text: str) -> None:
        self.phase = phase
        self._phase_start = self._done
        self._event(text)

    # ------------------------------------------------------------------ masks

    def masks_for(self, stage: int, microbatch: int) -> StageMasks | None:
        """Masks of a local (stage, microbatch) for the current step; None when nothing is frozen."""
        if stage not in self._units:
            raise ValueError(f"stage {stage} is not a stage of {self._where} (local: {self.local_stages})")
        M = self.dag.schedule.num_microbatches
        ok = isinstance(microbatch, (int, np.integer)) and not isinstance(microbatch, bool)
        if not ok or not 0 <= microbatch < M:
            raise ValueError(f"microbatch must be an integer in [0, {M}), got {microbatch!r}")
        return self._masks.get((int(stage), int(microbatch)))

    def _ratio_now(self, stage: int, microbatch: int) -> float:
        """The ratio asked of (stage, microbatch)'s B or W action now: plan x ramp progress, <= 1."""
        return min(1.0, float(self._ratios[self._bw[stage, microbatch]]) * self._progress)

    def _draw(self, stage: int, microbatch: int) -> StageMasks | None:
        units = self._units[stage]
        if self.phase is Phase.MONITOR_LOWER:
            frozen = np.ones(len(units), dtype=bool)
            if stage == self.dag.num_stages - 1 and self.config.keep_trainable_units:
                # the smallest units stay trainable: the measured bound is closest to full freezing
                keep = np.argsort(units.weights, kind="stable")[: self.config.keep_trainable_units]
                frozen[keep] = False
            return StageMasks(units=units, ratio=1.0, frozen=frozen)
        ratio = self._ratio_now(stage, microbatch)
        if ratio <= 0.0:
            return None
        return select(
            units,
            ratio,
            stage=stage,
            microbatch=microbatch,
            step=self._decision,
            seed=self.config.seed,
            policy=self.policy,
        )

    def _redraw(self) -> None:
        """New masks for every local (stage, microbatch), drawn now: they depend on the policy's state
        at this decision, not on when the runtime first asks."""
        self._decision += 1
        masks: dict[tuple[int, int], StageMasks | None] = {}
        if self.phase not in _NO_MASKS:
            M = self.dag.schedule.num_microbatches
            for stage in self._units:
                if self._covering and self.phase is not Phase.MONITOR_LOWER:
                    drawn = self._draw_covering(stage)
                else:
                    drawn = [self._draw(stage, mb) for mb in range(M)]
                for mb, m in enumerate(drawn):
                    masks[stage, mb] = None if m is None or not m.frozen.any() else m
        self._masks = masks

    @property
    def _covering(self) -> bool:
        layout = self.config.mask_layout
        return layout == "cover" or (layout == "auto" and type(self.policy) is RandomPolicy)

    def _draw_covering(self, stage: int) -> list[StageMasks | None]:
        M = self.dag.schedule.num_microbatches
        ratios = [self._ratio_now(stage, mb) for mb in range(M)]
        if not any(r > 0.0 for r in ratios):
            return [None] * M
        drawn = select_covering(
            self._units[stage],
            ratios,
            stage=stage,
            step=self._decision,
            seed=self.config.seed,
            policy=self.policy,
        )
        return [m if r > 0.0 else None for m, r in zip(drawn, ratios)]

    def requested_ratios(self) -> np.ndarray:
        """float64 [n]: the freeze ratio asked for every action now (plan x progress; 1 on every
        freezable action in the lower-bound window; 0 otherwise)."""
        if self.phase is Phase.MONITOR_LOWER:
            return self._freezable.astype(np.float64)
        if self.phase in (Phase.RAMP, Phase.STABLE):
            return self._ratios * self._progress
        return np.zeros(self.dag.num_actions)

    def stage_freeze_ratio(self) -> dict[int, float]:
        """Mean realised frozen fraction over the microbatches of each local stage, for this step."""
        M = self.dag.schedule.num_microbatches
        out = {}
        for s in self._units:
            masks = [self.masks_for(s, mb) for mb in range(M)]
            out[s] = float(np.mean([0.0 if m is None else m.frozen_fraction for m in masks]))
        return out

    def timeline_durations(self) -> np.ndarray | None:
        """float64 [n]: predicted durations (ms) of every action under the current ratios, from the
        estimates behind the plan (None before the first plan); for ``tfz.timeline``."""
        if self._upper is None:
            return None
        r = self._ratios * self._progress if self.phase in (Phase.RAMP, Phase.STABLE) else 0.0
        return self._upper - r * (self._upper - self._lower)

    def predicted_batch_time(self) -> float | None:
        """Simulated batch time (ms) under the current ratios: ``plan.makespan_planned`` once stable,
        the unfrozen makespan while solving; None before the first plan."""
        durations = self.timeline_durations()
        return None if durations is None else simulate(self.dag, durations).makespan

    # ------------------------------------------------------------------ training-loop hooks

    def observe(self, step: int) -> None:
        """Forward ``policy.observe(step, stage_modules)`` (after ``optimizer.step()``, before
        ``zero_grad()``); a no-op for policies without ``observe``."""
        if isinstance(self.policy, ObservingPolicy):
            self.policy.observe(step, self.stage_modules)

    def step_end(self, step: int, timings: Mapping[str, float], *, batches: int = 1) -> None:
        """End optimizer step ``step`` with this rank's action times.

        Args:
            step: the training loop's step number; the first call fixes the origin, later calls must
                be consecutive.
            timings: ms per action name (``"2W3"``) for exactly this rank's actions (every action
                without a group), e.g. ``ActionTimer.collect()``.
            batches: pipeline batches summed in ``timings`` (gradient accumulation); times are divided
                by it.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"step must be an integer, got {step!r}")
        if isinstance(batches, bool) or not isinstance(batches, (int, np.integer)) or batches < 1:
            raise ValueError(f"batches must be an integer >= 1, got {batches!r}")
        if self._origin is not None and step != self._origin + self._done:
            raise ValueError(
                f"step_end: expected step {self._origin + self._done} (steps must be consecutive), got {step}"
            )
        values = parse_timings(timings, self._local_pos, self.dag, self._where) / batches
        if self._origin is None:
            self._origin = int(step)
            # events before the first step (warmup 0) were recorded relative to step 0
            self.history = [(h[0] + self._origin, h[1], h[2]) for h in self.history]
        self._record(values)
        self._done += 1
        changed = self._transitions()
        check = self._done % self.config.check_every == 0
        if check:
            changed |= self._decide()
            changed |= self._transitions()
        if changed or check:
            self._redraw()

    def _record(self, values: np.ndarray) -> None:
        k = self._done  # relative index of the step that ended
        discard = self.config.discard_steps
        if self.phase is Phase.MONITOR_UPPER and k - self._phase_start >= discard:
            self._upper_window.append(values)
        elif self.phase is Phase.MONITOR_LOWER and k - self._phase_start >= discard:
            self._lower_window.append(values)
        elif (
            self.phase is Phase.STABLE
            and self.config.replan
            and self._pending is None
            and k - self._anchor >= discard
        ):
            self._drift_window.append(values)

    def _transitions(self) -> bool:
        """Phase changes due by step count; True if any happened."""
        cfg = self.config
        moved = False
        while True:
            elapsed = self._done - self._phase_start
            if self.phase is Phase.WARMUP and self._done >= cfg.warmup:
                self._enter(Phase.MONITOR_UPPER, "monitoring the unfrozen bound")
            elif self.phase is Phase.MONITOR_UPPER and elapsed >= cfg.monitor:
                self._measured_upper = self._gather_median(self._upper_window)
                self._enter(Phase.MONITOR_LOWER, "monitoring the frozen bound")
            elif self.phase is Phase.MONITOR_LOWER and elapsed >= cfg.monitor:
                upper, lower = self._lower_bound_estimates()
                self._submit("initial", upper, lower, warm=None)
                self._enter(Phase.SOLVING, "solving the freeze-ratio LP")
            elif self.phase is Phase.RAMP and self._done - self._ramp_start >= cfg.ramp:
                self._progress = 1.0
                self._anchor = self._done
                self._drift_window.clear()
                self._enter(Phase.STABLE, "plan fully applied")
            else:
                return moved
            moved = True

    def _decide(self) -> bool:
        """Work of a decision step: poll a pending solve, advance the ramp, check drift."""
        if self._pending is not None and self._done > self._pending.submitted_at:
            return self._poll()
        if self.phase is Phase.RAMP:
            progress = min(1.0, (self._done - self._ramp_start + 1) / self.config.ramp)
            changed = progress != self._progress
            self._progress = progress
            return changed
        if (
            self.phase is Phase.STABLE
            and self.config.replan
            and self._pending is None
            and self._drift_window.full
        ):
            self._check_drift()
        return False

    # ------------------------------------------------------------------ estimates

    def _gather_median(self, window: TimingWindow) -> np.ndarray:
        local = np.full(self.dag.num_actions, np.nan)
        local[self._local] = window.median()
        return self._comm.gather_actions(local, self.dag.names)

    def _lower_bound_estimates(self) -> tuple[np.ndarray, np.ndarray]:
        """(upper, lower) [n] from both windows; the local lower medians are first extrapolated to
        full freezing with the realised fraction of the lower-window masks."""
        upper = self._measured_upper
        measured = self._lower_window.median()
        fraction = np.zeros(len(self._local))
        for j, i in enumerate(self._local.tolist()):
            if self._freezable[i]:
                masks = self._masks[int(self.dag.stage[i]), int(self.dag.microbatch[i])]
                fraction[j] = masks.frozen_fraction
        local = np.full(self.dag.num_actions, np.nan)
        local[self._local] = extrapolate_lower(upper[self._local], measured, fraction)
        lower = self._comm.gather_actions(local, self.dag.names)
        return bound_estimates(self.dag, upper, lower)

    def _check_drift(self) -> None:
        """Collective: sum the window's per-stage times and the refit sums over the ranks, re-plan if
        some stage drifted for the whole window."""
        dag = self.dag
        rows = self._drift_window.rows()
        stats = drift_stats(dag, self._local, np.median(rows, axis=0), self._upper, self._lower, self._ratios)
        sums = stage_sums(dag, self._local, rows)
        total = self._comm.all_reduce_sum(np.concatenate([stats.ravel(), sums.ravel()]))
        stats = total[: stats.size].reshape(stats.shape)
        deviation = assess_drift(total[stats.size :].reshape(sums.shape), stats)
        drifting = drifting_stages(deviation, self.config.drift_threshold)
        if not drifting.any():
            return
        typical = np.median(deviation, axis=0)
        worst = int(np.flatnonzero(drifting)[np.argmax(np.abs(typical[drifting]))])
        upper, lower = refit(dag, stats, self._upper, self._lower)
        self._event(
            f"drift on stage {worst}: measured time off the prediction by {typical[worst]:+.1%} over "
            f"a window of {len(rows)} step(s) (threshold {self.config.drift_threshold:.1%}); re-planning"
        )
        self._drift_window.clear()
        self._submit("replan", upper, lower, warm=self.plan)

    # ------------------------------------------------------------------ solving

    def _submit(self, kind: str, upper: np.ndarray, lower: np.ndarray, warm: Plan | None) -> None:
        pending = _Pending(kind, upper, lower, self._done)
        if self._comm.leader:
            pending.job = SolveJob(
                solve_with_retry,
                (self._solver, self.dag, upper, lower, self.config.plan, warm),
                {},
                background=self.config.async_solve,
            )
        self._pending = pending

    def _poll(self) -> bool:
        """Collective (rank 0 broadcasts): adopt a finished plan on every rank. True if adopted."""
        pending = self._pending
        job = pending.job
        status = 0.0
        if job is not None and job.done():
            status = -1.0 if job.error is not None else 1.0
        flag = self._comm.broadcast_from_first(np.array([status]))[0]
        if flag == 0:
            return False
        if flag < 0:
            self._pending = None
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
        if job is not None:
            plan = job.result
        else:
            plan = unpack_plan(values, self.dag, self.config.plan)
        self._adopt(plan, pending)
        return True

    def _adopt(self, plan: Plan, pending: _Pending) -> None:
        if plan.names != self.dag.names:
            raise RuntimeError("the solver returned a plan for another DAG (action names differ)")
        self._pending = None
        self.plan = plan
        self._ratios = np.array(plan.ratios, dtype=np.float64)
        self._upper, self._lower = pending.upper, pending.lower
        text = (
            f"plan: batch time {plan.makespan_unfrozen:.4g} -> {plan.makespan_planned:.4g} ms "
            f"(speedup {plan.speedup:.3f}), stage mean ratios {[round(r, 3) for r in plan.stage_mean_ratio]}"
        )
        if pending.kind == "initial":
            if self.config.ramp == 0:
                self._progress = 1.0
                self._anchor = self._done
                self._drift_window.clear()
                self._enter(Phase.STABLE, text)
            else:
                self._ramp_start = self._done
                self._progress = min(1.0, 1.0 / self.config.ramp)
                self._enter(Phase.RAMP, text)
        else:
            self.replans += 1
            self._anchor = self._done
            self._drift_window.clear()
            self._event(f"re-{text} (warm start: {plan.warm})")

    def wait_for_solve(self, timeout: float | None = None) -> bool:
        """Block until this rank's pending solve finishes (tests, shutdown); True if none is running."""
        job = None if self._pending is None else self._pending.job
        return True if job is None else job.wait(timeout)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume in the same phase with the same plan and masks (plain python
        types: JSON-able when the policy's state is). A solve in flight is stored as its inputs and
        re-run on resume. Windows hold this rank's actions only, so each rank saves its own.

        Not stored: the LP solver's basis inside the plan (``Plan.to_dict`` drops it), so the first
        re-plan after a resume starts cold; it reaches the same optimum within the LP tolerance (a
        degenerate optimum may pick another optimal vertex)."""
        pending = None
        if self._pending is not None:
            p = self._pending
            pending = {
                "kind": p.kind,
                "upper": p.upper.tolist(),
                "lower": p.lower.tolist(),
                "submitted_at": p.submitted_at,
            }
        policy_state = self.policy.state_dict() if isinstance(self.policy, StatefulPolicy) else None
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "schedule": self.dag.schedule.name,
            "num_actions": self.dag.num_actions,
            "rank": self._comm.rank,
            "origin": self._origin,
            "done": self._done,
            "phase": self.phase.value,
            "phase_start": self._phase_start,
            "decision": self._decision,
            "progress": self._progress,
            "ramp_start": self._ramp_start,
            "anchor": self._anchor,
            "replans": self.replans,
            "windows": {
                "upper": self._upper_window.to_list(),
                "lower": self._lower_window.to_list(),
                "drift": self._drift_window.to_list(),
            },
            "measured_upper": None if self._measured_upper is None else self._measured_upper.tolist(),
            "upper": None if self._upper is None else self._upper.tolist(),
            "lower": None if self._lower is None else self._lower.tolist(),
            "plan": None if self.plan is None else self.plan.to_dict(),
            "masks": [
                [
                    s,
                    mb,
                    None if m is None else np.packbits(m.frozen).tobytes().hex(),
                    0.0 if m is None else m.ratio,
                ]
                for (s, mb), m in sorted(self._masks.items())
            ],
            "pending": pending,
            "history": [list(h) for h in self.history],
            "policy": policy_state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a pending solve is re-run (on rank 0, in the background unless
        ``async_solve=False``). Raises ValueError when the state belongs to another schedule, rank
        or phase configuration."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state version: expected {STATE_VERSION}, got {state.get('version')!r}")
        dag = self.dag
        if state.get("schedule") != dag.schedule.name or state.get("num_actions") != dag.num_actions:
            raise ValueError(
                f"state is for schedule {state.get('schedule')!r} with {state.get('num_actions')} actions, "
                f"not {dag.schedule.name!r} with {dag.num_actions}"
            )
        if state.get("rank") != self._comm.rank:
            raise ValueError(f"state was saved by rank {state.get('rank')!r}, this is rank {self._comm.rank}")
        saved = state.get("config") or {}
        saved = {**saved, **{f"plan.{k}": v for k, v in (saved.get("plan") or {}).items()}}
        pinned = self.config.pinned()
        differ = [f for f in pinned if saved.get(f) != pinned[f]]
        if differ:
            detail = ", ".join(f"{f}: {saved.get(f)!r} -> {pinned[f]!r}" for f in differ)
            raise ValueError(f"state was saved with a different config ({detail})")
        try:
            phase = Phase(state["phase"])
        except ValueError:
            raise ValueError(f"state phase: unknown phase {state['phase']!r}") from None
        plan = None
        if state.get("plan") is not None:
            plan = Plan.from_dict(state["plan"])
            if plan.names != dag.names:
                raise ValueError("state plan: action names differ from this schedule's")

        def array(key):
            value = state.get(key)
            return None if value is None else np.asarray(value, dtype=np.float64)

        self._reset()
        self._origin = state["origin"]
        self._done = int(state["done"])
        self.phase = phase
        self._phase_start = int(state["phase_start"])
        self._decision = int(state["decision"])
        self._progress = float(state["progress"])
        self._ramp_start = int(state["ramp_start"])
        self._anchor = int(state["anchor"])
        self.replans = int(state["replans"])
        windows = state["windows"]
        self._upper_window.load_list(windows["upper"])
        self._lower_window.load_list(windows["lower"])
        self._drift_window.load_list(windows["drift"])
        self._measured_upper = array("measured_upper")
        self._upper, self._lower = array("upper"), array("lower")
        self.plan = plan
        self._ratios = np.zeros(dag.num_actions) if plan is None else np.array(plan.ratios)
        self.history = [(int(s), str(p), str(e)) for s, p, e in state.get("history", [])]
        self._masks = {}
        for s, mb, bits, ratio in state["masks"]:
            if s not in self._units:
                raise ValueError(f"state masks: stage {s} is not a stage of {self._where}")
            if bits is None:
                self._masks[s, mb] = None
                continue
            units = self._units[s]
            frozen = np.unpackbits(np.frombuffer(bytes.fromhex(bits), dtype=np.uint8), count=len(units))
            if len(bytes.fromhex(bits)) != (len(units) + 7) // 8:
                raise ValueError(f"state masks: stage {s} has {len(units)} units, the state another count")
            self._masks[s, mb] = StageMasks(units=units, ratio=float(ratio), frozen=frozen.astype(bool))
        if state.get("policy") is not None:
            if not isinstance(self.policy, StatefulPolicy):
                raise ValueError("state holds a policy state, but the policy has no load_state_dict")
            self.policy.load_state_dict(state["policy"])
        pending = state.get("pending")
        if pending is not None:
            upper = np.asarray(pending["upper"], dtype=np.float64)
            lower = np.asarray(pending["lower"], dtype=np.float64)
            done = self._done
            self._done = int(pending["submitted_at"])
            warm = self.plan if pending["kind"] == "replan" else None
            self._submit(pending["kind"], upper, lower, warm=warm)
            self._done = done
            self._event(f"resumed; re-running the pending {pending['kind']} solve")
