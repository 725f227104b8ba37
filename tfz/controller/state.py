"""Everything a TimelyFreeze controller changes while it runs (:class:`ControllerState`), and its
checkpoint form.

``ControllerState.to_dict(layout)`` gives plain python types (JSON-able). ``from_dict(data, layout)``
checks the whole checkpoint against the controller it is loaded into (:class:`Layout`: its config,
schedule, rank and stage units) and every field, and only then builds a new state, so a failed load
changes nothing. Every problem is a ValueError that names the key (``state.windows.upper[3]``).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tfz._validate import check_int, check_number, check_ratio, is_int, is_number
from tfz.controller._solve import SolveJob
from tfz.controller.config import TimelyFreezeConfig
from tfz.controller.estimates import FitWindow, TimingWindow
from tfz.dag import DAG
from tfz.masks import LayerSpec, StageMasks, StageUnits
from tfz.plan import Plan
from tfz.schedule import FREEZABLE_KINDS

__all__ = ["STATE_VERSION", "ControllerState", "Layout", "Pending", "Phase"]

STATE_VERSION = 4
"""2: schedule identity, unit layouts and the partly frozen monitoring window (version 1 is refused).
3: the gap between actions and the unfrozen window's batch times; a version 2 state loads without
them (no batch times, gap 0: what its run planned with).
4: the batch window also records the stable phase's steps (the drift check refits the gap); a
version 3 state loads as it is (its stable batch window is empty)."""
_VERSIONS = (2, 3, STATE_VERSION)


class Phase(str, enum.Enum):
    """Controller phases, in order (see :mod:`tfz.controller.timely`)."""

    WARMUP = "warmup"
    MONITOR_UPPER = "monitor_upper"
    MONITOR_LOWER = "monitor_lower"
    SOLVING = "solving"
    RAMP = "ramp"
    STABLE = "stable"


NO_MASKS = (Phase.WARMUP, Phase.MONITOR_UPPER, Phase.SOLVING)
"""Phases in which nothing is frozen."""

_KINDS = ("initial", "replan")
_ADDED_IN_V2 = {"plan.makespan_slack": 0.0}
"""Pinned config keys added after version 2 was written, with the value checkpoints without them ran
under: such a checkpoint resumes a run that pins this value, and is refused under any other."""


@dataclass
class Pending:
    """A solve between submission and adoption. ``job`` exists on the leader only (pipeline rank 0 of
    replica 0) and is not part of the checkpoint (a resume re-runs the solve)."""

    kind: str
    """"initial" or "replan"."""
    upper: np.ndarray
    lower: np.ndarray
    submitted_at: int
    """Relative step count at submission; the first poll is at a later decision step."""
    job: SolveJob | None = None


@dataclass(frozen=True, eq=False)
class Layout:
    """What a checkpoint must match: the controller's config, schedule, rank and local stages."""

    config: TimelyFreezeConfig
    dag: DAG
    rank: int
    where: str
    """This process in messages ("rank 1")."""
    local: np.ndarray
    """int [k]: indices of this process's actions in ``dag.actions`` (the columns of every window)."""
    units: Mapping[int, StageUnits]
    """Freezable units of every local stage."""

    def schedule(self) -> dict[str, Any]:
        """The schedule's identity: name, sizes and a digest of every rank's action order."""
        sched = self.dag.schedule
        digest = hashlib.sha1(sched.format().encode()).hexdigest()[:16]
        return {
            "name": sched.name,
            "ranks": sched.num_ranks,
            "microbatches": sched.num_microbatches,
            "stages": sched.num_stages,
            "actions": digest,
        }

    def unit_layout(self) -> list[dict[str, Any]]:
        """Per local stage: block_rows, its layers (name, rows, columns) and whole tensors (name, numel)."""
        out = []
        for stage, units in self.units.items():
            layers = [
                [s.name, s.out_features, s.in_features] for s in units.specs if isinstance(s, LayerSpec)
            ]
            tensors = [[s.name, s.numel] for s in units.specs if not isinstance(s, LayerSpec)]
            out.append({"stage": stage, "block_rows": units.block_rows, "layers": layers, "tensors": tensors})
        return out


@dataclass(eq=False)
class ControllerState:
    """Everything a controller changes while it runs; relative step counts (``done`` steps ended)."""

    upper_window: TimingWindow
    """Monitoring, nothing frozen: per-step action times (cleared once the bounds are fitted)."""
    lower_window: FitWindow
    """Monitoring, partly (or fully) frozen: times, active fractions, levels (cleared likewise)."""
    drift_window: TimingWindow
    """Stable phase: per-step times since the plan took effect, for the drift check."""
    batch_window: TimingWindow
    """Measured batch times (ms, width 1) of the steps that gave one: the unfrozen monitoring's, then
    the stable phase's beside ``drift_window``."""
    origin: int | None = None
    """The training loop's number of the first step (None before the first ``step_end``)."""
    done: int = 0
    phase: Phase = Phase.WARMUP
    phase_start: int = 0
    decision: int = 0
    """Mask redraws so far (the ``step`` of ``tfz.masks.select``)."""
    progress: float = 0.0
    """Ramp factor on the plan's ratios."""
    ramp_start: int = 0
    anchor: int = 0
    """Step at which the current plan took effect (drift windows start after it)."""
    replans: int = 0
    upper: np.ndarray | None = None
    """float64 [n] unfrozen bounds behind the plan (None before the first plan)."""
    lower: np.ndarray | None = None
    """float64 [n] frozen bounds behind the plan."""
    gap: float = 0.0
    """Time (ms) between actions, added to every action for the LP and the predicted batch
    (:func:`~tfz.controller.estimates.fit_gap`); 0 until fitted, or when no batch time was given."""
    plan: Plan | None = None
    masks: dict[tuple[int, int], StageMasks | None] = field(default_factory=dict)
    """Masks of every local (stage, microbatch) for the current step (empty in ``NO_MASKS`` phases)."""
    pending: Pending | None = None
    history: list[tuple[int, str, str]] = field(default_factory=list)
    """(first step under the change, phase, text) of every event."""

    @classmethod
    def initial(cls, layout: Layout) -> ControllerState:
        size, width = layout.config.median_window, len(layout.local)
        return cls(
            TimingWindow(size, width),
            FitWindow(size, width),
            TimingWindow(size, width),
            TimingWindow(size, 1),
        )

    # ------------------------------------------------------------------ checkpoint form

    def to_dict(self, layout: Layout) -> dict[str, Any]:
        """Plain python types. A solve in flight is stored as its inputs."""
        p = self.pending
        pending = None
        if p is not None:
            pending = {
                "kind": p.kind,
                "upper": p.upper.tolist(),
                "lower": p.lower.tolist(),
                "submitted_at": p.submitted_at,
            }
        return {
            "version": STATE_VERSION,
            "config": layout.config.to_dict(),
            "schedule": layout.schedule(),
            "rank": layout.rank,
            "units": layout.unit_layout(),
            "origin": self.origin,
            "done": self.done,
            "phase": self.phase.value,
            "phase_start": self.phase_start,
            "decision": self.decision,
            "progress": self.progress,
            "ramp_start": self.ramp_start,
            "anchor": self.anchor,
            "replans": self.replans,
            "windows": {
                "upper": self.upper_window.to_list(),
                "lower": self.lower_window.to_dict(),
                "drift": self.drift_window.to_list(),
                "batch": self.batch_window.to_list(),
            },
            "upper": None if self.upper is None else self.upper.tolist(),
            "lower": None if self.lower is None else self.lower.tolist(),
            "gap": self.gap,
            "plan": None if self.plan is None else self.plan.to_dict(),
            "masks": [
                [
                    s,
                    mb,
                    None if m is None else np.packbits(m.frozen).tobytes().hex(),
                    0.0 if m is None else m.ratio,
                ]
                for (s, mb), m in sorted(self.masks.items())
            ],
            "pending": pending,
            "history": [list(h) for h in self.history],
        }

    @classmethod
    def from_dict(cls, data: Any, layout: Layout) -> ControllerState:
        """A new state from :meth:`to_dict`'s form, after checking all of it against ``layout``.

        Raises TypeError when ``data`` is not a mapping, ValueError naming the key for anything else:
        another version, schedule, rank, config or unit layout, a missing key, a wrong type, a
        non-finite or out-of-range number, arrays or windows of the wrong size, bad masks, or fields
        that contradict each other (a ramp without a plan...).
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"state must be a mapping, got {type(data).__name__}")
        d = _Fields(data, "state")
        version = _check_identity(d, layout)
        dag, cfg = layout.dag, layout.config
        n, width, size = dag.num_actions, len(layout.local), cfg.median_window

        done = d.int("done")
        try:
            phase = Phase(d["phase"])
        except (ValueError, TypeError):
            raise ValueError(
                f"state.phase must be one of {[p.value for p in Phase]}, got {d['phase']!r}"
            ) from None
        origin = d.int("origin", minimum=None, optional=True)
        if origin is None and done:
            raise ValueError(f"state.origin is None, but state.done is {done} (steps have ended)")
        st = cls.initial(layout)
        st.origin, st.done, st.phase = origin, done, phase
        st.phase_start = d.int("phase_start", maximum=done)
        st.ramp_start = d.int("ramp_start", maximum=done)
        st.anchor = d.int("anchor", maximum=done)
        st.decision = d.int("decision")
        st.replans = d.int("replans")
        st.progress = d.ratio("progress")

        w = d.sub("windows")
        st.upper_window.load_list(w.rows("upper", width, size))
        lower = w.sub("lower")
        rows = [lower.rows(c, width, size, high=None if c == "times" else 1.0) for c in FitWindow.CHANNELS]
        if len({len(r) for r in rows}) != 1:
            raise ValueError(
                f"state.windows.lower: its channels have {[len(r) for r in rows]} rows, not one count"
            )
        st.lower_window.load_dict(dict(zip(FitWindow.CHANNELS, rows)))
        st.drift_window.load_list(w.rows("drift", width, size))
        if version >= 3:  # version 2 had no batch times
            st.batch_window.load_list(w.rows("batch", 1, size))

        st.upper = d.floats("upper", n, optional=True)
        st.lower = d.floats("lower", n, optional=True)
        if (st.upper is None) != (st.lower is None):
            raise ValueError("state.upper and state.lower must both be None or both be arrays")
        if st.upper is not None:
            _check_bounds("state", st.upper, st.lower, dag)
        if version >= 3:  # version 2 planned without a gap
            st.gap = check_number(d.name("gap"), d["gap"], low=0.0, unit="ms")
        st.plan = _plan(d, dag)
        if (st.plan is None) != (st.upper is None):
            raise ValueError("state.plan and state.upper/lower must both be None or both be present")
        st.masks = _masks(d, layout, phase)
        st.pending = _pending(d, n, done, dag)
        st.history = d.history()
        _check_phase(st, cfg)
        return st


# ---------------------------------------------------------------------- reading and checking


class _Fields:
    """One mapping of a checkpoint; every error is a ValueError naming the key's path."""

    def __init__(self, data: Any, path: str):
        if not isinstance(data, Mapping):
            raise ValueError(f"{path} must be a mapping, got {type(data).__name__}")
        self.data, self.path = data, path

    def name(self, key: str) -> str:
        return f"{self.path}.{key}"

    def __getitem__(self, key: str) -> Any:
        if key not in self.data:
            raise ValueError(f"{self.path} is missing key {key!r}")
        return self.data[key]

    def sub(self, key: str) -> _Fields:
        return _Fields(self[key], self.name(key))

    def int(self, key: str, minimum: int | None = 0, maximum: int | None = None, optional: bool = False):
        return check_int(self.name(key), self[key], minimum, maximum=maximum, optional=optional)

    def ratio(self, key: str) -> float:
        return check_ratio(self.name(key), self[key])

    def list(self, key: str) -> list | tuple:
        value = self[key]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{self.name(key)} must be a list, got {type(value).__name__}")
        return value

    def floats(
        self, key: str, n: int, optional: bool = False, high: float | None = None
    ) -> np.ndarray | None:
        value = self[key]
        if optional and value is None:
            return None
        return _floats(self.name(key), value, n, high)

    def rows(self, key: str, width: int, size: int, high: float | None = None) -> list[np.ndarray]:
        value = self.list(key)
        if len(value) > size:
            raise ValueError(f"{self.name(key)} has {len(value)} rows, more than the window's {size}")
        return [_floats(f"{self.name(key)}[{i}]", row, width, high) for i, row in enumerate(value)]

    def history(self) -> list[tuple[int, str, str]]:
        out = []
        for i, entry in enumerate(self.list("history")):
            ok = isinstance(entry, (list, tuple)) and len(entry) == 3 and is_int(entry[0])
            if not ok or not all(isinstance(x, str) for x in entry[1:]):
                raise ValueError(f"state.history[{i}] must be [step, phase, text], got {entry!r}")
            out.append((int(entry[0]), entry[1], entry[2]))
        return out


def _floats(name: str, value: Any, n: int, high: float | None = None) -> np.ndarray:
    """float64 [n] of finite numbers >= 0 (and <= high), else ValueError naming ``name``."""
    if not isinstance(value, (list, tuple)) or len(value) != n:
        got = f"{len(value)} values" if isinstance(value, (list, tuple)) else type(value).__name__
        raise ValueError(f"{name} must be a list of {n} numbers, got {got}")
    for i, x in enumerate(value):
        if not is_number(x):
            raise ValueError(f"{name}[{i}] must be a number, got {x!r}")
    out = np.asarray(value, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(out) | (out < 0) | (out > (np.inf if high is None else high)))
    if len(bad):
        limit = ">= 0" if high is None else f"in [0, {high:g}]"
        raise ValueError(f"{name}[{bad[0]}] must be a finite number {limit}, got {value[bad[0]]!r}")
    return out


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (a checkpoint's form after JSON)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _check_identity(d: _Fields, layout: Layout) -> int:
    """The state's version, after checking that it was saved by this schedule, rank, config and units."""
    version = d["version"]
    if version not in _VERSIONS or not is_int(version):
        old = (
            " (a checkpoint of an older tfz, before schedules and units were recorded)"
            if version == 1
            else ""
        )
        raise ValueError(f"state.version: expected one of {_VERSIONS}, got {version!r}{old}")
    saved, mine = _plain(d["schedule"]), layout.schedule()
    if saved != mine:

        def show(s):
            if not isinstance(s, Mapping):
                return repr(s)
            return (
                f"{s.get('name')!r} with {s.get('ranks')} ranks, {s.get('microbatches')} microbatches, "
                f"{s.get('stages')} stages"
            )

        same = isinstance(saved, Mapping) and all(saved.get(k) == mine[k] for k in mine if k != "actions")
        detail = "; the action orders differ" if same else ""
        raise ValueError(
            f"state.schedule: the state is for {show(saved)}, this controller runs {show(mine)}{detail}"
        )
    rank = d["rank"]
    if rank != layout.rank or not is_int(rank):
        raise ValueError(f"state.rank: the state was saved by rank {rank!r}, this is rank {layout.rank}")
    config = d["config"]
    if not isinstance(config, Mapping):
        raise ValueError(f"state.config must be a mapping, got {type(config).__name__}")
    plan = config.get("plan")
    saved = (
        {**config, **{f"plan.{k}": v for k, v in plan.items()}} if isinstance(plan, Mapping) else dict(config)
    )
    pinned = layout.config.pinned()
    saved = {**_ADDED_IN_V2, **saved}
    differ = [k for k in pinned if _plain(saved.get(k, "<missing>")) != pinned[k]]
    if differ:
        detail = ", ".join(f"{k}: {saved.get(k, '<missing>')!r} -> {pinned[k]!r}" for k in differ)
        raise ValueError(f"state.config: the state was saved with a different config ({detail})")
    saved_units = _plain(d["units"])
    if not isinstance(saved_units, list) or not all(
        isinstance(u, Mapping) and is_int(u.get("stage")) for u in saved_units
    ):
        raise ValueError(f"state.units must be a list of one mapping per stage, got {saved_units!r:.80}")
    by_stage = {u.get("stage"): u for u in saved_units}
    if sorted(by_stage) != sorted(layout.units) or len(saved_units) != len(layout.units):
        raise ValueError(
            f"state.units: the state has units of stages {[u.get('stage') for u in saved_units]}, "
            f"{layout.where} runs stages {sorted(layout.units)}"
        )
    for mine in layout.unit_layout():
        theirs = by_stage[mine["stage"]]
        if theirs != mine:
            raise ValueError(
                f"state.units: stage {mine['stage']}'s units differ from the state's "
                f"({_unit_difference(theirs, mine)})"
            )
    return int(version)


def _unit_difference(theirs: Mapping, mine: dict) -> str:
    if theirs.get("block_rows") != mine["block_rows"]:
        return f"block_rows {theirs.get('block_rows')!r} in the state, {mine['block_rows']} here"
    for kind in ("layers", "tensors"):
        a, b = theirs.get(kind), mine[kind]
        if a == b:
            continue
        names = [x[0] for x in b]
        saved = [x[0] if isinstance(x, list) and x else x for x in a] if isinstance(a, list) else a
        if saved != names:
            return f"{kind} {saved!r:.200} in the state, {names} here"
        for x, y in zip(a, b):
            if x != y:
                return f"{kind[:-1]} {y[0]!r} is {x[1:]} in the state, {y[1:]} here"
    return "the entry differs"


def _check_bounds(path: str, upper: np.ndarray, lower: np.ndarray, dag: DAG) -> None:
    """lower <= upper, and lower == upper where an action cannot freeze (F, I); ``path`` is the
    mapping holding both ("state", "state.pending")."""
    over = np.flatnonzero(lower > upper)
    if len(over):
        i = int(over[0])
        raise ValueError(
            f"{path}.lower[{i}] ({dag.names[i]}: {lower[i]}) exceeds {path}.upper[{i}] ({upper[i]})"
        )
    odd = np.flatnonzero(~dag.kind_mask(*FREEZABLE_KINDS) & (lower != upper))
    if len(odd):
        i = int(odd[0])
        raise ValueError(
            f"{path}.lower[{i}] ({dag.names[i]}: {lower[i]}) differs from {path}.upper[{i}] ({upper[i]}), "
            "but the action cannot freeze"
        )


def _plan(d: _Fields, dag: DAG) -> Plan | None:
    value = d["plan"]
    if value is None:
        return None
    try:
        plan = Plan.from_dict(dict(value) if isinstance(value, Mapping) else value)
    except Exception as exc:  # noqa: BLE001 - the planner's parser; any failure is a bad field
        raise ValueError(f"state.plan: {exc}") from None
    if plan.names != dag.names:
        raise ValueError("state.plan: its action names differ from this schedule's")
    return plan


def _masks(d: _Fields, layout: Layout, phase: Phase) -> dict[tuple[int, int], StageMasks | None]:
    M = layout.dag.schedule.num_microbatches
    out: dict[tuple[int, int], StageMasks | None] = {}
    for i, entry in enumerate(d.list("masks")):
        where = f"state.masks[{i}]"
        if not isinstance(entry, (list, tuple)) or len(entry) != 4:
            raise ValueError(
                f"{where} must be [stage, microbatch, frozen units as hex or None, ratio], got {entry!r}"
            )
        stage, mb, bits, ratio = entry
        if not is_int(stage) or stage not in layout.units:
            raise ValueError(
                f"{where}: stage {stage!r} is not a stage of {layout.where} ({sorted(layout.units)})"
            )
        mb = check_int(f"{where} microbatch", mb, 0, maximum=M - 1)
        ratio = check_ratio(f"{where} ratio", ratio)
        if (stage, mb) in out:
            raise ValueError(f"{where}: a second mask for stage {stage}, microbatch {mb}")
        if bits is None:
            out[stage, mb] = None
            continue
        units = layout.units[stage]
        nbytes = (len(units) + 7) // 8
        try:
            raw = bytes.fromhex(bits) if isinstance(bits, str) else None
        except ValueError:
            raw = None
        if raw is None or len(raw) != nbytes:
            raise ValueError(
                f"{where}: frozen units must be a hex string of {nbytes} bytes (stage {stage} has "
                f"{len(units)} units) or None, got {bits!r}"
            )
        flags = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))
        if flags[len(units) :].any():
            raise ValueError(f"{where}: {bits!r} marks units beyond the {len(units)} of stage {stage}")
        out[stage, mb] = StageMasks(units=units, ratio=ratio, frozen=flags[: len(units)].astype(bool))
    want = {(s, mb) for s in layout.units for mb in range(M)}
    if phase in NO_MASKS and any(m is not None for m in out.values()):
        raise ValueError(f"state.masks: masks in phase {phase.value!r}, which freezes nothing")
    if phase not in NO_MASKS and set(out) != want:
        missing = sorted(want - set(out))
        raise ValueError(
            f"state.masks: phase {phase.value!r} needs a mask (or None) for every local (stage, microbatch); "
            f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}"
        )
    return out


def _pending(d: _Fields, n: int, done: int, dag: DAG) -> Pending | None:
    if d["pending"] is None:
        return None
    p = d.sub("pending")
    kind = p["kind"]
    if kind not in _KINDS:
        raise ValueError(f"state.pending.kind must be one of {list(_KINDS)}, got {kind!r}")
    upper, lower = p.floats("upper", n), p.floats("lower", n)
    _check_bounds("state.pending", upper, lower, dag)
    return Pending(kind, upper, lower, p.int("submitted_at", maximum=done))


def _check_phase(st: ControllerState, cfg: TimelyFreezeConfig) -> None:
    """Fields that must agree with the phase (what the next ``step_end`` relies on)."""
    phase, pending, name = st.phase, st.pending, st.phase.value

    def need(ok: bool, text: str) -> None:
        if not ok:
            raise ValueError(f"{text} (state.phase {name!r})")

    def recorded(steps: int) -> int:
        return max(0, min(cfg.median_window, steps - cfg.discard_steps))

    elapsed = st.done - st.phase_start
    before_plan = phase in (Phase.WARMUP, Phase.MONITOR_UPPER, Phase.MONITOR_LOWER, Phase.SOLVING)
    if before_plan:
        need(st.plan is None, "state.plan: a plan before the first solve")
        need(st.progress == 0.0, f"state.progress is {st.progress} before a plan")
    if phase is not Phase.SOLVING and before_plan:
        need(pending is None, "state.pending: a solve pending before monitoring ended")
        length = cfg.warmup if phase is Phase.WARMUP else cfg.monitor
        need(elapsed < length, f"state.done - state.phase_start: {elapsed} steps in a phase of {length}")
    upper = {Phase.MONITOR_UPPER: recorded(elapsed), Phase.MONITOR_LOWER: recorded(cfg.monitor)}.get(phase, 0)
    lower = recorded(elapsed) if phase is Phase.MONITOR_LOWER else 0
    have = (len(st.upper_window), len(st.lower_window))
    need(have[0] == upper, f"state.windows.upper has {have[0]} rows, expected {upper}")
    need(have[1] == lower, f"state.windows.lower has {have[1]} rows, expected {lower}")
    batch = len(st.batch_window)
    beside = ("drift", len(st.drift_window)) if phase is Phase.STABLE else ("upper", have[0])
    need(
        batch <= beside[1],
        f"state.windows.batch has {batch} rows, more than the {beside[1]} of windows.{beside[0]}",
    )
    need(
        phase is Phase.STABLE or len(st.drift_window) == 0,
        "state.windows.drift: rows outside the stable phase",
    )
    if phase is Phase.SOLVING:
        need(pending is not None and pending.kind == "initial", "state.pending: the initial solve is missing")
    if phase in (Phase.RAMP, Phase.STABLE):
        need(st.plan is not None, "state.plan: no plan")
        need(pending is None or pending.kind == "replan", "state.pending: an initial solve after the plan")
        ok = st.progress > 0.0 and (phase is Phase.RAMP or st.progress == 1.0)
        need(ok, f"state.progress is {st.progress}")
    if phase is Phase.RAMP:
        ramped = st.done - st.ramp_start
        need(ramped < cfg.ramp, f"state.done - state.ramp_start: {ramped} steps into a ramp of {cfg.ramp}")
