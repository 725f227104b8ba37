"""Profile data: action durations of one training step, unfrozen and frozen (``tfz.profile``).

Measuring them is :mod:`tfz.measure`.

A :class:`Profile` gives every action of a :class:`tfz.dag.DAG` two durations in milliseconds:

- **unfrozen** (upper bound): nothing frozen;
- **frozen** (lower bound): all parameters of the stage frozen. Only weight gradients shrink, so
  F and I keep their time, W drops to ``W_frozen`` and a full backward B (= I + W) drops to
  ``I + W_frozen``.

JSON format (version 1), as written by :meth:`Profile.save` and read by :meth:`Profile.load`::

    {"format": "tfz-profile", "version": 1, "unit": "ms",
     "stages":  {"0": {"F": 1.0, "I": 1.1, "W": 0.9, "W_frozen": 0.05}, "1": {...}},
     "default": {"F": 1.0, "I": 1.0, "W": 1.0, "W_frozen": 0.0},
     "actions": {"2W3": {"unfrozen": 1.2, "frozen": 0.1}, "0F1": {"unfrozen": 0.8}},
     "meta": {"model": "...", "device": "..."}}

- ``format``, ``version`` are required; ``unit`` is ``"ms"`` (default), ``"us"`` or ``"s"``; times
  are converted to milliseconds on load.
- ``stages`` maps a stage index (decimal string) to its times; ``default`` covers stages that are
  not listed. At least one of the two is required. Keys of a stage entry:

  ===========  ==========================================================================
  ``F``        forward (required)
  ``I``, ``W`` input-gradient and weight-gradient backward (give both or neither)
  ``W_frozen`` W with all parameters frozen (optional, default 0; needs ``W``)
  ``B``        full backward (optional, default ``I + W``)
  ``B_frozen`` B fully frozen (optional, default ``I + W_frozen``; required when ``B`` is
               given without ``I``/``W``)
  ===========  ==========================================================================

  A stage needs either ``I`` and ``W`` or ``B``; split-backward schedules need ``I`` and ``W``.
- ``actions`` (optional) overrides single actions by name (``<stage><F|B|I|W><microbatch>``) with
  ``unfrozen`` and/or ``frozen``. F and I actions have no separate frozen time (``frozen``, if
  given, must equal ``unfrozen``). Overrides win over stage times.
- ``meta`` (optional) is free-form and kept as is.

Times are finite and >= 0 and a frozen time never exceeds its unfrozen time. Unknown keys are
errors, so a typo (``"w_frozen"``) never goes unnoticed. Every error is a ValueError that names
the file and the field (``profile.json: stages.2.W_frozen: ...``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field
from typing import Any

import numpy as np

from tfz._io import write_files
from tfz._validate import check_int, is_int, is_number, short_repr
from tfz.schedule import KINDS, Action
from tfz.schedule.limits import read_capped

__all__ = ["FORMAT", "MAX_BYTES", "VERSION", "ActionTimes", "Profile", "StageTimes"]

FORMAT = "tfz-profile"
VERSION = 1
MAX_BYTES = 128 * 2**20
"""Largest profile file :meth:`Profile.load` reads (128 MiB: per-action times for more than
:data:`tfz.schedule.MAX_ACTIONS` actions)."""
_UNITS = {"ms": 1.0, "us": 1e-3, "s": 1e3}
_TOP_KEYS = ("format", "version", "unit", "stages", "default", "actions", "meta")
_STAGE_KEYS = ("F", "I", "W", "W_frozen", "B", "B_frozen")
_ACTION_KEYS = ("unfrozen", "frozen")


def _time(value: Any, where: str, scale: float = 1.0) -> float:
    if not is_number(value):
        raise ValueError(f"{where}: expected a number, got {short_repr(value)}")
    try:
        t = float(value) * scale
    except OverflowError:  # an integer of hundreds of digits
        t = math.inf
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"{where}: time must be finite and >= 0, got {short_repr(value)}")
    return t


@dataclass(frozen=True)
class StageTimes:
    """Per-action times of one stage in milliseconds (see the module docstring for the rules).

    ``where`` names the stage in error messages (``"stages.2"``); it is not stored.
    """

    f: float
    i: float | None = None
    w: float | None = None
    w_frozen: float | None = None
    """Defaults to 0 when ``w`` is given."""
    b: float | None = None
    """Defaults to ``i + w``."""
    b_frozen: float | None = None
    """Defaults to ``i + w_frozen``."""
    where: InitVar[str] = "stage"

    def __post_init__(self, where: str):
        for key in _STAGE_KEYS:  # kept as plain floats: numpy scalars would not serialise
            value = getattr(self, key.lower())
            if value is not None or key == "F":
                object.__setattr__(self, key.lower(), _time(value, f"{where}.{key}"))
        self.validate(where)

    def validate(self, where: str) -> None:
        """Raise ValueError naming ``where`` and the field on inconsistent times (the fields are
        floats or None)."""
        if (self.i is None) != (self.w is None):
            given, missing = ("I", "W") if self.w is None else ("W", "I")
            raise ValueError(f"{where}: {given!r} is given without {missing!r}; give both or neither")
        if self.w is None and self.w_frozen is not None:
            raise ValueError(f"{where}.W_frozen: given without 'W'")
        if self.w is None and self.b is None:
            raise ValueError(f"{where}: needs 'I' and 'W' or 'B' (backward times)")
        if self.b is None and self.b_frozen is not None and self.i is None:
            raise ValueError(f"{where}.B_frozen: given without 'B'")
        if self.b is not None and self.i is None and self.b_frozen is None:
            raise ValueError(f"{where}: 'B' is given without 'I'/'W', so 'B_frozen' is required")
        w, wf = self.w, self.w_frozen
        if w is not None and wf is not None and wf > w:
            raise ValueError(f"{where}.W_frozen: frozen time {wf} exceeds unfrozen W {w}")
        b, bf = self.backward()
        if bf > b:
            frozen = "B_frozen" if self.b_frozen is not None else "I + W_frozen"
            raise ValueError(f"{where}.B_frozen: frozen full backward ({frozen}) {bf} exceeds unfrozen B {b}")

    def backward(self) -> tuple[float, float]:
        """(unfrozen, frozen) time of a full backward B."""
        b = self.b if self.b is not None else self.i + self.w
        if self.b_frozen is not None:
            return b, self.b_frozen
        return b, self.i + (self.w_frozen or 0.0)

    def table(self) -> tuple[list[float], list[float]]:
        """(unfrozen, frozen) time per kind in ``KINDS`` order; NaN where the stage has no time."""
        nan = math.nan
        b, bf = self.backward()
        i = nan if self.i is None else self.i
        w = nan if self.w is None else self.w
        wf = nan if self.w is None else (self.w_frozen or 0.0)
        times = {"F": (self.f, self.f), "B": (b, bf), "I": (i, i), "W": (w, wf)}
        return [times[k][0] for k in KINDS], [times[k][1] for k in KINDS]

    def to_dict(self) -> dict[str, float]:
        return {k: getattr(self, k.lower()) for k in _STAGE_KEYS if getattr(self, k.lower()) is not None}

    @classmethod
    def from_dict(cls, d: Any, where: str = "stage", scale: float = 1.0) -> StageTimes:
        if not isinstance(d, Mapping):
            raise ValueError(
                f"{where}: expected an object with keys {', '.join(_STAGE_KEYS)}, got {short_repr(d)}"
            )
        _check_keys(d, _STAGE_KEYS, where)
        if "F" not in d:
            raise ValueError(f"{where}.F: missing (forward time is required)")
        kw = {k.lower(): _time(d[k], f"{where}.{k}", scale) for k in _STAGE_KEYS if k in d}
        return cls(**kw, where=where)


@dataclass(frozen=True)
class ActionTimes:
    """Override for one action: ``unfrozen`` and/or ``frozen`` time in milliseconds."""

    unfrozen: float | None = None
    frozen: float | None = None

    def to_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in _ACTION_KEYS if getattr(self, k) is not None}


def _check_keys(d: Mapping, allowed: tuple[str, ...], where: str) -> None:
    for key in d:
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {short_repr(key)}; allowed: {', '.join(allowed)}")


def _parse_action_override(name: Any, d: Any, where: str, scale: float) -> tuple[str, ActionTimes]:
    try:
        action = Action.parse(name)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if not isinstance(d, Mapping) or not d:
        raise ValueError(f"{where}: expected an object with 'unfrozen' and/or 'frozen', got {short_repr(d)}")
    _check_keys(d, _ACTION_KEYS, where)
    times = ActionTimes(**{k: _time(d[k], f"{where}.{k}", scale) for k in _ACTION_KEYS if k in d})
    if action.kind in ("F", "I") and times.frozen is not None and times.frozen != times.unfrozen:
        raise ValueError(
            f"{where}.frozen: {action.kind} actions have no frozen time (frozen must equal unfrozen)"
        )
    if times.unfrozen is not None and times.frozen is not None and times.frozen > times.unfrozen:
        raise ValueError(f"{where}.frozen: frozen time {times.frozen} exceeds unfrozen {times.unfrozen}")
    return str(action), times


def _non_finite(value: Any, where: str) -> tuple[str, Any] | None:
    """(path, value) of the first NaN or infinity in nested mappings and lists, else None."""
    if isinstance(value, Mapping):
        items = ((f"{where}.{k}", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    else:
        finite = not is_number(value) or is_int(value) or math.isfinite(value)
        return None if finite else (where, value)
    return next((bad for w, v in items if (bad := _non_finite(v, w)) is not None), None)


@dataclass(frozen=True)
class Profile:
    """Per-stage times plus optional per-action overrides; unit: milliseconds."""

    stages: Mapping[int, StageTimes] = field(default_factory=dict)
    default: StageTimes | None = None
    """Times of stages missing from ``stages``."""
    actions: Mapping[str, ActionTimes] = field(default_factory=dict)
    """Overrides keyed by action name (``"2W3"``)."""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.stages and self.default is None:
            raise ValueError("profile has no times: give 'stages' or 'default'")
        for s, times in self.stages.items():
            check_int("stages: stage index", s, 0)
            if not isinstance(times, StageTimes):
                raise TypeError(f"stages.{s}: expected StageTimes, got {type(times).__name__}")
        actions = {}
        for name, times in self.actions.items():
            key, parsed = _parse_action_override(name, times.to_dict(), f"actions.{name}", 1.0)
            if key in actions:
                raise ValueError(f"actions.{name}: action {key} is listed twice")
            actions[key] = parsed
        object.__setattr__(self, "actions", actions)  # canonical names ("2W3"), plain float times

    @classmethod
    def uniform(cls, f: float, i: float, w: float, w_frozen: float = 0.0) -> Profile:
        """Every stage: forward ``f``, input-gradient ``i``, weight-gradient ``w`` (``w_frozen``
        frozen); a full backward takes ``i + w`` (``i + w_frozen`` frozen)."""
        times = {"F": f, "I": i, "W": w, "W_frozen": w_frozen}
        return cls(default=StageTimes.from_dict(times, "uniform"))

    @classmethod
    def random_stages(cls, num_stages: int, rng: np.random.Generator) -> Profile:
        """One set of times per stage, as ``tfz profile`` writes them, drawn from ``rng``: F, I and W in
        [0.8, 1.2], W frozen at 5-30% of W (planner tests and benchmarks)."""
        stages = {}
        for s in range(check_int("num_stages", num_stages, 1)):
            f, i, w = rng.uniform(0.8, 1.2, 3)
            frozen = w * rng.uniform(0.05, 0.3)
            stages[s] = StageTimes(f=float(f), i=float(i), w=float(w), w_frozen=float(frozen))
        return cls(stages=stages)

    def stage_times(self, stage: int) -> StageTimes:
        """Times of ``stage``; ValueError naming it if the profile has none."""
        times = self.stages.get(stage, self.default)
        if times is None:
            listed = ", ".join(map(str, sorted(self.stages)))
            raise ValueError(f"profile has no times for stage {stage} (stages: {listed}; no 'default')")
        return times

    def durations(self, dag) -> tuple[np.ndarray, np.ndarray]:
        """(unfrozen, frozen) float64 arrays [n] aligned with ``dag.actions``.

        F, I: frozen == unfrozen. W: ``W`` / ``W_frozen``. B: ``I + W`` / ``I + W_frozen`` unless
        the stage gives ``B`` / ``B_frozen``. Per-action overrides win. ValueError if the profile
        lacks a stage or a time the DAG needs, lists a stage the DAG does not have, overrides an
        action the DAG does not have, or a frozen time exceeds its unfrozen one.
        """
        S = dag.num_stages
        extra = sorted(s for s in self.stages if s >= S)
        if extra:
            raise ValueError(
                f"profile has times for stage {extra[0]} ({len(self.stages)} stages listed, up to "
                f"{max(self.stages)}), but the schedule has {S} stages (0-{S - 1}); a profile of "
                "another model split would be misread"
            )
        up = np.empty((S, len(KINDS)))
        low = np.empty((S, len(KINDS)))
        for s in np.unique(dag.stage).tolist():
            up[s], low[s] = self.stage_times(s).table()
        unfrozen = up[dag.stage, dag.kind]
        frozen = low[dag.stage, dag.kind]
        missing = np.flatnonzero(np.isnan(unfrozen))
        if len(missing):
            a = dag.actions[missing[0]]
            need = "'I' and 'W'" if a.kind in "IW" else "'B' or 'I' and 'W'"
            raise ValueError(f"profile stage {a.stage} has no {a.kind} time for action {a}: give {need}")
        for name, times in self.actions.items():
            v = dag.index.get(name)
            if v is None:
                raise ValueError(
                    f"profile overrides action {short_repr(name)}, which the schedule does not have"
                )
            if times.unfrozen is not None:
                unfrozen[v] = times.unfrozen
                if dag.actions[v].kind in ("F", "I"):
                    frozen[v] = times.unfrozen
            if times.frozen is not None:
                frozen[v] = times.frozen
        bad = np.flatnonzero(frozen > unfrozen)
        if len(bad):
            v = bad[0]
            raise ValueError(
                f"profile: frozen time {frozen[v]} of {dag.actions[v]} exceeds its unfrozen {unfrozen[v]}"
            )
        return unfrozen, frozen

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"format": FORMAT, "version": VERSION, "unit": "ms"}
        d["stages"] = {str(s): self.stages[s].to_dict() for s in sorted(self.stages)}
        if self.default is not None:
            d["default"] = self.default.to_dict()
        if self.actions:
            d["actions"] = {name: t.to_dict() for name, t in self.actions.items()}
        d["meta"] = dict(self.meta)
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str = "profile") -> Profile:
        """Parse the JSON object ``d``; errors name ``source`` and the field."""
        try:
            return cls._from_dict(d)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def _from_dict(cls, d: Any) -> Profile:
        if not isinstance(d, Mapping):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        _check_keys(d, _TOP_KEYS, "top level")
        for key, expected in (("format", FORMAT), ("version", VERSION)):
            if key not in d:
                raise ValueError(f"{key}: missing (expected {expected!r})")
            if d[key] != expected or isinstance(d[key], bool):
                raise ValueError(f"{key}: expected {expected!r}, got {short_repr(d[key])}")
        unit = d.get("unit", "ms")
        if not isinstance(unit, str) or unit not in _UNITS:
            raise ValueError(f"unit: expected one of {', '.join(_UNITS)}, got {short_repr(unit)}")
        scale = _UNITS[unit]
        stages_in = d.get("stages", {})
        if not isinstance(stages_in, Mapping):
            raise ValueError(f"stages: expected an object keyed by stage index, got {short_repr(stages_in)}")
        stages = {}
        for key, value in stages_in.items():
            if not (isinstance(key, str) and key.isascii() and key.isdecimal() and len(key) <= 9):
                raise ValueError(
                    f"stages: stage key must be a decimal index such as '0' (at most 9 digits), "
                    f"got {short_repr(key)}"
                )
            if int(key) in stages:
                raise ValueError(f"stages.{key}: stage {int(key)} is listed twice")
            stages[int(key)] = StageTimes.from_dict(value, f"stages.{key}", scale)
        default = None
        if "default" in d:
            default = StageTimes.from_dict(d["default"], "default", scale)
        if not stages and default is None:
            raise ValueError("stages: no stage times (give 'stages' or 'default')")
        actions_in = d.get("actions", {})
        if not isinstance(actions_in, Mapping):
            raise ValueError(
                f"actions: expected an object keyed by action name, got {short_repr(actions_in)}"
            )
        actions = {}
        for key, value in actions_in.items():
            where = f"actions.{key}" if len(key) <= 40 else f"actions.{key[:30]}..."
            name, times = _parse_action_override(key, value, where, scale)
            if name in actions:
                raise ValueError(f"{where}: action {name} is listed twice")
            actions[name] = times
        meta = d.get("meta", {})
        if not isinstance(meta, Mapping):
            raise ValueError(f"meta: expected an object, got {short_repr(meta)}")
        return cls(stages=stages, default=default, actions=actions, meta=dict(meta))

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON format (unit ms), whole or not at all; an OSError names ``path``."""
        bad = _non_finite(self.meta, "meta")
        if bad is not None:
            where, value = bad
            raise ValueError(f"{where}: JSON holds finite numbers only, got {short_repr(value)}")
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        write_files({path: (text + "\n").encode("utf-8")})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        """Read a profile file. OSError if unreadable; ValueError naming the file and field if
        malformed, nested too deeply or larger than :data:`MAX_BYTES`."""
        raw = read_capped(path, MAX_BYTES, "a profile", "tfz.profile.MAX_BYTES")
        try:
            d = json.loads(
                raw.decode("utf-8"),
                object_pairs_hook=_unique_keys,
                parse_constant=_no_constant,
                parse_float=_finite_float,
            )
        except RecursionError:
            raise ValueError(f"{path}: invalid JSON: nested too deeply") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a UTF-8 text file") from None
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}: invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            ) from None
        except ValueError as exc:
            raise ValueError(f"{path}: invalid JSON: {exc}") from None
        return cls.from_dict(d, source=str(path))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {short_repr(key)}")
        out[key] = value
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not a valid time")


class _Overflow(float):
    """A JSON number beyond float64 (``1e400``): infinite, but shown as written in messages."""

    def __new__(cls, text: str):
        self = super().__new__(cls, text)
        self.text = text
        return self

    def __repr__(self) -> str:
        return self.text


def _finite_float(text: str) -> float:
    value = float(text)
    return value if math.isfinite(value) else _Overflow(text)
