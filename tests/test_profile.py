"""tfz.profile: the JSON format, its strict loader, and durations against hand computations."""

import json
import math
import re

import numpy as np
import pytest

from tfz.dag import build_dag
from tfz.profile import ActionTimes, Profile, StageTimes
from tfz.schedule import Action, build_schedule, make_schedule


def _dag(orders, M):
    return build_dag(make_schedule("custom", [[Action.parse(x) for x in o.split()] for o in orders], M))


# stage 0 uses a full backward for microbatch 0 and a split one for microbatch 1
MIXED = (["0F0 0F1 0B0 0I1 0W1", "1F0 1B0 1F1 1I1 1W1"], 2)

MIXED_PROFILE = {
    "format": "tfz-profile",
    "version": 1,
    "unit": "ms",
    "stages": {
        "0": {"F": 1.0, "I": 2.0, "W": 3.0, "W_frozen": 0.5},
        "1": {"F": 1.5, "I": 1.0, "W": 2.0, "W_frozen": 0.25, "B": 2.5, "B_frozen": 1.5},
    },
    "actions": {"0W1": {"frozen": 0.1}, "1F1": {"unfrozen": 9.0}},
    "meta": {"model": "toy", "device": "cpu"},
}

# (unfrozen, frozen) per action, worked out by hand from the rules in the module docstring
MIXED_EXPECTED = {
    "0F0": (1.0, 1.0),
    "0F1": (1.0, 1.0),
    "0B0": (5.0, 2.5),  # I + W, I + W_frozen
    "0I1": (2.0, 2.0),
    "0W1": (3.0, 0.1),  # override of the frozen time only
    "1F0": (1.5, 1.5),
    "1B0": (2.5, 1.5),  # explicit B / B_frozen
    "1F1": (9.0, 9.0),  # F override: frozen follows unfrozen
    "1I1": (1.0, 1.0),
    "1W1": (2.0, 0.25),
}


def test_durations_match_hand_computation():
    dag = _dag(*MIXED)
    up, low = Profile.from_dict(MIXED_PROFILE).durations(dag)
    assert up.dtype == np.float64 and low.dtype == np.float64
    assert up.shape == low.shape == (dag.num_actions,)
    for v, a in enumerate(dag.actions):
        assert (up[v], low[v]) == MIXED_EXPECTED[str(a)], str(a)


@pytest.mark.parametrize("name,P,M", [("gpipe", 3, 4), ("1f1b", 4, 6)])
def test_uniform_profile(name, P, M):
    dag = build_dag(build_schedule(name, P, M))
    f, i, w, wf = 1.25, 0.5, 2.0, 0.125
    up, low = Profile.uniform(f, i, w, wf).durations(dag)
    for v, a in enumerate(dag.actions):
        expect = {"F": (f, f), "I": (i, i), "W": (w, wf), "B": (i + w, i + wf)}[a.kind]
        assert (up[v], low[v]) == pytest.approx(expect, rel=1e-15)


def test_default_covers_unlisted_stages_and_stages_win():
    d = {
        "format": "tfz-profile",
        "version": 1,
        "stages": {"1": {"F": 4.0, "I": 1.0, "W": 1.0}},
        "default": {"F": 2.0, "B": 3.0, "B_frozen": 1.0},
    }
    dag = build_dag(build_schedule("gpipe", 3, 2))
    up, low = Profile.from_dict(d).durations(dag)
    for v, a in enumerate(dag.actions):
        if a.stage == 1:
            expect = (4.0, 4.0) if a.kind == "F" else (2.0, 1.0)  # W_frozen defaults to 0
        else:
            expect = (2.0, 2.0) if a.kind == "F" else (3.0, 1.0)
        assert (up[v], low[v]) == expect, str(a)


def test_round_trip(tmp_path):
    p = Profile.from_dict(MIXED_PROFILE)
    path = tmp_path / "p.json"
    p.save(path)
    on_disk = json.loads(path.read_text())
    assert on_disk["format"] == "tfz-profile" and on_disk["version"] == 1 and on_disk["unit"] == "ms"
    q = Profile.load(path)
    assert q == p
    assert q.meta == {"model": "toy", "device": "cpu"}
    assert Profile.from_dict(q.to_dict()) == p
    dag = _dag(*MIXED)
    for a, b in zip(p.durations(dag), q.durations(dag)):
        np.testing.assert_array_equal(a, b)
    u = Profile.uniform(1.0, 2.0, 3.0, 0.5)
    u.save(path)
    assert Profile.load(path) == u


@pytest.mark.parametrize("unit,scale", [("us", 1e-3), ("s", 1e3), ("ms", 1.0)])
def test_units_convert_to_ms(tmp_path, unit, scale):
    d = dict(MIXED_PROFILE, unit=unit)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    up, low = Profile.load(path).durations(_dag(*MIXED))
    ref_up, ref_low = Profile.from_dict(MIXED_PROFILE).durations(_dag(*MIXED))
    np.testing.assert_allclose(up, ref_up * scale, rtol=1e-12)
    np.testing.assert_allclose(low, ref_low * scale, rtol=1e-12)


def _with(**changes):
    d = json.loads(json.dumps(MIXED_PROFILE))
    for dotted, value in changes.items():
        keys = dotted.split("__")
        node = d
        for k in keys[:-1]:
            node = node[k]
        if value is _DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return json.dumps(d)


_DELETE = object()
S0 = {"F": 1.0, "I": 2.0, "W": 3.0}


@pytest.mark.parametrize(
    "text,field",
    [
        ("{", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"format": "tfz-profile", "format": "x"}', "duplicate key 'format'"),
        (_with(format="other"), "format"),
        (_with(version=2), "version"),
        (_with(version=True), "version"),
        (_with(version=_DELETE), "version"),
        (_with(unit="min"), "unit"),
        (_with(unit=[]), "unit: expected one of ms, us, s, got []"),
        (_with(unit={}), "unit: expected one of ms, us, s, got {}"),
        (_with(stage={}), "unknown key 'stage'"),
        (_with(stages=[1, 2]), "stages"),
        (_with(stages={}), "no stage times"),
        (_with(stages={"a": S0}), "stage key"),
        (_with(stages={"-1": S0}), "stage key"),
        (_with(stages={"1": S0, "01": S0}), "listed twice"),
        (_with(stages={"0": [1.0]}), "stages.0"),
        (_with(stages__0__F=_DELETE), "stages.0.F"),
        (_with(stages__0__F="1.0"), "stages.0.F"),
        (_with(stages__0__F=True), "stages.0.F"),
        (_with(stages__0__I=-0.5), "stages.0.I"),
        (_with(stages__0__w_frozen=0.5), "unknown key 'w_frozen'"),
        (_with(stages__0__W=_DELETE), "stages.0: 'I' is given without 'W'"),
        (_with(stages__0__W_frozen=3.5), "stages.0.W_frozen"),
        (_with(stages__1__B_frozen=2.6), "stages.1.B_frozen"),
        (_with(stages__0={"F": 1.0, "B": 2.0}), "B_frozen"),
        (_with(stages__0={"F": 1.0}), "stages.0"),
        (_with(stages__0={"F": 1.0, "B": 2.0, "B_frozen": 1.0, "W_frozen": 0.1}), "stages.0.W_frozen"),
        (_with(stages__0__F=float("nan")), "NaN"),
        (_with(stages__0__F=float("inf")), "Infinity"),
        (_with(stages__0__F=1e400).replace("Infinity", "1e400"), "stages.0.F"),
        (_with(actions={"2X3": {"unfrozen": 1.0}}), "actions.2X3"),
        (_with(actions={"0F0": {}}), "actions.0F0"),
        (_with(actions={"0F0": 1.0}), "actions.0F0"),
        (_with(actions={"0F0": {"unfrozen": 1.0, "frozen": 0.5}}), "actions.0F0.frozen"),
        (_with(actions={"0W0": {"unfrozen": 1.0, "frozen": 1.5}}), "actions.0W0.frozen"),
        (_with(actions={"0W0": {"unfrozen": 1.0, "fast": 0.5}}), "unknown key 'fast'"),
        (_with(actions={"0W0": {"unfrozen": 1.0}, " 0W0": {"unfrozen": 2.0}}), "listed twice"),
        (_with(meta=[1]), "meta"),
    ],
)
def test_malformed_profile_names_file_and_field(tmp_path, text, field):
    path = tmp_path / "bad_profile.json"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        Profile.load(path)
    msg = str(err.value)
    assert str(path) in msg and field in msg, msg
    assert "\n" not in msg


def test_non_utf8_file(tmp_path):
    path = tmp_path / "binary.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match="UTF-8"):
        Profile.load(path)


def test_missing_file_is_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        Profile.load(tmp_path / "absent.json")


@pytest.mark.parametrize(
    "profile,message",
    [
        ({"stages": {"0": {"F": 1.0, "B": 2.0, "B_frozen": 1.0}}}, "no times for stage 1"),
        (
            {"stages": {"0": S0, "1": {"F": 1.0, "B": 2.0, "B_frozen": 1.0}}},
            "stage 1 has no I time for action 1I1",
        ),
        ({"default": S0, "actions": {"9F9": {"unfrozen": 1.0}}}, "'9F9'"),
        ({"default": dict(S0, W_frozen=0.5), "actions": {"1W1": {"unfrozen": 0.25}}}, "1W1"),
        ({"default": dict(S0, W_frozen=0.5), "actions": {"0B0": {"frozen": 5.5}}}, "0B0"),
    ],
)
def test_durations_errors_name_stage_or_action(profile, message):
    p = Profile.from_dict({"format": "tfz-profile", "version": 1, **profile})
    with pytest.raises(ValueError, match=None) as err:
        p.durations(_dag(*MIXED))
    assert message in str(err.value)


def test_random_profiles_frozen_bounds():
    """Frozen <= unfrozen everywhere; F and I never change; B = I + W unless given."""
    rng = np.random.default_rng(0)
    dag = build_dag(build_schedule("1f1b", 4, 5))
    for _ in range(20):
        stages = {}
        for s in range(4):
            f, i, w = rng.uniform(0.1, 3.0, 3)
            stages[s] = StageTimes(f=f, i=i, w=w, w_frozen=w * rng.uniform(0, 1), where=f"stages.{s}")
        up, low = Profile(stages=stages).durations(dag)
        assert np.all(low <= up)
        for v, a in enumerate(dag.actions):
            st = stages[a.stage]
            if a.kind == "F":
                assert up[v] == low[v] == st.f
            else:
                assert up[v] == pytest.approx(st.i + st.w) and low[v] == pytest.approx(st.i + st.w_frozen)


def test_direct_construction_is_validated():
    with pytest.raises(ValueError, match="stage.F"):
        StageTimes(f=-1.0, i=1.0, w=1.0)
    with pytest.raises(ValueError, match="W_frozen"):
        StageTimes(f=1.0, i=1.0, w=1.0, w_frozen=2.0)
    with pytest.raises(ValueError, match="no times"):
        Profile()
    with pytest.raises(ValueError, match="uniform.W"):
        Profile.uniform(1.0, 1.0, float("nan"))
    with pytest.raises(ValueError, match="W_frozen"):
        Profile.uniform(1.0, 1.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="actions.0F0"):
        Profile(default=StageTimes(f=1.0, b=2.0, b_frozen=1.0), actions={"0F0": ActionTimes()})
    with pytest.raises(ValueError, match="stage index"):
        Profile(stages={"0": StageTimes(f=1.0, b=2.0, b_frozen=1.0)})


def test_b_given_with_split_times_checks_derived_frozen():
    with pytest.raises(ValueError, match=r"I \+ W_frozen"):
        StageTimes(f=1.0, i=1.0, w=2.0, w_frozen=1.0, b=1.5)  # frozen I + W_frozen = 2 > B


def test_override_names_are_canonical():
    p = Profile(default=StageTimes(f=1.0, i=1.0, w=1.0), actions={" 1F0 ": ActionTimes(unfrozen=4.0)})
    assert list(p.actions) == ["1F0"]
    up, _ = p.durations(_dag(*MIXED))
    assert up[_dag(*MIXED).index["1F0"]] == 4.0


# -- hostile files -----------------------------------------------------------------------------------


def _load_text(tmp_path, text):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        Profile.load(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "\n" not in msg and len(msg) < 400, msg
    return msg


def test_a_time_of_400_digits_is_named(tmp_path):
    text = '{"format": "tfz-profile", "version": 1, "default": {"F": 1%s, "I": 1, "W": 1}}' % ("0" * 399)
    msg = _load_text(tmp_path, text)
    assert "default.F: time must be finite and >= 0, got 1000" in msg and "(400 characters)" in msg


def test_deeply_nested_meta_is_refused(tmp_path):
    depth = 100_000
    text = '{"format": "tfz-profile", "version": 1, "default": {"F": 1, "B": 2, "B_frozen": 1}, "meta": '
    text += '{"a": ' * depth + "1" + "}" * depth + "}"
    assert "invalid JSON: nested too deeply" in _load_text(tmp_path, text)


def test_file_size_limit(tmp_path, monkeypatch):
    import tfz.profile

    path = tmp_path / "p.json"
    Profile.uniform(1, 1, 1).save(path)
    size = path.stat().st_size
    monkeypatch.setattr(tfz.profile, "MAX_BYTES", size - 1)
    with pytest.raises(ValueError, match=rf"{size:,} bytes is larger than a profile may be"):
        Profile.load(path)
    monkeypatch.setattr(tfz.profile, "MAX_BYTES", size)
    assert Profile.load(path) == Profile.uniform(1, 1, 1)


def test_stage_keys_and_action_names_are_bounded(tmp_path):
    base = '{"format": "tfz-profile", "version": 1, '
    msg = _load_text(tmp_path, base + '"stages": {"%s": {"F": 1, "B": 1, "B_frozen": 1}}}' % ("9" * 5000))
    assert "stage key must be a decimal index such as '0' (at most 9 digits)" in msg
    actions = '"actions": {"0F%s": {"unfrozen": 1}}}' % ("1" * 5000)
    msg = _load_text(tmp_path, base + '"default": {"F": 1, "I": 1, "W": 1}, ' + actions)
    assert "malformed action '0F1111" in msg and "(5004 characters)" in msg
    with pytest.raises(ValueError, match="malformed action 7"):
        Profile(default=StageTimes(1.0, 1.0, 1.0), actions={7: ActionTimes(1.0)})


@pytest.mark.parametrize(
    "stages,message",
    [
        (
            {0: 1, 1: 1, 2: 1, 3: 1, 4: 1},
            "stage 4 (5 stages listed, up to 4), but the schedule has 4 stages (0-3)",
        ),
        ({0: 1, 7: 1}, "stage 7 (2 stages listed, up to 7), but the schedule has 4 stages (0-3)"),
    ],
)
def test_profile_of_more_stages_than_the_schedule_is_refused(stages, message):
    dag = build_dag(build_schedule("1f1b", 4, 4))
    default = StageTimes(1.0, 1.0, 1.0)
    profile = Profile(stages={s: StageTimes(float(t), 1.0, 1.0) for s, t in stages.items()}, default=default)
    with pytest.raises(ValueError) as err:
        profile.durations(dag)
    assert message in str(err.value)
    fewer = Profile(stages={0: StageTimes(2.0, 1.0, 1.0)}, default=default)  # the default fills in
    assert fewer.durations(dag)[0].max() == 2.0


def test_random_stages_draws_one_set_per_stage_in_range():
    import numpy as np

    from tfz.profile import Profile

    a = Profile.random_stages(3, np.random.default_rng(5))
    b = Profile.random_stages(3, np.random.default_rng(5))
    assert a == b and sorted(a.stages) == [0, 1, 2]
    for t in a.stages.values():
        assert all(0.8 <= v <= 1.2 for v in (t.f, t.i, t.w))
        assert 0.05 * t.w <= t.w_frozen <= 0.3 * t.w
    with pytest.raises(ValueError, match="num_stages"):
        Profile.random_stages(0, np.random.default_rng(0))


def test_a_failed_save_keeps_the_old_file_and_names_the_path(tmp_path):
    """A save that fails part-way (a full disk, ``ulimit -f``) leaves the old file, and no temporary
    file beside it."""
    from _cli import file_size_limit

    path = tmp_path / "p.json"
    path.write_text("old")
    profile = Profile.random_stages(64, np.random.default_rng(0))
    with file_size_limit(1024), pytest.raises(OSError) as err:
        profile.save(path)
    assert err.value.filename == str(path) and "File too large" in str(err.value)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["p.json"]
    profile.save(path)
    assert Profile.load(path) == profile


def test_numpy_times_are_stored_as_floats_and_save(tmp_path):
    """numpy scalars become Python floats, so the profile saves and loads back equal."""
    p = Profile(
        default=StageTimes(f=np.float32(1.5), i=np.int64(1), w=np.float64(2.0), w_frozen=np.float16(0.5)),
        actions={"0B0": ActionTimes(unfrozen=np.float32(4.0), frozen=np.int32(1))},
    )
    assert p.default == StageTimes(1.5, 1.0, 2.0, 0.5)
    assert all(type(v) is float for v in p.default.to_dict().values())
    assert all(type(v) is float for v in p.actions["0B0"].to_dict().values())
    p.save(tmp_path / "p.json")
    back = Profile.load(tmp_path / "p.json")
    assert back.default == p.default and back.actions == p.actions


@pytest.mark.parametrize(
    "meta,where", [({"note": float("nan")}, "meta.note"), ({"a": [1, -math.inf]}, "meta.a[1]")]
)
def test_save_refuses_non_finite_meta(tmp_path, meta, where):
    p = Profile(default=StageTimes(1.0, 1.0, 1.0), meta=meta)
    with pytest.raises(ValueError, match=re.escape(f"{where}: JSON holds finite numbers only")):
        p.save(tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()
