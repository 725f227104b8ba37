"""tfz demo's command line: bad input ends at once with exit status 2 and one line naming it."""

import os
import subprocess
import sys
import time

import pytest

from tfz.cli import main


def _run(capsys, *argv):
    code = main(["demo", *argv])
    err = capsys.readouterr().err
    return code, err


def _refused(capsys, *argv, match):
    try:
        code, err = _run(capsys, *argv)
    except SystemExit as exc:  # argparse's own errors
        code, err = exc.code, capsys.readouterr().err
    assert code == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]


def test_huge_ranks_end_at_once_with_the_estimate():
    """In a fresh process, as a user runs it: no rank is started, nothing is built."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "tfz", "demo", "--ranks", "1000000000", "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--ranks 1000000000" in lines[0] and "GB" in lines[0], proc.stderr
    assert time.perf_counter() - t0 < 60


def test_bad_sizes_and_schedules_are_refused_before_ranks_start(capsys):
    _refused(
        capsys, "--ranks", "4", "--microbatches", "2", "--steps", "1", match="needs at least 4 microbatches"
    )
    _refused(capsys, "--microbatches", "1000000000", match="--microbatches 1000000000")
    _refused(
        capsys,
        "--methods",
        "all",
        "--steps",
        "12",
        match="TimelyFreeze settings: a run of 12 steps is too short",
    )


def test_bad_seeds_and_task_name_the_value(capsys):
    _refused(capsys, "--seeds", "x", match="'x'")
    _refused(capsys, "--seeds", "0,-1", match="'0,-1'")
    _refused(capsys, "--seeds", "1,1", match="seeds repeat in '1,1'")
    _refused(capsys, "--seeds", "", match="''")
    _refused(capsys, "--task", "finetuning", match="'finetuning'")
    _refused(capsys, "--task", "pretrain", "--base", "x.pt", match="--base x.pt")
    _refused(capsys, "--mask-layout", "rows", match="'rows'")
    _refused(capsys, "--output-layer", "head", match="'head'")
    _refused(capsys, "--vocab-size", "100", match="vocab_size must be an integer in [256, 65536], got 100")
    _refused(capsys, "--monitor-ratios", "0,x", match="'0,x'")
    _refused(capsys, "--monitor-ratios", "0", match="monitor_ratios must hold a ratio above 0, got (0.0,)")
    _refused(capsys, "--monitor-ratios", "0,1.5", match="monitor_ratios[1] must be")


def test_empty_data_is_refused(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    folder = tmp_path / "folder"
    folder.mkdir()
    out = str(tmp_path / "out")
    _refused(capsys, "--data", str(empty), "--out", out, match=f"data file {empty} is empty")
    _refused(capsys, "--data", str(folder), "--out", out, match="needs at least 2 non-empty files")
    _refused(capsys, "--data", str(tmp_path / "missing"), "--out", out, match="does not exist")
    _refused(capsys, "--task", "pretrain", "--data", str(empty), "--out", out, match="is empty")


def test_short_data_is_refused_before_the_base_is_built(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TFZ_CACHE_DIR", str(tmp_path / "cache"))
    short = tmp_path / "short.txt"
    short.write_bytes(b"x = 1\n" * 40)  # 240 bytes: its validation tenth is shorter than a sequence
    _refused(capsys, "--data", str(short), "--out", str(tmp_path / "out"), match="val text has 24 bytes")
    assert not (tmp_path / "cache").exists()


def test_out_is_checked_before_the_work(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _refused(capsys, "--out", str(blocker), match="exists and is not a folder")
    _refused(capsys, "--out", str(blocker / "sub"), match="is not a folder")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _refused(capsys, "--out", str(locked / "sub"), match="is not writable")


def test_cache_folder_is_checked_before_the_work(capsys, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = str(tmp_path / "out")
    monkeypatch.setenv("TFZ_CACHE_DIR", str(blocker))
    line = f"cache folder ($TFZ_CACHE_DIR) {str(blocker)!r} exists and is not a folder"
    _refused(capsys, "--out", out, match=line)
    monkeypatch.setenv("TFZ_CACHE_DIR", str(blocker / "sub"))
    _refused(capsys, "--out", out, match=f"{str(blocker)!r} is not a folder")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    # bytes from scratch cache nothing, so only the data is refused
    _refused(
        capsys,
        "--task",
        "pretrain",
        "--vocab-size",
        "256",
        "--data",
        str(empty),
        "--out",
        out,
        match="is empty",
    )


def test_bad_base_file_is_refused(capsys, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    out = str(tmp_path / "out")
    _refused(capsys, "--base", str(bad), "--out", out, match="is not a readable checkpoint")
    _refused(capsys, "--base", str(tmp_path / "none.pt"), "--out", out, match="is not a file")
    import torch

    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    _refused(capsys, "--base", str(other), "--out", out, match="is not a tfz-demo-base file")


@pytest.mark.parametrize("flag", ["--steps", "--ranks", "--eval-every"])
def test_non_positive_integers(capsys, flag):
    _refused(capsys, flag, "0", match=f"{flag.lstrip('-').replace('-', '_')} must be an integer >= 1, got 0")


def test_a_refused_demo_creates_no_out_folder(capsys, tmp_path):
    """Short data and a bad base are refused before --out is made; the message names the data."""
    short = tmp_path / "short.txt"
    short.write_bytes(b"x = 1\n" * 10)  # a 6-byte validation tenth
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    out = tmp_path / "x" / "sub" / "deep"
    _refused(capsys, "--data", str(short), "--out", str(out), match=f"{short}: val text has 6 bytes")
    _refused(capsys, "--base", str(bad), "--out", str(out), match="is not a readable checkpoint")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "rank,world,match",
    [
        ("0", "abc", "environment variable WORLD_SIZE must be an integer, got 'abc'"),
        ("x", "2", "environment variable RANK must be an integer, got 'x'"),
        ("2", "2", "RANK=2 is not in [0, WORLD_SIZE=2)"),
        ("0", "99", "WORLD_SIZE=99: the demo starts one process per rank"),
        ("0", "3", "WORLD_SIZE=3: 1f1b with 3 ranks needs at least 3 microbatches, got 2"),
    ],
)
def test_bad_torchrun_environment_is_named(capsys, tmp_path, monkeypatch, rank, world, match):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    line = _refused(capsys, "--microbatches", "2", "--out", str(tmp_path / "out"), match=match)
    assert "--ranks" not in line


def test_schedule_names_of_any_case_are_accepted(capsys, tmp_path, monkeypatch):
    """As simulate and plan accept them; the config gets the lower-case name."""
    import tfz.demo

    seen = []
    monkeypatch.setattr(tfz.demo, "run_demo", lambda cfg, announce: seen.append(cfg.schedule))
    for name in ("ZBV", "Interleaved1F1B"):
        assert main(["demo", "--schedule", name, "--out", str(tmp_path / "out"), "--steps", "100"]) == 0
    assert seen == ["zbv", "interleaved1f1b"]
