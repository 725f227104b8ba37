"""Bad input, table-driven: every row is one bad input to the ``tfz`` command or to the Python API.

- ``Cli(argv, names)``: ``tfz argv`` ends with exit status 2 and exactly one line on stderr that
  contains ``names`` (the bad value), nothing on stdout, no traceback, no inf or nan (unless the
  input has them), within the time and memory limits.
- ``Ok(argv, shows)``: an input that once failed and is now computed correctly: exit 0, stdout
  contains ``shows``, no inf or nan.
- ``Api(expr, names)``: the Python expression raises ValueError or TypeError (``raises`` to name
  another) whose message contains ``names``. Expressions see the names of tests/_fuzz_worker.py:
  the public names of tfz.schedule, tfz.dag, tfz.profile, tfz.timeline, tfz.measure and
  tfz.pipeline.launch, the packages ``masks``, ``tnn`` (tfz.nn), ``kernels``, ``optim``, ``pipe``
  (tfz.pipeline), ``ctl`` (tfz.controller), ``metrics``, ``timing``, ``plan``, and small objects to
  call them on (``mod``, ``lin``, ``units``, ``x``, ``dy``, ``controller()``, ``dag``, ``unfrozen``,
  ``frozen``).

``{name}`` in a row is the path of fixture file ``name`` (see :data:`FILES`). Each case runs in a child
forked from one worker process (tests/_fuzz_worker.py) with at most :data:`MEMORY` more bytes of
address space and :data:`SECONDS` of wall time, so a case that would allocate 60 GB or never end fails
here instead of taking the machine with it. Adding a case is adding a row.
"""

# ruff: noqa: E501 - the case tables below have one row per line
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("torch")

MEMORY = 2 * 2**30
"""Address space a case may add (bytes)."""
SECONDS = 60
"""Wall time a case may take (the slowest rows solve a small LP or import matplotlib: about 2 s)."""

HAS_DEV = os.path.exists("/dev/full") and os.path.exists("/dev/zero")
HAS_CUDA = pytest.importorskip("torch").cuda.is_available()


@dataclass(frozen=True)
class Cli:
    argv: str
    names: str
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Ok:
    argv: str
    shows: str


@dataclass(frozen=True)
class Api:
    expr: str
    names: str
    raises: tuple[str, ...] = ("ValueError", "TypeError")
    env: tuple[tuple[str, str], ...] = ()


def _profile(**fields) -> str:
    """A tfz-profile JSON text: a valid uniform profile with ``fields`` replaced (None removes one)."""
    d = {"format": "tfz-profile", "version": 1, "default": {"F": 1.0, "I": 1.0, "W": 1.0, "W_frozen": 0.2}}
    d.update(fields)
    return json.dumps({k: v for k, v in d.items() if v is not None})


def _stage(**times) -> str:
    return _profile(default=None, stages={"0": times})


DEEP = 100_000
FILES: dict[str, str | bytes | None] = {
    # profiles
    "ok.json": _profile(),
    "empty.json": "",
    "garbage.json": "this is not json",
    "binary.json": b"\xff\xfe\x00\x01",
    "list.json": "[1, 2, 3]",
    "format.json": _profile(format="other"),
    "version.json": _profile(version=2),
    "unit.json": _profile(unit="min"),
    "stages-list.json": _profile(default=None, stages=[1, 2]),
    "stage-neg.json": _profile(default=None, stages={"-1": {"F": 1, "B": 1, "B_frozen": 1}}),
    "stage-frac.json": _profile(default=None, stages={"1.5": {"F": 1, "B": 1, "B_frozen": 1}}),
    "stage-long.json": _profile(default=None, stages={"9" * 5000: {"F": 1, "B": 1, "B_frozen": 1}}),
    "no-f.json": _stage(I=1, W=1),
    "f-neg.json": _stage(F=-1, I=1, W=1),
    "f-str.json": _stage(F="1", I=1, W=1),
    "f-bool.json": _stage(F=True, I=1, W=1),
    "f-null.json": _stage(F=None, I=1, W=1),
    "f-nan.json": '{"format": "tfz-profile", "version": 1, "default": {"F": NaN, "I": 1, "W": 1}}',
    "f-inf.json": '{"format": "tfz-profile", "version": 1, "default": {"F": Infinity, "I": 1, "W": 1}}',
    "f-1e400.json": '{"format": "tfz-profile", "version": 1, "default": {"F": 1e400, "I": 1, "W": 1}}',
    "f-400digits.json": '{"format": "tfz-profile", "version": 1, "default": {"F": 1%s, "I": 1, "W": 1}}'
    % ("0" * 399),
    "f-5000digits.json": '{"format": "tfz-profile", "version": 1, "default": {"F": %s, "I": 1, "W": 1}}'
    % ("7" * 5000),
    "wf-over-w.json": _stage(F=1, I=1, W=1, W_frozen=2),
    "i-no-w.json": _stage(F=1, I=1),
    "b-no-bf.json": _stage(F=1, B=2),
    "typo.json": _stage(F=1, I=1, W=1, w_frozen=0.1),
    "top-key.json": _profile(extra=1),
    "dup.json": '{"format": "tfz-profile", "format": "tfz-profile", "version": 1}',
    "action-bad.json": _profile(actions={"2X3": {"unfrozen": 1}}),
    "action-f-frozen.json": _profile(actions={"0F0": {"unfrozen": 1, "frozen": 0.5}}),
    "action-unknown.json": _profile(actions={"9F0": {"unfrozen": 1}}),
    "action-empty.json": _profile(actions={"0F0": {}}),
    "action-long.json": _profile(actions={"0F" + "1" * 5000: {"unfrozen": 1}}),
    "meta-list.json": _profile(meta=[1]),
    "meta-deep.json": _profile()[:-1] + ', "meta": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}",
    "array-deep.json": "[" * DEEP + "]" * DEEP,
    "stages-5.json": _profile(stages={str(s): {"F": 1, "I": 1, "W": 1} for s in range(5)}),
    "stage-7.json": _profile(stages={"7": {"F": 1, "I": 1, "W": 1}}),
    "b-only.json": _profile(default={"F": 1, "B": 2, "B_frozen": 1}),
    "all-1e300.json": _profile(default={"F": 1e300, "I": 1e300, "W": 1e300, "W_frozen": 2e299}),
    # schedule CSVs
    "huge-mb.csv": "0F0,0F999999999,0B0\n",
    "empty.csv": "",
    "comm.csv": "0F0,0SEND_F0,0B0\n",
    "two-ranks.csv": "0F0,0B0\n0F1,0B1\n",
    "blank-row.csv": "0F0,0B0\n,,\n",
    "long-cell.csv": "0F" + "9" * 5000 + "\n",
    "gap.csv": "0F0,0B0\n999999999F0,999999999B0\n",
    "deadlock.csv": "0F0,0B0,0F1,0B1\n1F1,1B1,1F0,1B0\n",
    "binary.csv": b"\xff\xfe\x00",
    # outputs
    "dir.png/": None,
    "dir.json/": None,
    "file.txt": "",
    # demo inputs
    "empty.txt": "",
    "empty-dir/": None,
    "bad.pt": "not a checkpoint",
}

# The tables keep one row per line (not formatted, long lines allowed).
# fmt: off
S = "simulate --schedule 1f1b --ranks 4 --microbatches 8"
P = "plan --schedule 1f1b --ranks 4 --microbatches 8"
D = "demo --out {demo-out}"

CLI_CASES = [
    # -- the command line itself
    Cli("", "give a command"),
    Cli("fly", "invalid choice: 'fly'"),
    Cli("simulate --schedule 1f1b --ranks 2 --microbatches 2 --bogus", "--bogus"),
    Cli("simulate --ranks 2 --microbatches 2", "--schedule"),
    Cli("simulate --schedule 1f1b --ranks 2 --microbatches 2", "TFZ_DEBUG", env=(("TFZ_DEBUG", "maybe"),)),
    Cli("profile --stages 2 --out {p.json}", "TFZ_FORCE_SKIP_CPP", env=(("TFZ_FORCE_SKIP_CPP", "maybe"),)),
    Cli("profile --stages 2 --out {p.json}", "TFZ_TIMER_FORCE_CPU", env=(("TFZ_TIMER_FORCE_CPU", "2"),)),
    Cli("profile --stages 2 --out {p.json}", "TFZ_DISABLE_TRITON", env=(("TFZ_DISABLE_TRITON", "y"),)),
    Cli("simulate --schedule 1f1b --ranks 2 --microbatches 2", "TFZ_DISABLE_TRITON", env=(("TFZ_DISABLE_TRITON", "enabled"),)),
    # -- schedule flags (simulate)
    Cli("simulate --schedule nope --ranks 4 --microbatches 8", "'nope'"),
    Cli("simulate --schedule '' --ranks 4 --microbatches 8", "''"),
    Cli("simulate --schedule 1f1b --ranks 0 --microbatches 8", "'0'"),
    Cli("simulate --schedule 1f1b --ranks -1 --microbatches 8", "--ranks"),
    Cli("simulate --schedule 1f1b --ranks 1.5 --microbatches 8", "'1.5'"),
    Cli("simulate --schedule 1f1b --ranks abc --microbatches 8", "'abc'"),
    Cli("simulate --schedule 1f1b --ranks 1e3 --microbatches 8", "'1e3'"),
    Cli("simulate --schedule 1f1b --ranks " + "9" * 5000 + " --microbatches 8", "(5002 characters)"),
    Cli("simulate --schedule 1f1b --ranks 4 --microbatches 0", "'0'"),
    Cli("simulate --schedule 1f1b --ranks 4 --microbatches -5", "--microbatches"),
    Cli("simulate --schedule 1f1b --ranks 4 --microbatches nan", "'nan'"),
    Cli("simulate --schedule gpipe --ranks 4 --microbatches 8 --stages-per-rank 0", "'0'"),
    Cli(S + " --stages-per-rank 2", "got 2"),
    Cli("simulate --schedule zbv --ranks 4 --microbatches 8 --stages-per-rank 3", "got 3"),
    Cli("simulate --schedule 1f1b --ranks 4 --microbatches 2", "got 2"),
    Cli("simulate --schedule dualpipev --ranks 4 --microbatches 4", "at least 8 microbatches, got 4"),
    Cli("simulate --schedule interleaved1f1b --ranks 4 --microbatches 9", "9 microbatches"),
    Cli("simulate --schedule 1f1b --ranks 1000000000 --microbatches 1000000000", "1000000000 microbatches"),
    Cli("simulate --schedule 1f1b --ranks 1000000 --microbatches 1000000", "1000000 ranks"),
    Cli("simulate --schedule 1f1b --ranks 1 --microbatches 1000000000", "1000000000 microbatches"),
    Cli("simulate --schedule gpipe --ranks 1 --microbatches 1000001", "1000001 microbatches"),
    Cli("simulate --schedule zbv --ranks 1000 --microbatches 1000", "6,000,000 actions"),
    Cli("simulate --schedule interleavedzb --ranks 100 --microbatches 100 --stages-per-rank 100", "100 stages"),
    # -- time flags
    Cli(S + " --f 0", "'0'"),
    Cli(S + " --f -1", "--f"),
    Cli(S + " --f nan", "'nan'"),
    Cli(S + " --f inf", "'inf'"),
    Cli(S + " --f=-inf", "'-inf'"),
    Cli(S + " --f 1e400", "'1e400'"),
    Cli(S + " --f abc", "'abc'"),
    Cli(S + " --f ''", "''"),
    Cli(S + " --i 0", "'0'"),
    Cli(S + " --w=-0.5", "'-0.5'"),
    Cli(S + " --f 1e308", "1e+308"),
    Cli("simulate --schedule zbv --ranks 4 --microbatches 8 --f 1e308 --i 1e308 --w 1e308", "1e+308"),
    Cli(S + " --f 1e306 --trace {t.json}", "1.1e+307"),
    # -- profiles (simulate)
    Cli(S + " --profile {ok.json} --f 2", "--f"),
    Cli(S + " --profile {missing.json}", "{missing.json}"),
    Cli(S + " --profile {dir.json}", "{dir.json}"),
    Cli(S + " --profile {empty.json}", "{empty.json}"),
    Cli(S + " --profile {garbage.json}", "invalid JSON"),
    Cli(S + " --profile {binary.json}", "not a UTF-8"),
    Cli(S + " --profile {list.json}", "got list"),
    Cli(S + " --profile {format.json}", "'other'"),
    Cli(S + " --profile {version.json}", "got 2"),
    Cli(S + " --profile {unit.json}", "'min'"),
    Cli(S + " --profile {stages-list.json}", "[1, 2]"),
    Cli(S + " --profile {stage-neg.json}", "'-1'"),
    Cli(S + " --profile {stage-frac.json}", "'1.5'"),
    Cli(S + " --profile {stage-long.json}", "(5002 characters)"),
    Cli(S + " --profile {no-f.json}", "stages.0.F"),
    Cli(S + " --profile {f-neg.json}", "got -1"),
    Cli(S + " --profile {f-str.json}", "got '1'"),
    Cli(S + " --profile {f-bool.json}", "got True"),
    Cli(S + " --profile {f-null.json}", "got None"),
    Cli(S + " --profile {f-nan.json}", "NaN is not a valid time"),
    Cli(S + " --profile {f-inf.json}", "Infinity is not a valid"),
    Cli(S + " --profile {f-1e400.json}", "default.F: time must be finite and >= 0, got 1e400"),
    Cli(S + " --profile {f-400digits.json}", "(400 characters)"),
    Cli(S + " --profile {f-5000digits.json}", "4300 digits"),
    Cli(S + " --profile {wf-over-w.json}", "stages.0.W_frozen"),
    Cli(S + " --profile {i-no-w.json}", "'I' is given without"),
    Cli(S + " --profile {b-no-bf.json}", "'B_frozen' is required"),
    Cli(S + " --profile {typo.json}", "'w_frozen'"),
    Cli(S + " --profile {top-key.json}", "'extra'"),
    Cli(S + " --profile {dup.json}", "duplicate key 'format'"),
    Cli(S + " --profile {action-bad.json}", "'2X3'"),
    Cli(S + " --profile {action-f-frozen.json}", "actions.0F0"),
    Cli(S + " --profile {action-unknown.json}", "'9F0'"),
    Cli(S + " --profile {action-empty.json}", "actions.0F0"),
    Cli(S + " --profile {action-long.json}", "(5004 characters)"),
    Cli(S + " --profile {meta-list.json}", "[1]"),
    Cli(S + " --profile {meta-deep.json}", "nested too deeply"),
    Cli(S + " --profile {array-deep.json}", "nested too deeply"),
    Cli(S + " --profile {stages-5.json}", "stage 4 (5 stages"),
    Cli(S + " --profile {stage-7.json}", "stage 7"),
    Cli("simulate --schedule zbh1 --ranks 4 --microbatches 8 --profile {b-only.json}", "'I' and 'W'"),
    # -- outputs (simulate)
    Cli(S + " --png {out.xyz}", "{out.xyz}"),
    Cli(S + " --png {dir.png}", "{dir.png}"),
    Cli(S + " --png {missing/p.png}", "{missing/p.png}"),
    Cli(S + " --trace {out.txt}", "{out.txt}"),
    Cli(S + " --trace {dir.json}", "{dir.json}"),
    Cli(S + " --trace {file.txt/t.json}", "file.txt"),
    Cli(S + " --trace ''", "--trace"),
    # -- plan
    Cli("plan --schedule 1f1b --ranks 1000000000 --microbatches 1000000000", "1000000000 microbatches"),
    Cli("plan --schedule 1f1b --ranks 1000000 --microbatches 1000000", "1000000 ranks"),
    Cli("plan --schedule 1f1b --ranks 1 --microbatches 1000000000", "1000000000 microbatches"),
    Cli("plan --schedule 1f1b --ranks 4 --microbatches 40000", "40000 microbatches"),
    Cli("plan --schedule 1f1b --ranks 4 --microbatches 5000 --solver generic", "5000 microbatches"),
    Cli(P + " --max-freeze-ratio 2", "'2'"),
    Cli(P + " --max-freeze-ratio=-0.1", "'-0.1'"),
    Cli(P + " --max-freeze-ratio nan", "'nan'"),
    Cli(P + " --action-cap 1.5", "'1.5'"),
    Cli(P + " --weighting foo", "'foo'"),
    Cli(P + " --solver foo", "'foo'"),
    Cli(P + " --w-frozen 2", "--w-frozen 2.0 exceeds --w 1.0"),
    Cli(P + " --w-frozen=-1", "'-1'"),
    Cli(P + " --w-frozen nan", "'nan'"),
    Cli(P + " --f 1e307 --i 1e307 --w 1e307", "2e+307"),  # B = I + W is the largest
    Cli(P + " --f 1e308", "1e+308"),
    Cli(P + " --profile {f-400digits.json}", "(400 characters)"),
    Cli(P + " --profile {meta-deep.json}", "nested too deeply"),
    Cli(P + " --profile {stages-5.json}", "4 stages (0-3)"),
    Cli(P + " --png {out.xyz}", "{out.xyz}"),
    Cli(P + " --trace {out.txt}", "{out.txt}"),
    Cli(P + " --solver generic --f 1e307 --i 1e307 --w 1e307", "2e+307"),
    Cli(P + " --solver generic --f 1e308", "1e+308"),
    Cli(P + " --f 1e307 --i 1e307 --w 1e307 --w-frozen 1e306", "2e+307"),
    # -- profile
    Cli("profile --stages 0 --out {p.json}", "'0'"),
    Cli("profile --stages 9 --out {p.json}", "--stages 9"),
    Cli("profile --model gpt2 --stages 2 --out {p.json}", "'gpt2'"),
    Cli("profile --stages 2 --layers-per-stage 0 --out {p.json}", "'0'"),
    Cli("profile --model llama-1b --stages 4 --layers-per-stage 5 --out {p.json}", "--layers-per-stage 5"),
    Cli("profile --stages 2 --seq-len 0 --out {p.json}", "'0'"),
    Cli("profile --stages 2 --seq-len 600 --out {p.json}", "seq_len 600"),
    Cli("profile --stages 2 --microbatch-size 0 --out {p.json}", "'0'"),
    Cli("profile --stages 2 --microbatch-size 1000000000 --out {p.json}", "microbatch 1000000000"),
    Cli("profile --stages 2 --vocab-size 0 --out {p.json}", "'0'"),
    Cli("profile --stages 2 --vocab-size 1000000000 --out {p.json}", "vocab 1,000,000,000"),
    Cli("profile --model llama-8b --stages 1 --vocab-size 100000000 --out {p.json}", "vocab 100,000,000"),
    Cli("profile --stages 2 --device tpu --out {p.json}", "'tpu'"),
    Cli("profile --stages 2 --device cuda:abc --out {p.json}", "'cuda:abc'"),
    Cli("profile --stages 2 --device cpu:0 --out {p.json}", "'cpu:0'"),
    Cli("profile --stages 2 --dtype float64 --out {p.json}", "'float64'"),
    Cli("profile --stages 2 --repeats 0 --out {p.json}", "'0'"),
    Cli("profile --stages 2 --repeats 1000000000 --out {p.json}", "'1000000000'"),
    Cli("profile --stages 2 --warmup=-1 --out {p.json}", "'-1'"),
    Cli("profile --stages 2 --warmup 1000000000 --out {p.json}", "'1000000000'"),
    Cli("profile --stages 2 --seed=-1 --out {p.json}", "'-1'"),
    Cli("profile --stages 2 --seed 4294967296 --out {p.json}", "'4294967296'"),
    Cli("profile --stages 2 --out {p.txt}", "{p.txt}"),
    Cli("profile --stages 2 --out {missing/p.json}", "{missing/p.json}"),
    Cli("profile --stages 2 --out {dir.json}", "{dir.json}"),
    Cli("profile --stages 2 --out ''", "--out"),
    Cli("profile --stages 2", "--out"),
    # -- demo (every row is refused before a rank starts; --out is a fresh folder of the fixtures)
    Cli("demo --ranks 1000000000 --steps 1", "--ranks 1000000000"),
    Cli(D + " --ranks 4 --microbatches 2 --steps 1", "needs at least 4 microbatches"),
    Cli(D + " --task finetuning", "'finetuning'"),
    Cli(D + " --task ''", "invalid choice: ''"),
    Cli(D + " --task pretrain --base {bad.pt}", "--base {bad.pt}"),
    Cli(D + " --seeds x", "'x'"),
    Cli(D + " --seeds 1.5", "'1.5'"),
    Cli(D + " --seeds 0,-1", "'0,-1'"),
    Cli(D + " --seeds 0,,1", "'0,,1'"),
    Cli(D + " --seeds 1,1", "'1,1'"),
    Cli(D + " --seeds ''", "''"),
    Cli(D + " --seeds 4294967296", "'4294967296'"),
    Cli(D + " --seeds 99999999999999999999", "'99999999999999999999'"),
    Cli(D + " --seeds " + "9" * 5000, "(5002 characters)"),
    Cli(D + " --monitoring none", "'none'"),
    Cli(D + " --monitoring Frozen", "'Frozen'"),
    Cli(D + " --phase-unit 0", "got 0"),
    Cli(D + " --phase-unit=-1", "got -1"),
    Cli(D + " --phase-unit 1.5", "'1.5'"),
    Cli(D + " --phase-unit 1000000000000", "phase_unit 1000000000000"),
    Cli(D + " --lr 0", "'0'"),
    Cli(D + " --lr=-0.1", "'-0.1'"),
    Cli(D + " --lr nan", "'nan'"),
    Cli(D + " --lr inf", "'inf'"),
    Cli(D + " --lr 1e400", "'1e400'"),
    Cli(D + " --lr abc", "'abc'"),
    Cli(D + " --step-scale 9", "'9'"),
    Cli(D + " --step-scale nan", "'nan'"),
    Cli(D + " --max-freeze-ratio 1.5", "'1.5'"),
    Cli(D + " --max-freeze-ratio nan", "'nan'"),
    Cli(D + " --max-freeze-ratio 1e400", "'1e400'"),
    Cli(D + " --base {missing.pt}", "{missing.pt}"),
    Cli(D + " --base {empty-dir}", "{empty-dir}"),
    Cli(D + " --base {bad.pt}", "{bad.pt} is not a readable checkpoint"),
    Cli(D + " --data {missing-data}", "{missing-data}"),
    Cli(D + " --data {empty.txt}", "{empty.txt} is empty"),
    Cli(D + " --data {empty-dir}", "{empty-dir} needs at least 2 non-empty files"),
    Cli(D + " --task pretrain --data {empty.txt}", "{empty.txt} is empty"),
]
if HAS_DEV:
    CLI_CASES += [
        Cli(S + " --trace /dev/full", "/dev/full"),
        Cli(S + " --png /dev/full", "/dev/full"),
        Cli(P + " --trace /dev/full", "/dev/full"),
        Cli(S + " --profile /dev/zero", "/dev/zero"),
        Cli("profile --stages 2 --out /dev/full", "/dev/full"),
    ]

OK_CASES = [
    Ok(S + " --f 1e-320 --i 1e-320 --w 1e-320", "22 actions"),
    Ok(S + " --f 1e300 --png {big.png}", "wrote"),
    Ok(S + " --f 1e-320 --png {tiny.png}", "wrote"),
    Ok(P + " --f 1e-9 --i 1e-9 --w 1e-9 --w-frozen 2e-10", "1.295x"),
    Ok(P + " --f 1e-12 --i 1e-12 --w 1e-12", "(1.398x faster"),  # 1 ms, W_frozen 0: 1.398x
    Ok(P + " --f 1e15 --i 1e15 --w 1e15", "(1.398x faster"),
    Ok(P + " --solver generic --f 1e-9 --i 1e-9 --w 1e-9 --w-frozen 2e-10", "(1.295x faster"),
    Ok(P + " --solver generic --f 1e-12 --i 1e-12 --w 1e-12", "(1.398x faster"),
    Ok(P + " --f 1e-300 --i 1e-300 --w 1e-300 --w-frozen 2e-301", "(1.295x faster"),
    Ok(P + " --profile {all-1e300.json}", "1.295x"),
    Ok("simulate --schedule 1F1B --ranks 4 --microbatches 8", "critical path"),
]

API_CASES = [
    # -- tfz.schedule
    Api("build_schedule(None, 4, 8)", "None"),
    Api("build_schedule('nope', 4, 8)", "'nope'"),
    Api("build_schedule('1f1b', 0, 8)", "got 0"),
    Api("build_schedule('1f1b', -1, 8)", "got -1"),
    Api("build_schedule('1f1b', 1.5, 8)", "got 1.5"),
    Api("build_schedule('1f1b', '4', 8)", "got '4'"),
    Api("build_schedule('1f1b', True, 8)", "got True"),
    Api("build_schedule('1f1b', None, 8)", "got None"),
    Api("build_schedule('1f1b', np.float64(4), 8)", "4.0)"),
    Api("build_schedule('1f1b', 10**400, 8)", "(401 characters)"),
    Api("build_schedule('1f1b', 4, 0)", "got 0"),
    Api("build_schedule('1f1b', 4, False)", "got False"),
    Api("build_schedule('1f1b', 4, 8, 0)", "got 0"),
    Api("build_schedule('zbv', 4, 8, 3)", "got 3"),
    Api("build_schedule('1f1b', 4, 3)", "got 3"),
    Api("build_schedule('1f1b', 10**9, 10**9)", "1000000000 microbatches"),
    Api("build_schedule('1f1b', 10**6, 10**6)", "1000000 ranks"),
    Api("build_schedule('gpipe', 1, 10**9)", "1000000000 microbatches"),
    Api("build_schedule('1f1b', 2, 8, max_actions=10)", "32 actions"),
    Api("check_size('1f1b', 0, 8)", "got 0"),
    Api("from_torch('Schedule1F1B', 10**6, 10**6)", "1000000 ranks"),
    Api("from_torch('Schedule1F1B', 0, 8)", "got 0"),
    Api("from_torch('NoSuchSchedule', 2, 4)", "NoSuchSchedule"),
    Api("Action.parse('0X0')", "'0X0'"),
    Api("Action.parse('')", "''"),
    Api("Action.parse(5)", "5"),
    Api("Action.parse('-1F0')", "'-1F0'"),
    Api("Action.parse('0F' + '9' * 5000)", "(5004 characters)"),
    Api("Action.parse('0F' + '9' * 19)", "at most 18 digits"),
    Api("stage_ranks(4, 2, 'diag')", "'diag'"),
    Api("make_schedule('m', [[Action(0, 'F', 0)]], 1, placement='diag')", "'diag'"),
    Api("Schedule('s', 1, (5,), ((Action(0, 'F', 0), Action(0, 'B', 0)),))", "rank 5"),
    Api("load_csv(files['missing.csv'])", "missing.csv", ("FileNotFoundError",)),
    Api("load_csv(files['empty.csv'])", "empty.csv"),
    Api("load_csv(files['comm.csv'])", "'0SEND_F0'"),
    Api("load_csv(files['two-ranks.csv'])", "stage 0 is on two ranks"),
    Api("load_csv(files['blank-row.csv'])", "row 2 (rank 1) has no actions"),
    Api("load_csv(files['long-cell.csv'])", "(5004 characters)"),
    Api("load_csv(files['gap.csv'])", "stage 1 appears in no row"),
    Api("load_csv(files['binary.csv'])", "binary.csv: not a UTF-8"),
    Api("build_dag(load_csv(files['huge-mb.csv']))", "missing microbatch 1"),
    Api("build_dag(load_csv(files['deadlock.csv']))", "deadlock"),
    Api("dump_csv([['0F0']], files['out.csv'])", "Schedule"),
    # -- tfz.dag
    Api("build_dag(Schedule('s', 10**12, (0,), ((Action(0, 'F', 0), Action(0, 'B', 0)),)))", "microbatch 1"),
    Api("build_dag(Schedule('s', 1, (0,), ((Action(0, 'F', 0),) * 3_000_000,)))", "3,000,000 actions"),
    Api("build_dag(Schedule('s', 1, (0,), ((Action(0, 'F', 0), Action(0, 'F', 0), Action(0, 'B', 0)),)))", "0F0"),
    Api("build_dag(Schedule('s', 1, (0,), ((Action(0, 'F', 0), Action(0, 'B', 3)),)))", "0B3"),
    Api("build_dag(Schedule('s', 1, (0,), ((Action(0, 'F', 0), Action(2, 'B', 0)),)))", "2B0"),
    Api("build_dag(Schedule('s', 1, (0,), ((Action(0, 'F', 0), 'x'),)))", "'x'"),
    Api("build_dag(Schedule('s', 1, (0,), ((),)))", "no actions"),
    Api("simulate(dag, np.ones(3))", "(3,)"),
    Api("simulate(dag, np.full(dag.num_actions, np.nan))", "got nan"),
    Api("simulate(dag, -np.ones(dag.num_actions))", "got -1.0"),
    Api("simulate(dag, np.full(dag.num_actions, np.inf))", "got inf"),
    Api("simulate(dag, np.full(dag.num_actions, 1e308))", "1e+308"),
    Api("simulate(dag, {'9F9': 1.0})", "'9F9'"),
    Api("simulate(dag, {'0F0': 1.0})", "no duration for action"),
    Api("simulate(dag, ['a'] * dag.num_actions)", "'a'"),
    # -- tfz.profile
    Api("Profile.uniform(float('nan'), 1, 1)", "got nan"),
    Api("Profile.uniform(-1, 1, 1)", "got -1"),
    Api("Profile.uniform('1', 1, 1)", "got '1'"),
    Api("Profile.uniform(True, 1, 1)", "got True"),
    Api("Profile.uniform(10**400, 1, 1)", "(401 characters)"),
    Api("Profile.uniform(1, 1, 1, 2)", "W_frozen"),
    Api("StageTimes(None)", "got None"),
    Api("StageTimes(1.0, 1.0)", "'I' is given without 'W'"),
    Api("Profile()", "no times"),
    Api("Profile(stages={-1: StageTimes(1.0, 1.0, 1.0)})", "got -1"),
    Api("Profile(stages={'0': StageTimes(1.0, 1.0, 1.0)})", "got '0'"),
    Api("Profile(stages={0: 1.0})", "stages.0"),
    Api("Profile(default=StageTimes(1.0, 1.0, 1.0), actions={7: ActionTimes(1.0)})", "7"),
    Api("Profile.from_dict([1])", "got list"),
    Api("Profile.from_dict({'format': 'tfz-profile', 'version': True})", "got True"),
    Api("Profile.load(files['meta-deep.json'])", "nested too deeply"),
    Api("Profile.load(files['f-400digits.json'])", "(400 characters)"),
    Api("Profile.load(files['missing.json'])", "missing.json", ("FileNotFoundError",)),
    Api("Profile.load(files['stages-5.json']).durations(build_dag(build_schedule('1f1b', 4, 8)))", "stage 4"),
    Api("simulate(dag, Profile.uniform(1e308, 1, 1).durations(dag)[0])", "1e+308"),
    # -- tfz.timeline
    Api("chrome_trace(sim, unit_ms=0)", "got 0"),
    Api("chrome_trace(sim, unit_ms=float('nan'))", "got nan"),
    Api("chrome_trace(sim, unit_ms=True)", "got True"),
    Api("chrome_trace(sim, np.ones(3))", "(3,)"),
    Api("chrome_trace(sim, np.full(sim.dag.num_actions, 2.0))", "got 2.0"),
    Api("chrome_trace(sim, np.where(sim.dag.kind_mask('F'), 0.5, 0.0))", "only B and W can freeze"),
    Api("chrome_trace(sim, np.full(sim.dag.num_actions, np.nan))", "got nan"),
    Api("chrome_trace(simulate(dag, np.full(dag.num_actions, 1e306)))", "too long for a Chrome trace"),
    Api("write_gantt_png(files['g.png'], sim, np.full(sim.dag.num_actions, -1.0))", "got -1.0"),
    # -- tfz.measure
    Api("ProfileConfig(stages=0)", "got 0"),
    Api("ProfileConfig(model='gpt')", "'gpt'"),
    Api("ProfileConfig(model=[1])", "[1]"),
    Api("ProfileConfig(dtype='float64')", "'float64'"),
    Api("ProfileConfig(seq_len=10**6)", "seq_len 1000000"),
    Api("ProfileConfig(seed=-1)", "got -1"),
    Api("ProfileConfig(seed=2**40)", "got 1099511627776"),
    Api("ProfileConfig(repeats=0)", "got 0"),
    Api("ProfileConfig(repeats=10**9)", "got 1000000000"),
    Api("ProfileConfig(warmup=True)", "got True"),
    Api("ProfileConfig(vocab_size=0)", "got 0"),
    Api("ProfileConfig(layers_per_stage=0)", "got 0"),
    Api("ProfileConfig(microbatch_size=2.5)", "got 2.5"),
    Api("ProfileConfig(device=5)", "got 5"),
    Api("stage_layers(ProfileConfig(stages=9))", "--stages 9"),
    Api("profile_model('tiny')", "ProfileConfig"),
    Api("profile_model(ProfileConfig(device='tpu'))", "'tpu'"),
    # -- tfz.pipeline.launch
    Api("launch(print, 0)", "got 0"),
    Api("launch(print, 2.0)", "got 2.0"),
    Api("launch(print, True)", "got True"),
    Api("launch(print, 2, timeout=-1)", "got -1"),
    Api("launch(print, 2, timeout=float('nan'))", "got nan"),
    Api("launch(print, 2, timeout=float('inf'))", "got inf"),
    Api("launch(print, 2, init_timeout=0)", "got 0"),
    Api("launch(print, 2, progress_timeout=0)", "got 0"),
    Api("launch(print, 2, progress_timeout='5')", "got '5'"),
    Api("launch(print, 2, backend='')", "''"),
    Api("launch('print', 2)", "'print'"),
    Api("launch(print, 10**6)", "world_size 1000000"),
    Api("launch(print, 2, backend='mpi2')", "'mpi2'"),
    Api("launch(lambda rank, world: rank, 2)", "<lambda>"),
    # -- tfz.masks
    Api("masks.select(units, 1.5, stage=0, microbatch=0)", "got 1.5"),
    Api("masks.select(units, float('nan'), stage=0, microbatch=0)", "got nan"),
    Api("masks.select(units, True, stage=0, microbatch=0)", "got True"),
    Api("masks.select(units, 0.5, stage=-1, microbatch=0)", "got -1"),
    Api("masks.select(units, 0.5, stage=0.5, microbatch=0)", "got 0.5"),
    Api("masks.select(units, 0.5, stage=0, microbatch=True)", "got True"),
    Api("masks.select(units, 0.5, stage=0, microbatch=0, step=-1)", "step must be"),
    Api("masks.select(units, 0.5, stage=0, microbatch=0, seed=1.5)", "got 1.5"),
    Api("masks.select(units, 0.5, stage=0, microbatch=0, policy='random')", "'random'"),
    Api("masks.select('units', 0.5, stage=0, microbatch=0)", "got str"),
    Api("masks.select_covering(units, [0.5, 2.0], stage=0)", "got 2.0"),
    Api("masks.select_covering(units, [float('nan')], stage=0)", "got nan"),
    Api("masks.StageUnits((), block_rows=64)", "no specs"),
    Api("masks.StageUnits((masks.LayerSpec('a', 128, 64),), block_rows=0)", "got 0"),
    Api("masks.StageUnits((masks.LayerSpec('a', 128, 64),), block_rows=True)", "got True"),
    Api("masks.LayerSpec('a', 0, 64)", "got 0"),
    Api("masks.LayerSpec('a', 1.5, 64)", "got 1.5"),
    Api("masks.TensorSpec('t', 2.5)", "got 2.5"),
    Api("masks.StageUnits.from_module(mod, block_rows=-64)", "got -64"),
    Api("masks.StageUnits.from_module(torch.nn.Sequential(torch.nn.ReLU()))", "no FreezableLinear"),
    Api("masks.RandomPolicy(first_weight=float('nan'))", "got nan"),
    Api("masks.RandomPolicy(last_weight=-1)", "got -1"),
    Api("masks.RandomPolicy(first_weight=True)", "first_weight must be a finite number > 0, got True"),
    Api("masks.RandomPolicy(front_bias_stages=5)", "front_bias_stages must be a tuple of stage indices, got 5"),
    Api("masks.RandomPolicy(front_bias_stages=(0, np.int64(-1)))", "got np.int64(-1)"),
    Api("masks.RandomPolicy(last_weight=np.float32('inf'))", "got np.float32(inf)"),
    Api("masks.select(units, np.float32('nan'), stage=0, microbatch=0)", "ratio must be a finite number in [0, 1], got np.float32(nan)"),
    Api("masks.select(units, np.int64(2), stage=0, microbatch=0)", "got np.int64(2)"),
    Api("masks.select(units, 0.5, stage=np.bool_(True), microbatch=0)", "stage must be an integer >= 0, got np.True_"),
    Api("masks.select(units, 0.5, stage=np.float64(1), microbatch=0)", "got np.float64(1.0)"),
    Api("masks.select(units, 0.5, stage=0, microbatch=np.int64(-1))", "microbatch must be an integer >= 0, got np.int64(-1)"),
    Api("masks.select_covering(units, [0.5, np.float32(1.5)], stage=0)", "ratios[1] must be"),
    Api("masks.LayerSpec('a', np.int64(0), 64)", "out_features of 'a' must be an integer >= 1, got np.int64(0)"),
    Api("masks.TensorSpec('t', np.bool_(True))", "numel of 't' must be an integer >= 1, got np.True_"),
    Api("tnn.use_row_masks({lin: torch.ones(32, dtype=torch.bool, device='meta')}).__enter__()", "meta device"),
    # -- tfz.nn
    Api("tnn.FreezableLinear(-1, 8)", "got -1"),
    Api("tnn.FreezableLinear(8.5, 8)", "got 8.5"),
    Api("tnn.FreezableLinear(8, True)", "got True"),
    Api("lin('x')", "got str"),
    Api("tnn.convert_to_freezable('model')", "got str"),
    Api("tnn.convert_to_freezable(torch.nn.Linear(3, 3), filter_fn=5)", "got int"),
    Api("tnn.prepare_row_masks({lin: torch.ones(32, dtype=torch.bool, device='meta')})", "meta device"),
    Api("tnn.prepare_row_masks({lin: torch.ones(31, dtype=torch.bool)})", "(31,)"),
    Api("tnn.prepare_row_masks({lin: torch.ones(32)})", "torch.float32"),
    Api("tnn.prepare_row_masks({lin: np.ones(32)})", "float64"),
    Api("tnn.prepare_row_masks({lin: [True] * 32})", "got list"),
    Api("tnn.prepare_row_masks({torch.nn.Linear(3, 3): None})", "got Linear"),
    Api("tnn.prepare_row_masks([lin])", "got list"),
    Api("tnn.prepare_row_masks({lin: np.ones(32, bool)}, device='tpu')", "'tpu'"),
    Api("tnn.RowMask(torch.ones(8, dtype=torch.bool, device='meta'), 8)", "meta device"),
    Api("tnn.RowMask(torch.ones(8, dtype=torch.bool), 8.0)", "got 8.0"),
    Api("tnn.RowUsage(-1)", "got -1"),
    Api("tnn.use_row_masks({lin: 5}).__enter__()", "got int"),
    Api("tnn.WeightGradStore().capture(-1, 0).__enter__()", "got -1"),
    Api("tnn.WeightGradStore().capture(0, 1.5).__enter__()", "got 1.5"),
    Api("tnn.WeightGradStore().flush('a', 0)", "got 'a'"),
    Api("tnn.WeightGradStore().flush(0, 3)", "(0, 3)"),
    Api("tnn.reset_row_usage('m')", "got str"),
    # -- tfz.kernels
    Api("(lambda t: kernels.wgrad(t, torch.randn(16, 16), out=t))(torch.randn(16, 16))", "shares memory with input"),
    Api("(lambda t: kernels.wgrad(torch.randn(16, 16), t, out=t))(torch.randn(16, 16))", "shares memory with grad_output"),
    Api("(lambda b: kernels.wgrad(b[:16], torch.randn(16, 16), out=b[8:24]))(torch.randn(48, 16))", "shares memory with input"),
    Api("(lambda t: kernels.wgrad(x, t, bias_grad=t[2]))(torch.randn(8, 32))", "bias_grad shares memory"),
    Api("(lambda t: kernels.wgrad_gemm_accum_fp32(t, torch.randn(16, 16), t))(torch.randn(16, 16))", "shares memory with input"),
    Api("kernels.wgrad(x, dy, active_rows=torch.ones(32, dtype=torch.bool, device='meta'))", "device meta"),
    Api("kernels.wgrad(x, dy, active_rows=torch.ones(31, dtype=torch.bool))", "(31,)"),
    Api("kernels.wgrad(x, dy, active_rows=np.ones(32, bool))", "got ndarray"),
    Api("kernels.wgrad(x, dy, backend='cuda')", "'cuda'"),
    Api("kernels.wgrad(x.double(), dy.double())", "torch.float64"),
    Api("kernels.wgrad(x, dy.half())", "torch.float16"),
    Api("kernels.wgrad(x, torch.randn(9, 32))", "(9 tokens)"),
    Api("kernels.wgrad(x, dy, out=torch.zeros(32, 63))", "(32, 63)"),
    Api("kernels.wgrad(x, dy, out=torch.zeros(64, 32).t())", "contiguous"),
    Api("kernels.wgrad(x, dy, bias_grad=torch.zeros(31))", "(31,)"),
    Api("kernels.wgrad('x', dy)", "got str"),
    Api("kernels.wgrad(torch.randn(()), dy)", "input ()"),
    Api("kernels.wgrad_gemm_accum_fp16(x, dy, torch.zeros(32, 64))", "torch.float32"),
    Api("kernels.ActiveRows(torch.ones(32, dtype=torch.bool, device='meta'))", "meta device"),
    Api("kernels.ActiveRows(np.ones(32, bool), 'tpu')", "'tpu'"),
    Api("kernels.ActiveRows(np.ones(32, bool), 5.5)", "5.5"),
    Api("kernels.ActiveRows(np.ones((2, 16), bool))", "(2, 16)"),
    Api("kernels.ActiveRows([True, False])", "got list"),
    Api("kernels.ActiveRows(np.ones(32, bool)).n_blocks(0)", "got 0"),
    Api("kernels.ActiveRows.build_many(np.ones(32, bool), 'cpu')", "got one ndarray"),
    Api("kernels.tune([(1, 2)])", "(1, 2)"),
    Api("kernels.tune([(0, 64, 64)])", "got 0"),
    Api("kernels.tune([(64.5, 64, 64)])", "got 64.5"),
    Api("kernels.tune([(64, 64, 64)], dtype=torch.int8)", "torch.int8"),
    Api("kernels.tune([(2**40, 4096, 4096)], device='cpu', bench=lambda fn: 1.0)", "cpu"),
    Api("kernels.resolve_backend('auto', 'tpu')", "'tpu'"),
    Api("kernels.resolve_backend('auto', 'cuda', torch.bfloat16)", "TFZ_DISABLE_TRITON", env=(("TFZ_DISABLE_TRITON", "maybe"),)),
    Api("kernels.configs.WgradConfig(block_m=0)", "got 0"),
    Api("kernels.configs.WgradConfig(block_n=48)", "got 48"),
    Api("kernels.configs.WgradConfig(num_warps=True)", "got True"),
    # -- tfz.optim
    Api("optim.attach_row_freezing('opt', mod)", "got str"),
    Api("optim.attach_row_freezing(torch.optim.SGD(mod.parameters(), lr=0.1), 'model')", "got str"),
    Api("optim.attach_row_freezing(torch.optim.SGD(mod.parameters(), lr=0.1), mod, rescale='yes')", "'yes'"),
    Api("optim.attach_row_freezing(torch.optim.SGD(mod.parameters(), lr=0.1), mod, rescale=1)", "rescale must be a bool, got 1"),
    Api("optim.attach_row_freezing(torch.optim.SGD(mod.parameters(), lr=0.1), mod, step_scale=float('inf'))", "step_scale must be a finite number in [-4, 4], got inf"),
    Api("optim.attach_row_freezing(torch.optim.SGD(mod.parameters(), lr=0.1), mod, fused='yes')", "fused must be a bool, got 'yes'"),
    # -- tfz.pipeline
    Api("pipe.FixedMasks({(0, -1): None})", "(0, -1)"),
    Api("pipe.FixedMasks({(0,): None})", "(0,)"),
    Api("pipe.FixedMasks({(0, 0): 5})", "got int"),
    Api("pipe.FixedMasks([1])", "[1]"),
    Api("pipe.RatioMasks({(0, 0): float('nan')}, {0: units})", "got nan"),
    Api("pipe.RatioMasks({(0, 0): 1.5}, {0: units})", "got 1.5"),
    Api("pipe.RatioMasks({(0, 0): True}, {0: units})", "got True"),
    Api("pipe.RatioMasks({(1, 0): 0.5}, {0: units})", "stage 1"),
    Api("pipe.RatioMasks({(0, 0): 0.5}, {0: 'units'})", "got str"),
    Api("pipe.RatioMasks({(0, 0): 0.5}, {0: units}, seed=-1)", "got -1"),
    Api("pipe.RatioMasks({(0, 0): 0.5}, {0: units}, policy='x')", "'x'"),
    Api("pipe.RatioMasks({(0, 0): 0.5}, {0: units}).update(step='a')", "got 'a'"),
    Api("pipe.make_freeze_aware('stage')", "got str"),
    Api("pipe.heartbeat(5)", "got 5"),
    Api("pipe.heartbeat('eval', step=1.5)", "got 1.5"),
    Api("pipe.build_torch_schedule(build_schedule('1f1b', 1, 4), [], None)", "got none"),
    Api("pipe.build_torch_schedule(build_schedule('1f1b', 1, 4), [1], print)", "got int"),
    Api("pipe.torch_schedule_stages('x')", "got str"),
    # -- tfz.controller
    Api("ctl.TimelyFreezeConfig(phase_unit=0)", "got 0"),
    Api("ctl.TimelyFreezeConfig(phase_unit=1.5)", "got 1.5"),
    Api("ctl.TimelyFreezeConfig(check_every=True)", "got True"),
    Api("ctl.TimelyFreezeConfig(plan=0.5)", "got float"),
    Api("ctl.TimelyFreezeConfig(monitoring='x')", "'x'"),
    Api("ctl.TimelyFreezeConfig(mask_layout='x')", "'x'"),
    Api("ctl.TimelyFreezeConfig(monitor_ratios=(0.4, 1.5))", "got 1.5"),
    Api("ctl.TimelyFreezeConfig(monitor_ratios=())", "got ()"),
    Api("ctl.TimelyFreezeConfig(monitor_ratios=(float('nan'),))", "got nan"),
    Api("ctl.TimelyFreezeConfig(warmup_steps=-1)", "got -1"),
    Api("ctl.TimelyFreezeConfig(drift_threshold=float('nan'))", "got nan"),
    Api("ctl.TimelyFreezeConfig(seed=-1)", "got -1"),
    Api("ctl.TimelyFreezeConfig.for_run(total_steps=25)", "total_steps >= 26"),
    Api("ctl.TimelyFreezeConfig.for_run(total_steps=1.5)", "got 1.5"),
    Api("ctl.TimelyFreezeConfig.for_run(total_steps=100, bogus=1)", "'bogus'"),
    Api("ctl.TimelyFreezeConfig.for_run(total_steps=100, phase_unit=10**6)", "phase_unit 1000000"),
    Api("ctl.TimelyFreezeConfig.for_run(total_steps=10, warmup_steps=10**9)", "total_steps >="),
    Api("ctl.TimelyFreeze('cfg', build_schedule('1f1b', 1, 4), {0: mod})", "got str"),
    Api("ctl.TimelyFreeze(ctl.TimelyFreezeConfig(), '1f1b', {0: mod})", "got str"),
    Api("ctl.TimelyFreeze(ctl.TimelyFreezeConfig(), build_schedule('1f1b', 1, 4), {5: mod})", "stages [5]"),
    Api("ctl.TimelyFreeze(ctl.TimelyFreezeConfig(), build_schedule('1f1b', 1, 4), {0: torch.nn.ReLU()})", "stage 0"),
    Api("ctl.TimelyFreeze(ctl.TimelyFreezeConfig(), build_schedule('1f1b', 1, 4), {0: mod}, policy='apf')", "'apf'"),
    Api("ctl.TimelyFreeze(ctl.TimelyFreezeConfig(), build_schedule('1f1b', 1, 4), {0: mod}, solver=5)", "got 5"),
    Api("ctl.TimelyFreeze(ctl.TimelyFreezeConfig(), build_schedule('1f1b', 1, 4), [mod])", "got list"),
    Api("controller().step_end(0, {'0F0': float('nan')})", "got nan"),
    Api("controller().step_end(0, {'0F0': -1.0})", "got -1.0"),
    Api("controller().step_end(0, {'0F0': float('inf')})", "got inf"),
    Api("controller().step_end(0, {'0F0': 'x'})", "got 'x'"),
    Api("controller().step_end(0, {'0F0': True})", "got True"),
    Api("controller().step_end(0, {'0F0': 10**400})", "(401 characters)"),
    Api("controller().step_end(0, {'9F9': 1.0})", "'9F9'"),
    Api("controller().step_end(0, [1.0])", "got list"),
    Api("controller().step_end(0, {})", "no timing for 8 action"),
    Api("controller().step_end(1.5, {})", "got 1.5"),
    Api("controller().step_end(0, {}, batches=0)", "got 0"),
    Api("controller().masks_for(0, 99)", "got 99"),
    Api("controller().masks_for(5, 0)", "stage 5"),
    Api("controller().load_state_dict(5)", "got int"),
    Api("controller().load_state_dict({})", "'version'"),
    Api("controller().observe(1.5)", "got 1.5"),
    # -- tfz.metrics
    Api("metrics.APFConfig(alpha=float('nan'))", "got nan"),
    Api("metrics.APFConfig(threshold=-1)", "got -1"),
    Api("metrics.APFConfig(check_interval=0)", "got 0"),
    Api("metrics.APFConfig(tighten_ratio=2)", "got 2"),
    Api("metrics.APFConfig(aggregate='x')", "'x'"),
    Api("metrics.APFConfig(include_tensors='yes')", "'yes'"),
    Api("metrics.APFFreezer(bogus=1)", "'bogus'"),
    Api("metrics.AutoFreezeConfig(percentile=150)", "got 150"),
    Api("metrics.AutoFreezeConfig(percentile=float('nan'))", "got nan"),
    Api("metrics.AutoFreezeConfig(interval=0)", "got 0"),
    Api("metrics.AutoFreezeConfig(layer_pattern='(')", "'('"),
    Api("metrics.MetricGuidedPolicy('x')", "got str"),
    Api("metrics.MetricGuidedPolicy(metrics.APFMetric(), mode='x')", "'x'"),
    Api("metrics.MetricGuidedPolicy(metrics.APFMetric(), other_weight=-1)", "got -1"),
    Api("metrics.APFFreezer().masks_for(-1, 0)", "got -1"),
    Api("metrics.APFMetric().observe(-1, {0: mod})", "got -1"),
    Api("metrics.APFMetric().observe(np.float64(1), {0: mod})", "step must be an integer >= 0, got np.float64(1.0)"),
    Api("metrics.APFMetric().observe(0, {np.bool_(False): mod})", "stage must be an integer >= 0, got np.False_"),
    Api("metrics.APFFreezer().masks_for(0, np.int64(-1))", "microbatch must be an integer >= 0, got np.int64(-1)"),
    Api("metrics.APFConfig(alpha=True)", "alpha must be a number in (0, 1), got True"),
    Api("metrics.APFConfig(alpha=np.float32(1))", "got np.float32(1.0)"),
    Api("metrics.APFConfig(threshold=np.float64('inf'))", "threshold must be a finite number > 0, got np.float64(inf)"),
    Api("metrics.APFConfig(check_interval=True)", "check_interval must be an integer >= 1, got True"),
    Api("metrics.APFConfig(block_rows=np.float32(64))", "block_rows must be an integer >= 1, got np.float32(64.0)"),
    Api("metrics.APFConfig(tighten_ratio=np.bool_(False))", "tighten_ratio must be None or a number in [0, 1), got np.False_"),
    Api("metrics.APFConfig(include_tensors=1)", "include_tensors must be a bool, got 1"),
    Api("metrics.AutoFreezeConfig(percentile=True)", "percentile must be a finite number in [0, 100], got True"),
    Api("metrics.AutoFreezeConfig(percentile=np.float64('inf'))", "got np.float64(inf)"),
    Api("metrics.AutoFreezeConfig(interval=np.bool_(True))", "interval must be an integer >= 1, got np.True_"),
    Api("metrics.AutoFreezeConfig(block_rows=2.0)", "block_rows must be an integer >= 1, got 2.0"),
    Api("metrics.AutoFreezeConfig(include_tensors='yes')", "include_tensors must be a bool, got 'yes'"),
    Api("metrics.MetricGuidedPolicy(metrics.APFMetric(), other_weight=True)", "other_weight must be a finite number in (0, 1], got True"),
    Api("metrics.MetricGuidedPolicy(metrics.APFMetric(), other_weight=np.float32('nan'))", "got np.float32(nan)"),
    # -- tfz.timing
    Api("timing.ActionTimer(capacity=0)", "got 0"),
    Api("timing.ActionTimer(capacity=1.5)", "got float"),
    Api("timing.ActionTimer(capacity=True)", "got bool"),
    Api("timing.ActionTimer(capacity=2**62)", "got 4611686018427387904"),
    Api("timing.ActionTimer(device='tpu')", "'tpu'"),
    Api("timing.ActionTimer(device=True)", "got True"),
    Api("timing.ActionTimer(device=-1)", "got -1"),
    Api("timing.ActionTimer(device='cuda:x')", "'cuda:x'"),
    Api("timing.ActionTimer('cpu')", "TFZ_FORCE_SKIP_CPP", env=(("TFZ_FORCE_SKIP_CPP", "maybe"),)),
    Api("timing.ActionTimer('cpu')", "TFZ_TIMER_FORCE_CPU", env=(("TFZ_TIMER_FORCE_CPU", "2"),)),
    # -- tfz.plan
    Api("plan.PlanConfig(max_freeze_ratio=1.5)", "got 1.5"),
    Api("plan.PlanConfig(max_freeze_ratio=float('nan'))", "got nan"),
    Api("plan.PlanConfig(action_cap=2)", "got 2"),
    Api("plan.PlanConfig(weighting='x')", "'x'"),
    Api("plan.PlanConfig(makespan_slack=-0.1)", "got -0.1"),
    Api("plan.solve(dag, np.ones(3), np.zeros(3))", "(3,)"),
    Api("plan.solve(dag, np.full(dag.num_actions, np.nan), frozen)", "got nan"),
    Api("plan.solve(dag, -unfrozen, frozen)", "got -1.0"),
    Api("plan.solve(dag, unfrozen, np.where(frozen < 1, 2.0, 1.0))", "(2.0) exceeds"),
    Api("plan.solve(dag, unfrozen, np.zeros(dag.num_actions))", "F actions have no parameters"),
    Api("plan.solve(dag, unfrozen, frozen, config='x')", "got str"),
    Api("plan.solve(dag, ['a'] * dag.num_actions, frozen)", "'a'"),
    Api("plan.solve('dag', unfrozen, frozen)", "got str"),
    Api("plan.solve_generic(dag, -unfrozen, frozen)", "got -1.0"),
    Api("plan.Plan.from_dict(5)", "got int"),
    Api("plan.Plan.from_dict(dict(plan.solve(dag, unfrozen, frozen).to_dict(), stage_mean_ratio=5))", "plan.stage_mean_ratio: expected a list of numbers, got 5"),
    Api("plan.Plan.from_dict(dict(plan.solve(dag, unfrozen, frozen).to_dict(), phase_seconds=[1.0]))", "plan.phase_seconds: expected a list of 2 numbers, got [1.0]"),
    Api("plan.Plan.from_dict(dict(plan.solve(dag, unfrozen, frozen).to_dict(), warm='no'))", "plan.warm must be a bool, got 'no'"),
    Api("plan.Plan.from_dict(dict(plan.solve(dag, unfrozen, frozen).to_dict(), cannot_gain=[['0B0']]))", "plan.cannot_gain: expected a list of action names"),
    Api("plan.Plan.from_dict(dict(plan.solve(dag, unfrozen, frozen).to_dict(), total_ratio=True))", "plan.total_ratio must be a finite number, got True"),
    Api("plan.Plan.from_dict(dict(plan.solve(dag, unfrozen, frozen).to_dict(), solve_seconds=np.float64('nan')))", "plan.solve_seconds must be a finite number, got np.float64(nan)"),
    Api("plan.Plan.from_dict(dict(plan.solve(dag, unfrozen, frozen).to_dict(), ratios={'0F0': 0.0, '0B0': np.float32(2)}))", "plan.ratios.0B0 must be a finite number in [0, 1], got np.float32(2.0)"),
    Api("timing.PythonHostTimer(4).record(np.int64(3))", "tag must be a str or an int, got int64"),
    Api("timing.PythonHostTimer(4).record(True)", "tag must be a str or an int, got bool"),
]
if not HAS_CUDA:
    API_CASES += [
        Api("kernels.tune([(64, 64, 64)])", "torch.cuda.is_available() is False"),
        Api("kernels.ActiveRows(np.ones(32, bool), 'cuda:0')", "cuda:0"),
        Api("timing.ActionTimer('cuda')", "'cuda'"),
    ]
# fmt: on


def _id(case) -> str:
    text = (case.argv or "(no arguments)") if hasattr(case, "argv") else case.expr
    return text if len(text) <= 70 else text[:60] + "..." + text[-6:]


# -- the harness --------------------------------------------------------------------------------------


class _Worker:
    """tests/_fuzz_worker.py, started once; :meth:`run` sends one case."""

    def __init__(self, files: dict[str, str]):
        self.files = files
        script = Path(__file__).with_name("_fuzz_worker.py")
        env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
        self.proc = subprocess.Popen(
            [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, **request) -> dict:
        request.update(files=self.files, timeout=SECONDS, memory=MEMORY)
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    paths = {}
    for name, content in FILES.items():
        path = tmp / name.rstrip("/")
        if name.endswith("/"):
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        paths[name.rstrip("/")] = str(path)
    for name in ("missing.json", "missing.csv", "missing/p.json", "missing/p.png", "out.csv", "g.png"):
        paths[name] = str(tmp / name)
    w = _Worker(_Paths(paths, tmp))
    yield w
    w.close()


class _Paths(dict):
    """Fixture paths by name; names not listed are files to be written in the fixture folder."""

    def __init__(self, paths: dict, folder: Path):
        super().__init__(paths)
        self.folder = folder

    def __missing__(self, name):
        return str(self.folder / name)


def _expand(text: str, files) -> str:
    return re.sub(r"\{([^{}]+)\}", lambda m: files[m.group(1)], text)


_NONFINITE = re.compile(r"\b(?:[-+]?inf(?:inity)?|nan)\b", re.IGNORECASE)


def _check_bounded(res: dict) -> None:
    assert res["killed"] is None, f"killed ({res['killed']}) after {res['seconds']:.1f} s"
    assert "HARNESS FAILURE" not in res["err"], res["err"]
    assert "MemoryError" not in res["err"] and "out of memory" not in res["err"], res["err"]


def _nonfinite(text: str, allowed: str) -> list[str]:
    """inf / nan words of ``text`` that the input ``allowed`` does not contain itself."""
    given = {w.lower() for w in _NONFINITE.findall(allowed)}
    return [w for w in _NONFINITE.findall(text) if w.lower() not in given]


def _given(case) -> str:
    """The text of a CLI case's input: its arguments and the fixture files they name."""
    files = re.findall(r"\{([^{}]+)\}", case.argv)
    return " ".join([case.argv, *(str(FILES.get(name) or FILES.get(name + "/") or "") for name in files)])


@pytest.mark.parametrize("case", CLI_CASES, ids=_id)
def test_cli_bad_input(worker, case):
    argv = shlex.split(_expand(case.argv, worker.files))
    res = worker.run(kind="cli", argv=argv, env=dict(case.env))
    _check_bounded(res)
    lines = res["err"].strip().splitlines()
    out = res["out"].splitlines()
    assert res["rc"] == 2 and out == [], res
    assert len(lines) == 1, res["err"]
    line = lines[0]
    assert "Traceback" not in line and line.startswith("tfz"), line
    assert _expand(case.names, worker.files) in line, line
    assert not _nonfinite(line, _given(case)), line


@pytest.mark.parametrize("case", OK_CASES, ids=_id)
def test_cli_computed_correctly(worker, case):
    argv = shlex.split(_expand(case.argv, worker.files))
    res = worker.run(kind="cli", argv=argv)
    _check_bounded(res)
    assert res["rc"] == 0 and res["err"] == "", res
    assert case.shows in res["out"], res["out"]
    assert not _nonfinite(res["out"], ""), res["out"]


@pytest.mark.parametrize("case", API_CASES, ids=_id)
def test_api_bad_input(worker, case):
    res = worker.run(kind="api", expr=case.expr, env=dict(case.env))
    _check_bounded(res)
    assert res.get("exc_type") in case.raises, res
    msg = res["exc"]
    assert _expand(case.names, worker.files) in msg, msg
    assert not _nonfinite(msg, case.expr), msg


def test_the_table_is_large_enough():
    assert len(CLI_CASES) + len(API_CASES) >= 150
