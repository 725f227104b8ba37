"""The demo's base model: reproducible from its seed, cached by spec, loadable into any stage split."""

import pytest
import torch

from tfz.demo.base import BaseSpec, base_path, ensure_base, load_base, save_base
from tfz.models import build_stages

SPEC = BaseSpec(dim=16, n_layers=3, n_heads=2, ffn_dim=32, seq_len=8, steps=3, batch_size=2, warmup=1)


def test_build_is_reproducible_and_cached(tmp_path):
    lines = []
    a, built = ensure_base(SPEC, tmp_path / "a", progress=lines.append)
    assert built and a.is_file() and a.parent == tmp_path / "a"
    assert any("building the base model" in line for line in lines) and any("3/3" in line for line in lines)
    b, _ = ensure_base(SPEC, tmp_path / "b", progress=lines.append)
    assert a.name == b.name  # the name is a hash of the spec and the training text
    wa, wb = load_base(a).state_dict, load_base(b).state_dict
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    lines.clear()
    again, built = ensure_base(SPEC, tmp_path / "a", progress=lines.append)
    assert again == a and not built and not lines
    other = BaseSpec(**{**SPEC.__dict__, "seed": 1})
    assert base_path(other, tmp_path / "a") != a
    assert not torch.equal(
        load_base(ensure_base(other, tmp_path / "a")[0]).state_dict["output.weight"], wa["output.weight"]
    )


def test_any_split_loads_the_same_model(tmp_path):
    cfg = SPEC.model_config()
    whole = build_stages(cfg, 1, seed=5)[0]
    path = save_base(tmp_path / "mine.pt", cfg, whole.state_dict(), metrics={"note": 1})
    base = load_base(path)
    assert base.config == cfg and base.metrics == {"note": 1}
    x = torch.randint(0, 256, (2, 8))
    for split in (2, 3):
        stages = build_stages(cfg, split, seed=0)  # other weights, replaced by the base's
        for stage in stages.values():
            base.load_into(stage)
        h = x
        for s in range(split):
            h = stages[s](h)
        torch.testing.assert_close(h, whole(x), rtol=0, atol=0)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_base(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="junk.pt is not a readable checkpoint"):
        load_base(junk)
    cfg = SPEC.model_config()
    good = save_base(tmp_path / "good.pt", cfg, build_stages(cfg, 1)[0].state_dict())
    payload = torch.load(good, weights_only=True)
    for key, value, match in (
        ("format", "other", "is not a tfz-demo-base file"),
        ("version", 99, "version 99, expected 1"),
        ("model", {"dim": -1}, "bad 'model' entry"),
        ("state_dict", {"w": 1}, "'state_dict' must map names to tensors"),
    ):
        bad = tmp_path / f"bad_{key}.pt"
        torch.save({**payload, key: value}, bad)
        with pytest.raises(ValueError, match=match):
            load_base(bad)
    small = tmp_path / "small.pt"
    weights = dict(payload["state_dict"])
    weights.pop("output.weight")
    torch.save({**payload, "state_dict": weights}, small)
    with pytest.raises(ValueError, match="no weights for 'output.weight'"):
        load_base(small).load_into(build_stages(cfg, 2)[1])


def test_spec_errors():
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        BaseSpec(steps=0)
    with pytest.raises(ValueError, match="unknown corpus 'x'"):
        BaseSpec(corpus="x")
    with pytest.raises(ValueError, match="dim 10 is not divisible by n_heads 3"):
        BaseSpec(dim=10, n_heads=3)
