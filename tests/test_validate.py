"""tfz._validate: the shared number and environment-flag checks."""

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tfz._validate import (
    SWITCHES,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_ratio,
    env_flag,
    is_int,
    is_number,
)


@pytest.mark.parametrize("value", [0, 7, np.int64(3), np.int32(-2), np.uint8(5)])
def test_is_int_accepts_python_and_numpy_integers(value):
    assert is_int(value)
    assert is_number(value)


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 1.0, np.float32(1), "1", None, [1]])
def test_is_int_rejects_bools_floats_and_others(value):
    assert not is_int(value)


@pytest.mark.parametrize("value", [True, np.bool_(False), "0.5", None, complex(1, 0)])
def test_is_number_rejects_bools_and_non_numbers(value):
    assert not is_number(value)


def test_check_bool_takes_python_and_numpy_bools_only():
    for value in (True, False, np.bool_(True), np.bool_(False)):
        out = check_bool("flag", value)
        assert out == bool(value) and type(out) is bool
    for bad in (1, 0, np.int64(1), 1.0, "true", None):
        with pytest.raises(ValueError, match=r"^flag must be a bool, got " + re.escape(repr(bad)) + "$"):
            check_bool("flag", bad)


def test_check_int_returns_plain_int_and_names_the_value():
    out = check_int("microbatches", np.int64(8), 1)
    assert out == 8 and type(out) is int
    with pytest.raises(ValueError, match=r"^microbatches must be an integer >= 1, got 0$"):
        check_int("microbatches", 0, 1)
    with pytest.raises(ValueError, match=r"ranks must be an integer in \[1, 4\], got 5"):
        check_int("ranks", 5, 1, maximum=4)
    with pytest.raises(ValueError, match=r"stage must be an integer >= 0, got True"):
        check_int("stage", True, 0)
    assert check_int("warmup", None, 0, optional=True) is None
    with pytest.raises(ValueError, match=r"warmup must be None or an integer >= 0, got -1"):
        check_int("warmup", -1, 0, optional=True)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, np.float64("nan"), True, "0.5", None])
def test_check_number_refuses_non_finite_and_non_numbers(bad):
    with pytest.raises(ValueError, match=r"^f must be a finite number, got "):
        check_number("f", bad)


def test_check_number_ranges_and_types():
    out = check_number("ratio", np.float32(0.5), low=0, high=1)
    assert out == 0.5 and type(out) is float
    assert check_number("timeout", 3, low=0, low_open=True, unit="seconds") == 3.0
    with pytest.raises(ValueError, match=r"timeout must be a finite number of seconds > 0, got 0"):
        check_number("timeout", 0, low=0, low_open=True, unit="seconds")
    with pytest.raises(ValueError, match=r"x must be a finite number <= 2, got 2.5"):
        check_number("x", 2.5, high=2)
    with pytest.raises(ValueError, match=r"x must be a finite number in \(0, 1\], got 0"):
        check_number("x", 0, low=0, high=1, low_open=True)
    assert check_number("x", None, optional=True) is None


@pytest.mark.parametrize(
    "value, ok", [(0, True), (1, True), (np.float32(0.25), True), (-0.01, False), (1.5, False)]
)
def test_check_ratio(value, ok):
    if ok:
        assert check_ratio("max_freeze_ratio", value) == float(value)
    else:
        with pytest.raises(ValueError, match=r"max_freeze_ratio must be a finite number in \[0, 1\]"):
            check_ratio("max_freeze_ratio", value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        (" yes ", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("False", False),
        ("no", False),
        ("off", False),
        ("", False),
    ],
)
def test_env_flag_parses_one_way(monkeypatch, text, expected):
    monkeypatch.setenv("TFZ_TEST_FLAG", text)
    assert env_flag("TFZ_TEST_FLAG") is expected


def test_env_flag_default_and_bad_value(monkeypatch):
    monkeypatch.delenv("TFZ_TEST_FLAG", raising=False)
    assert env_flag("TFZ_TEST_FLAG") is False
    assert env_flag("TFZ_TEST_FLAG", default=True) is True
    monkeypatch.setenv("TFZ_TEST_FLAG", "maybe")
    with pytest.raises(
        ValueError, match=r"TFZ_TEST_FLAG must be 1/true/yes/on or 0/false/no/off, got 'maybe'"
    ):
        env_flag("TFZ_TEST_FLAG")


def test_loads_by_path_with_the_standard_library_only():
    """setup.py and kernels/configs.py (which kernels/aot.py runs where tfz may not be installed) load
    tfz/_validate.py by path: it must import nothing outside the standard library."""
    root = Path(__file__).resolve().parents[1]
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('_cfg', {str(root / 'kernels' / 'configs.py')!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "sys.modules['_cfg'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "print(mod.check_int.__module__, 'tfz' in sys.modules, 'numpy' in sys.modules)\n"
        "try:\n"
        "    mod.WgradConfig(block_m=True)\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
    )
    # -S: no site-packages, so neither tfz nor numpy can be imported
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "_tfz_validate False False",
        "WgradConfig.block_m must be an integer >= 1, got True",
    ]


def test_switches_list_every_flag_the_package_reads():
    """SWITCHES (checked up front by the tfz command) names each variable tfz reads with env_flag."""
    root = Path(__file__).resolve().parents[1]
    read = set()
    for path in [*(root / "tfz").rglob("*.py"), *(root / "kernels").rglob("*.py")]:
        read |= set(re.findall(r'env_flag\("(TFZ_[A-Z_]+)"', path.read_text()))
    assert read == set(SWITCHES)


def test_check_choice_names_the_value_and_the_choices():
    assert check_choice("task", "pretrain", ("finetune", "pretrain")) == "pretrain"
    assert check_choice("corpus", "b", {"a": 1, "b": 2}) == "b"  # a dict's keys
    for bad in ("Pretrain", 5, ["pretrain"], None):
        with pytest.raises(
            ValueError, match=re.escape(f"unknown task {bad!r}; choose one of: finetune, pretrain")
        ):
            check_choice("task", bad, ("finetune", "pretrain"))
