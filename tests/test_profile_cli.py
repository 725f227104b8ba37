"""``tfz profile``: writes a profile ``tfz plan`` accepts; runs the runtime's backward paths (checked by
counting GEMM FLOPs per measured action against closed forms); one-line errors with exit status 2."""

from __future__ import annotations

import pytest
from _cli import run_cli

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from tfz.cli.profile import MODELS  # noqa: E402
from tfz.measure import ProfileConfig, measure_stage, profile_model, stage_layers  # noqa: E402
from tfz.models import PRESETS, build_stages  # noqa: E402
from tfz.nn import convert_to_freezable  # noqa: E402
from tfz.profile import Profile  # noqa: E402
from tfz.timing import ActionSpan  # noqa: E402

_run = run_cli


def test_tiny_profile_is_read_by_plan(tmp_path, capsys):
    path = tmp_path / "tiny.json"
    code, out, err = _run(
        capsys, "profile", "--model", "tiny", "--stages", "2", "--seq-len", "16",
        "--repeats", "2", "--warmup", "1", "--out", str(path),
    )  # fmt: skip
    assert code == 0 and f"wrote {path}" in out
    assert [line.split(" (")[0] for line in err.splitlines()[1:]] == ["stage 1/2", "stage 2/2"]
    profile = Profile.load(path)
    assert set(profile.stages) == {0, 1}
    for s, t in profile.stages.items():
        assert t.f > 0 and t.w > 0 and t.b > 0, s
        assert t.w_frozen <= t.w and t.b_frozen <= t.b
    meta = profile.meta
    assert (meta["model"], meta["device"], meta["repeats"], meta["warmup"]) == ("tiny", "cpu", 2, 1)
    assert (meta["layers_per_stage"], meta["seq_len"], meta["microbatch_size"]) == ([4, 4], 16, 1)
    assert meta["torch"] == torch.__version__ and meta["dim"] == PRESETS["tiny"].dim
    code, out, _ = _run(
        capsys, "plan", "--profile", str(path), "--schedule", "1f1b", "--ranks", "2", "--microbatches", "4"
    )
    assert code == 0 and "makespan planned" in out


def test_llama_1b_shapes_with_small_vocab(tmp_path):
    config = ProfileConfig(
        model="llama-1b", stages=2, seq_len=4, vocab_size=32, warmup=0, repeats=1, layers_per_stage=1
    )
    profile = profile_model(config)
    meta = profile.meta
    cfg = PRESETS["llama-1b"]
    assert (meta["dim"], meta["ffn_dim"], meta["n_heads"], meta["n_kv_heads"]) == (
        cfg.dim,
        cfg.ffn_dim,
        cfg.n_heads,
        cfg.n_kv_heads,
    )
    assert meta["vocab_size"] == 32 and meta["layers_per_stage"] == [1, 1]


class _GemmFlops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        where = {aten.mm: (0, 1), aten.addmm: (1, 2), aten.addmm_: (1, 2)}.get(func.overloadpacket)
        if where is not None:
            a, b = args[where[0]], args[where[1]]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


class FlopTimer:
    """Stands in for ActionTimer: an action's "duration" is the GEMM FLOPs it ran."""

    def __init__(self):
        self.spans = []

    def action(self, name):
        timer = self

        class _Scope(_GemmFlops):
            def __exit__(self, *exc):
                out = super().__exit__(*exc)
                timer.spans.append(ActionSpan(name, 0.0, float(self.flops), 0))
                return out

        return _Scope()

    def collect_spans(self):
        spans, self.spans = self.spans, []
        return spans


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_measured_actions_run_the_runtime_backward(stage):
    """GEMM FLOPs per action: F = L; stage 0: I = 0 and W = B = 2L (its full backward), frozen W and
    B skipped; other stages: I = dX = L, W = dW = L, B = 2L, frozen W = 0 and frozen B = dX = L, where
    L = sum over linear layers of 2 * tokens * out * in."""
    cfg = PRESETS["tiny"].with_(n_layers=3, dim=64, ffn_dim=96, n_heads=4, n_kv_heads=4, vocab_size=40)
    module = convert_to_freezable(build_stages(cfg, 3, stage_ids=[stage])[stage])
    B, T = 2, 5
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 40, (B, T), generator=g) if stage == 0 else torch.randn(B, T, 64, generator=g)
    target = torch.randint(0, 40, (B * T,), generator=g)
    loss_fn = (lambda out: F.cross_entropy(out.reshape(-1, 40), target)) if stage == 2 else None
    t = measure_stage(module, x, first=stage == 0, loss_fn=loss_fn, timer=FlopTimer(), warmup=0, repeats=1)
    linear = sum(
        2 * B * T * m.in_features * m.out_features for m in module.modules() if hasattr(m, "row_usage")
    )
    assert t["F"] == linear
    if stage == 0:
        assert (t["I"], t["W"], t["B"], t["W_frozen"], t["B_frozen"]) == (0, 2 * linear, 2 * linear, 0, 0)
    else:
        assert (t["I"], t["W"], t["B"], t["W_frozen"], t["B_frozen"]) == (
            linear,
            linear,
            2 * linear,
            0,
            linear,
        )


def test_stage_layers():
    assert stage_layers(ProfileConfig(model="tiny", stages=3)) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert stage_layers(ProfileConfig(model="tiny", stages=2, layers_per_stage=1)) == [[0], [1]]
    assert stage_layers(ProfileConfig(model="llama-8b", stages=4)) == [[0], [1], [2], [3]]
    assert stage_layers(ProfileConfig(model="llama-1b", stages=2, layers_per_stage=8))[1] == list(
        range(8, 16)
    )
    assert set(MODELS) == set(PRESETS)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--model", "gpt2", "--stages", "2"],
            "invalid choice: 'gpt2' (choose from 'tiny', 'llama-1b', 'llama-8b')",
        ),
        (["--stages", "0"], "argument --stages: expected an integer >= 1, got '0'"),
        (["--stages", "9"], "--stages 9 exceeds tiny's 8 layers"),
        (
            ["--model", "llama-1b", "--stages", "4", "--layers-per-stage", "5"],
            "--stages 4 x --layers-per-stage 5 = 20 layers exceeds llama-1b's 16 layers",
        ),
        (["--stages", "2", "--seq-len", "600"], "seq_len 600 exceeds tiny's max_seq_len 512"),
        (["--stages", "2", "--device", "tpu"], "device must be cpu or cuda[:N], got 'tpu'"),
    ],
)
def test_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    code, out, err = _run(capsys, "profile", *argv, "--out", str(tmp_path / "p.json"))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_exits_2(tmp_path, capsys):
    code, _, err = _run(
        capsys, "profile", "--stages", "2", "--device", "cuda", "--out", str(tmp_path / "p.json")
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--device cuda requested but CUDA is not available" in err


@pytest.mark.gpu
def test_tiny_profile_on_cuda(tmp_path, capsys):
    path = tmp_path / "cuda.json"
    code, _, _ = _run(
        capsys, "profile", "--model", "tiny", "--stages", "2", "--seq-len", "64", "--device", "cuda",
        "--repeats", "3", "--warmup", "1", "--out", str(path),
    )  # fmt: skip
    assert code == 0
    profile = Profile.load(path)
    assert profile.meta["device"].startswith("cuda:") and profile.meta["timer"] in ("cuda-events", "python")
    assert all(t.f > 0 and t.b > 0 for t in profile.stages.values())


def test_measure_stage_refuses_unfit_timers():
    """A timer too small for one repetition, or holding an action of its caller: clear errors."""
    from tfz.timing import ActionTimer

    module = convert_to_freezable(torch.nn.Sequential(torch.nn.Linear(8, 8)))
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="timer capacity 11 is below the 12 records one repetition takes"):
        measure_stage(module, x, first=False, timer=ActionTimer("cpu", capacity=11), warmup=0, repeats=1)
    timer = ActionTimer("cpu")
    with timer.action("user-step"):
        pass
    with pytest.raises(ValueError, match="timer holds action 'user-step', which measure_stage did not time"):
        measure_stage(module, x, first=False, timer=timer, warmup=0, repeats=1)
    t = measure_stage(module, x, first=False, timer=ActionTimer("cpu", capacity=12), warmup=0, repeats=1)
    assert sorted(t) == sorted(["F", "I", "W", "W_frozen", "B", "B_frozen"])


def test_profile_model_checks_memory_first(monkeypatch):
    """The CLI's memory check runs before anything is built (here on a host of 1000 bytes)."""
    import tfz.measure

    monkeypatch.setattr(tfz.measure, "host_memory", lambda: 1000)
    config = ProfileConfig(stages=2, seq_len=8, repeats=1, warmup=0)
    with pytest.raises(ValueError, match=r"needs at least .* GB of host memory, which has 1e-06 GB"):
        profile_model(config)
