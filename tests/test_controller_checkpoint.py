"""TimelyFreeze checkpoints: a resumed controller continues exactly as an uninterrupted one (resumed at
every step of a run, with partial and with all-frozen monitoring); a state of another schedule, rank,
config or model, or with any malformed field, is refused with a ValueError naming the key and leaves
the controller unchanged (a table of known cases and a random-corruption property test).
"""

import copy
import dataclasses
import io
import json
import threading

import numpy as np
import pytest
import torch
from _controller_sim import BLOCK, RotatingPolicy, Synthetic, make, run_to_stable, small, true_times
from torch import nn

from tfz.controller import Phase, TimelyFreeze
from tfz.dag import build_dag
from tfz.nn import FreezableLinear
from tfz.plan import PlanConfig, solve
from tfz.schedule import build_schedule

SCHED = ("1f1b", 2, 4)


def trace(policy_factory, resume_at=None, steps=46, drift_at=30, gap_at=38, monitoring="partial", edit=None):
    """Run 46 steps (every phase, a drift re-plan, then a drift between actions and its re-plan),
    optionally saving at ``resume_at`` through JSON and continuing in a new controller (from
    ``edit(state)`` if given); per step, everything the controller exposes."""
    sched = build_schedule(*SCHED)
    cfg = small(ramp_steps=4, monitoring=monitoring)
    c = make(cfg, sched, policy=policy_factory())
    syn = Synthetic(c.dag, noise=0.01, gap=0.3)
    out = []
    saved = None
    for k in range(steps):
        if k == drift_at:
            syn.u, syn.l = true_times(c.dag, scale_stage=0, factor=1.4)
        if k == gap_at:
            syn.gap = 1.0
        if k == resume_at:
            state = saved = json.loads(json.dumps(c.state_dict()))
            c = make(cfg, sched, policy=policy_factory())
            c.load_state_dict(state if edit is None else edit(state))
        masks = [c.masks_for(s, mb) for s in (0, 1) for mb in range(4)]
        est = c.estimates
        out.append(
            (
                c.phase.value,
                c.decision,
                c.progress,
                None if c.plan is None else c.plan.ratios.tolist(),
                [None if m is None else m.frozen.tolist() for m in masks],
                c.requested_ratios().tolist(),
                None if est is None else [est[0].tolist(), est[1].tolist()],
                c.gap,
            )
        )
        t = syn.times(k, c)
        c.step_end(k, t, batch_ms=syn.batch_ms(t))
        c.observe(k)
    return out, c, saved


def assert_same_trace(got, want, where):
    """Phases, decisions, progress, masks and requested ratios equal; plan ratios and estimates equal
    up to LP tolerance (a re-plan after a resume starts cold, see TimelyFreeze.state_dict)."""
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        assert (a[0], a[1], a[2], a[4], a[5]) == (b[0], b[1], b[2], b[4], b[5]), f"{where}: step {k}"
        for i in (3, 6, 7):
            assert (a[i] is None) == (b[i] is None), f"{where}: step {k}"
            if a[i] is not None:
                np.testing.assert_allclose(a[i], b[i], atol=1e-9, err_msg=f"{where}: step {k}")


@pytest.mark.parametrize("monitoring", ["partial", "frozen"])
def test_resume_at_every_step_continues_identically(monitoring):
    reference, c, _ = trace(RotatingPolicy, monitoring=monitoring)
    phases = [r[0] for r in reference]
    assert c.replans == 2  # the run includes both kinds of re-plan
    assert [e.split(":")[0] for _, _, e in c.history if e.startswith("drift")] == [
        "drift on stage 0",
        "drift between actions",
    ]
    final = c.state_dict()
    covered = set()
    for resume_at in range(1, len(reference)):
        resumed, d, state = trace(RotatingPolicy, resume_at=resume_at, monitoring=monitoring)
        where = f"resumed at step {resume_at} ({phases[resume_at]})"
        assert_same_trace(resumed, reference, where)
        end = d.state_dict()
        for key in ("windows", "masks", "upper", "lower", "gap", "done", "decision", "phase"):
            assert end[key] == final[key], f"{where}: {key}"
        covered.add((state["phase"], None if state["pending"] is None else state["pending"]["kind"]))
    assert {p for p, _ in covered} == {p.value for p in Phase}
    assert ("solving", "initial") in covered and ("stable", "replan") in covered


def test_a_checkpoint_from_before_makespan_slack_resumes_under_slack_0_only():
    """Checkpoints written before ``PlanConfig.makespan_slack`` existed ran with slack 0: one resumes
    exactly under slack 0 and is refused, naming the key, under any other slack."""
    reference, _, _ = trace(RotatingPolicy)

    def older(state):
        return with_(state, ["config", "plan", "makespan_slack"], DROP)

    for resume_at in (5, 20, 35):
        resumed, _, saved = trace(RotatingPolicy, resume_at=resume_at, edit=older)
        assert "makespan_slack" in saved["config"]["plan"]
        assert_same_trace(resumed, reference, f"resumed at step {resume_at}")
    cfg = small(ramp_steps=4)
    other = make(
        dataclasses.replace(cfg, plan=dataclasses.replace(cfg.plan, makespan_slack=0.02)),
        build_schedule(*SCHED),
        policy=RotatingPolicy(),
    )
    assert_refused_unchanged(other, older(saved), r"state.config: .*plan.makespan_slack: 0.0 -> 0.02")


def test_a_version_2_checkpoint_resumes_without_a_gap():
    """Version 2 states had no batch times and planned without a gap: one resumes in every phase as
    its run went on (no batch times: gap 0), and a version 3 state without them is refused."""

    def run(resume_at=None):
        sched, cfg = build_schedule(*SCHED), small(ramp_steps=4)
        c = make(cfg, sched, policy=RotatingPolicy())
        syn = Synthetic(c.dag, noise=0.01)
        out = []
        for k in range(40):
            if k == resume_at:
                state = json.loads(json.dumps(c.state_dict()))
                for path in (["gap"], ["windows", "batch"]):
                    state = with_(state, path, DROP)
                c = make(cfg, sched, policy=RotatingPolicy())
                c.load_state_dict({**state, "version": 2})
            out.append((c.phase.value, c.decision, None if c.plan is None else c.plan.ratios.tolist(), c.gap))
            c.step_end(k, syn.times(k, c))
            c.observe(k)
        return out

    reference = run()
    assert {p for p, *_ in reference} == {p.value for p in Phase}
    for resume_at in (3, 7, 12, 20, 30):
        assert run(resume_at) == reference, resume_at
    stable = states_along_a_run()["stable"]
    assert stable["gap"] == pytest.approx(0.3, abs=0.01)  # 1% noise on times of 1-4 ms
    c = target()
    assert_refused_unchanged(c, with_(stable, ["gap"], DROP), r"state is missing key 'gap'")
    assert_refused_unchanged(
        c, with_(stable, ["windows", "batch"], DROP), r"state.windows is missing key 'batch'"
    )
    assert_refused_unchanged(
        c, with_(stable, ["gap"], -0.5), r"state.gap must be a finite number of ms >= 0, got -0.5"
    )


def test_a_version_3_checkpoint_resumes_and_the_stable_batch_window_is_checked():
    """Version 3 recorded no batch times in the stable phase: such a state (its batch window empty)
    resumes, and the drift between actions is still found once the window has refilled. A stable
    state with more batch rows than drift rows is refused, naming both."""
    reference, _, _ = trace(RotatingPolicy)

    def older(state):
        return {**with_(state, ["windows", "batch"], []), "version": 3}

    for resume_at in (20, 36):
        resumed, c, saved = trace(RotatingPolicy, resume_at=resume_at, edit=older)
        assert saved["phase"] == "stable" and saved["windows"]["batch"]
        assert_same_trace(resumed[:resume_at], reference[:resume_at], f"before the resume at {resume_at}")
        assert c.replans == 2 and any(e.startswith("drift between actions") for _, _, e in c.history)
        assert c.gap == pytest.approx(1.0, abs=0.05)
    stable = states_along_a_run()["stable"]
    assert len(stable["windows"]["drift"]) == len(stable["windows"]["batch"]) == 2
    extra = with_(stable, ["windows", "drift"], stable["windows"]["drift"][:1])
    refused = r"state.windows.batch has 2 rows, more than the 1 of windows.drift"
    assert_refused_unchanged(target(), extra, refused)


def test_resume_without_policy_state_differs():
    """The policy's state matters: resuming with a policy that forgets it changes the masks."""

    class Forgetful(RotatingPolicy):
        def state_dict(self):
            return {"offset": 0}

    reference, _, _ = trace(RotatingPolicy)
    resumed, _, _ = trace(Forgetful, resume_at=25)
    assert_same_trace(resumed[:25], reference[:25], "before the resume")
    assert [r[4] for r in resumed[25:]] != [r[4] for r in reference[25:]]


def test_a_state_of_another_selection_policy_is_refused():
    """Another policy would draw other masks after the resume; a state saved before the policy was
    recorded (no ``policy_kind``) still loads."""
    from tfz.masks import RandomPolicy

    c = make(small(), build_schedule(*SCHED))
    run_to_stable(c, Synthetic(c.dag), extra=1)
    state = json.loads(json.dumps(c.state_dict()))
    assert state["policy_kind"] == repr(RandomPolicy())
    other = make(small(), build_schedule(*SCHED), policy=RandomPolicy(front_bias_stages=()))
    assert_refused_unchanged(other, state, r"policy_kind: the state was saved under 'RandomPolicy\(front_")
    rotating = make(small(), build_schedule(*SCHED), policy=RotatingPolicy())
    assert_refused_unchanged(rotating, state, "this controller runs '_controller_sim.RotatingPolicy'")
    del state["policy_kind"]
    other.load_state_dict(state)
    assert other.phase is Phase.STABLE


def test_state_dict_is_plain_and_records_what_it_belongs_to():
    c = make(small(), build_schedule(*SCHED))
    run_to_stable(c, Synthetic(c.dag), extra=2)
    state = c.state_dict()
    assert json.loads(json.dumps(state)) == json.loads(json.dumps(state, sort_keys=True))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == state
    assert {k: state["schedule"][k] for k in ("name", "ranks", "microbatches", "stages")} == {
        "name": "1f1b",
        "ranks": 2,
        "microbatches": 4,
        "stages": 2,
    }
    # stage_module(): layers "0" (42 x 32) and "1" (32 x 42), block_rows 4 -> 11 + 8 = 19 units
    assert state["units"][0] == {
        "stage": 0,
        "block_rows": 4,
        "layers": [["0", 42, 32], ["1", 32, 42]],
        "tensors": [],
    }
    assert state["config"]["plan"]["max_freeze_ratio"] == 0.8 and state["rank"] == 0
    # a changed resumable field (drift threshold) is allowed
    d = make(small(drift_threshold=0.3), build_schedule(*SCHED))
    d.load_state_dict(state)
    assert d.phase is Phase.STABLE and np.array_equal(d.plan.ratios, c.plan.ratios)


def test_resume_during_async_solve_reruns_it():
    cfg = small(async_solve=True)
    sched = build_schedule(*SCHED)
    gate = threading.Event()

    def blocked(*args, **kwargs):
        gate.wait(30)
        return solve(*args, **kwargs)

    c = make(cfg, sched, solver=blocked)
    syn = Synthetic(c.dag)
    k = 0
    while c.phase is not Phase.SOLVING:
        c.step_end(k, syn.times(k, c))
        k += 1
    state = c.state_dict()
    assert state["pending"]["kind"] == "initial"
    gate.set()
    d = make(cfg, sched)
    d.load_state_dict(state)
    assert d.solving and d.wait_for_solve(30)
    while d.phase is Phase.SOLVING:
        d.step_end(k, syn.times(k, d))
        k += 1
    ref = solve(d.dag, syn.u, syn.l, PlanConfig(max_freeze_ratio=0.8, action_cap=0.8))
    np.testing.assert_allclose(d.plan.ratios, ref.ratios, atol=1e-5)


# ---------------------------------------------------------------- refused states change nothing


def states_along_a_run(monitoring="partial"):
    """JSON round-tripped states of a real run, one per phase, plus a re-plan in flight."""
    out = {}
    c = make(small(ramp_steps=4, monitoring=monitoring), build_schedule(*SCHED), policy=RotatingPolicy())
    syn = Synthetic(c.dag, noise=0.01, gap=0.3)
    for k in range(46):
        if k == 30:
            syn.u, syn.l = true_times(c.dag, scale_stage=0, factor=1.4)
        key = c.phase.value + ("+replan" if c.solving and c.phase is Phase.STABLE else "")
        # the first state of each phase; the last of a monitoring half and of the stable phase before
        # the drift, whose windows hold rows
        if key not in out or key in ("monitor_upper", "monitor_lower") or (key == "stable" and k < 30):
            out[key] = json.loads(json.dumps(c.state_dict()))
        t = syn.times(k, c)
        c.step_end(k, t, batch_ms=syn.batch_ms(t))
        c.observe(k)
    assert set(out) == {p.value for p in Phase} | {"stable+replan"}
    return out


def target():
    """A controller in mid-run (ramp) that the bad states are loaded into."""
    c = make(small(ramp_steps=4), build_schedule(*SCHED), policy=RotatingPolicy())
    syn = Synthetic(c.dag)
    k = 0
    while c.phase is not Phase.RAMP:
        c.step_end(k, syn.times(k, c))
        c.observe(k)
        k += 1
    return c


def assert_refused_unchanged(c, state, match):
    """Loading ``state`` raises ValueError matching ``match``; the controller's state (all of it,
    the policy's included) is the same object with the same content afterwards."""
    inner, before = c._s, json.dumps(c.state_dict(), sort_keys=True)
    with pytest.raises(ValueError, match=match) as info:
        c.load_state_dict(state)
    assert c._s is inner and json.dumps(c.state_dict(), sort_keys=True) == before
    return str(info.value)


def widened_stage():
    """Stage 0's first layer 46 rows instead of 42: 12 + 8 = 20 row blocks instead of 19."""
    return nn.Sequential(FreezableLinear(32, 46), FreezableLinear(46, 32))


def with_(state, path, value):
    bad = copy.deepcopy(state)
    node = bad
    for key in path[:-1]:
        node = node[key]
    if value is DROP:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return bad


DROP = object()


def first_mask(state, pred=lambda e: e[2] is not None):
    return next(i for i, e in enumerate(state["masks"]) if pred(e))


def test_issue_cases_are_refused_naming_the_key():
    stable = states_along_a_run()["stable"]
    assert stable["windows"]["drift"] and stable["pending"] is None
    c = target()
    i = first_mask(stable)
    n = len(stable["upper"])
    cases = [
        (with_(stable, ["windows"], DROP), r"state is missing key 'windows'"),
        (
            with_(stable, ["masks", i, 2], "zz"),
            rf"state.masks\[{i}\]: frozen units must be a hex string of 3 bytes",
        ),
        (
            with_(stable, ["masks", i, 2], "fffff0"),
            rf"state.masks\[{i}\]: 'fffff0' marks units beyond the 19",
        ),
        (
            with_(stable, ["masks", i, 1], 99),
            rf"state.masks\[{i}\] microbatch must be an integer in \[0, 3\], got 99",
        ),
        (
            with_(stable, ["masks", i, 3], float("nan")),
            rf"state.masks\[{i}\] ratio must be a finite number .*nan",
        ),
        (with_(stable, ["masks", i, 0], 5), rf"state.masks\[{i}\]: stage 5 is not a stage of this process"),
        (with_(stable, ["upper"], [1.0]), rf"state.upper must be a list of {n} numbers, got 1 values"),
        (with_(stable, ["lower", 3], -1.0), r"state.lower\[3\] must be a finite number >= 0, got -1.0"),
        (
            with_(stable, ["version"], 1),
            r"state.version: expected one of \(2, 3, 4\), got 1 \(a checkpoint of an older tfz",
        ),
        (with_(stable, ["rank"], 1), r"state.rank: the state was saved by rank 1, this is rank 0"),
        (with_(stable, ["phase"], "frozen"), r"state.phase must be one of \['warmup'"),
        (with_(stable, ["plan"], None), r"state.plan and state.upper/lower must both be None"),
        (with_(stable, ["progress"], 0.5), r"state.progress is 0.5 \(state.phase 'stable'\)"),
        (
            with_(stable, ["windows", "drift", 0], [1.0] * 3),
            r"state.windows.drift\[0\] must be a list of 16 numbers, got 3 values",
        ),
        (with_(stable, ["policy"], DROP), r"state is missing key 'policy'"),
        (
            with_(stable, ["config", "mask_layout"], "independent"),
            r"state.config: .*mask_layout: 'independent' -> 'auto'",
        ),
        (with_(stable, ["config", "plan", "max_freeze_ratio"], 0.5), r"plan.max_freeze_ratio: 0.5 -> 0.8"),
        ({**stable, "masks": stable["masks"] + [stable["masks"][i]]}, r"a second mask for stage 0"),
    ]
    for state, match in cases:
        assert_refused_unchanged(c, state, match)
    # a state from 1f1b(2, 4) loaded into 1f1b(1, 8): same name, same number of actions
    one = TimelyFreeze(small(), build_schedule("1f1b", 1, 8), {0: nn.Sequential(FreezableLinear(32, 42))})
    assert one.dag.num_actions == c.dag.num_actions
    assert_refused_unchanged(
        one,
        stable,
        r"state.schedule: the state is for '1f1b' with 2 ranks, 4 microbatches, 2 stages, this controller "
        r"runs '1f1b' with 1 ranks, 8 microbatches, 1 stages",
    )
    # stage 0 widened from 19 to 20 row blocks
    wide = TimelyFreeze(small(ramp_steps=4), build_schedule(*SCHED), {0: widened_stage(), 1: make_stage1()})
    assert len(wide.units[0]) == 20
    assert_refused_unchanged(
        wide,
        stable,
        r"state.units: stage 0's units differ from the state's "
        r"\(layer '0' is \[42, 32\] in the state, \[46, 32\] here\)",
    )
    # another block size, another config
    assert_refused_unchanged(
        make(small(ramp_steps=4, block_rows=8), build_schedule(*SCHED)), stable, r"block_rows: 4 -> 8"
    )
    # the same schedule name and sizes, another action order (a CSV schedule would keep the name)
    gpipe = build_schedule("gpipe", 2, 4)
    other = copy.deepcopy(stable)
    other["schedule"]["actions"] = "0" * 16
    assert_refused_unchanged(c, other, r"state.schedule: .*; the action orders differ")
    assert gpipe.name != "1f1b"
    with pytest.raises(TypeError, match="state must be a mapping, got list"):
        c.load_state_dict([])


def make_stage1():
    from _controller_sim import stage_module

    return stage_module()


def test_a_policy_that_refuses_its_state_is_put_back():
    stable = with_(states_along_a_run()["stable"], ["policy_kind"], None)  # checked on its own above

    class Picky(RotatingPolicy):
        def load_state_dict(self, state):
            self.offset = state["offset"]  # changes itself, then fails
            if state["offset"] < 0:
                raise ValueError("negative offset")

    c = make(small(ramp_steps=4), build_schedule(*SCHED), policy=Picky())
    c.policy.offset = 7
    text = assert_refused_unchanged(
        c, with_(stable, ["policy", "offset"], -3), r"state.policy: the policy refused"
    )
    assert "negative offset" in text and c.policy.offset == 7
    plain = make(small(ramp_steps=4), build_schedule(*SCHED))  # RandomPolicy: stateless
    assert_refused_unchanged(plain, stable, r"state.policy: the state holds a policy state")
    assert_refused_unchanged(
        c, with_(stable, ["policy"], None), r"the policy is stateful, but the state holds no"
    )


def leaves(node, path=()):
    """Every (path, value) below ``node``: mapping keys and list positions."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaves(v, path + (i,))


def corruptions(value):
    """(kind, bad value) for one node: dropped, another type, NaN, out of range."""
    yield "drop", DROP
    other = {str: 7, dict: [1], list: {"x": 1}, type(None): "none", bool: "yes"}
    yield "type", other.get(type(value), "seven")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        yield "nan", float("nan")
        yield "range", -1
        yield "range", value + 10**6


def test_random_corruption_of_any_field_never_changes_the_controller():
    """Property: for real states of every phase, corrupt a random sample of every field's nodes
    (drop, wrong type, NaN, out of range): a refused load names the field and changes nothing; a
    load that is accepted leaves a controller that still runs. Corruptions that can never be valid
    (a dropped or mistyped top-level field, NaN outside the informational config/plan/history
    entries) must be refused."""
    rng = np.random.default_rng(0)
    c = target()
    syn = Synthetic(c.dag)
    good = c.state_dict()
    refused = accepted = 0
    for phase, state in states_along_a_run().items():
        nodes = [(p, v) for p, v in leaves(state) if p]
        by_field = {}
        for p, v in nodes:
            by_field.setdefault(p[0], []).append((p, v))
        for top, group in by_field.items():
            picks = rng.choice(len(group), size=min(6, len(group)), replace=False)
            for j in picks.tolist():
                path, value = group[j]
                for kind, bad in corruptions(value):
                    if kind == "drop" and isinstance(path[-1], int) and top in ("history",):
                        continue  # a shorter history is a valid history
                    broken = with_(state, list(path), bad)
                    inner, before = c._s, json.dumps(c.state_dict(), sort_keys=True)
                    where = f"{phase}: {kind} at {path}"
                    try:
                        c.load_state_dict(broken)
                    except ValueError as exc:
                        refused += 1
                        assert c._s is inner and json.dumps(c.state_dict(), sort_keys=True) == before, where
                        assert f"state.{top}" in str(exc) or f"key {top!r}" in str(exc), (where, str(exc))
                        continue
                    accepted += 1
                    informational = top in ("config", "plan", "history") or (
                        top == "policy" and kind != "drop"
                    )
                    optional = ("origin",) if kind == "type" else ("origin", "policy_kind")  # older states
                    must_refuse = len(path) == 1 and kind in ("drop", "type") and top not in optional
                    must_refuse |= kind == "nan" and not informational
                    assert not must_refuse, f"{where} was accepted"
                    step = c._s.origin + c._s.done if c._s.origin is not None else 0
                    for k in range(step, step + 3):  # an accepted state still runs
                        c.step_end(k, syn.times(k, c))
                    c.load_state_dict(good)
    assert refused > 10 * accepted > 0


@pytest.mark.parametrize("monitoring", ["partial", "frozen"])
def test_every_phase_state_loads_and_another_model_never_does(monitoring):
    states = states_along_a_run(monitoring)
    models = {
        "widened stage 0": (SCHED, {0: widened_stage(), 1: make_stage1()}, small(ramp_steps=4)),
        "1f1b(1, 8)": (("1f1b", 1, 8), {0: make_stage1()}, small(ramp_steps=4)),
        "gpipe(2, 4)": (("gpipe", 2, 4), None, small(ramp_steps=4)),
        "block_rows 8": (SCHED, None, small(ramp_steps=4, block_rows=8)),
        "other monitoring": (
            SCHED,
            None,
            small(ramp_steps=4, monitoring={"partial": "frozen"}.get(monitoring, "partial")),
        ),
    }
    for name, state in states.items():
        fresh = make(
            small(ramp_steps=4, monitoring=monitoring), build_schedule(*SCHED), policy=RotatingPolicy()
        )
        fresh.load_state_dict(state)
        assert fresh.state_dict()["windows"] == state["windows"]
        for model, (sched, mods, cfg) in models.items():
            dag = build_dag(build_schedule(*sched))
            mods = mods or {s: make_stage1() for s in range(dag.num_stages)}
            other = TimelyFreeze(cfg, dag, mods, policy=RotatingPolicy())
            text = assert_refused_unchanged(other, state, r"state\.(schedule|units|config)")
            assert text, (name, model)
    assert BLOCK == 4
