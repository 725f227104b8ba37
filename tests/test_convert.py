"""convert_to_freezable on models written elsewhere: nn.Linear subclasses, its report, and the error of a
stage with nothing freezable. Gradients of converted subclasses are checked against plain float64
autograd with row masks applied by hand."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from tfz.masks import StageUnits
from tfz.nn import ConversionReport, FreezableLinear, convert_to_freezable, use_row_masks


class ConfiguredLinear(nn.Linear):
    """Like torchtitan's ``Linear``: built from a config, keeps nn.Linear.forward, adds a method."""

    def __init__(self, config: dict):
        super().__init__(config["in"], config["out"], bias=config.get("bias", False))
        self.config = config

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = ConfiguredLinear({"in": 6, "out": 5})
        self.w2 = nn.Linear(5, 6)
        self.scaled = ScaledLinear(6, 6)
        self.attn = nn.MultiheadAttention(6, 2)
        self.norm = nn.LayerNorm(6)

    def forward(self, x):
        h = self.w2(torch.tanh(self.wq(x)))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.scaled(self.norm(h))


def test_subclass_keeping_forward_is_converted_in_place_and_others_are_reported(caplog):
    torch.manual_seed(0)
    model = Model()
    wq, scaled = model.wq, model.scaled
    x = torch.randn(4, 6)
    y = model(x)
    with caplog.at_level(logging.INFO, logger="tfz.nn"):
        out, report = convert_to_freezable(model, report=True)
    assert out is model and isinstance(report, ConversionReport)
    assert model.wq is wq and isinstance(wq, FreezableLinear) and isinstance(wq, ConfiguredLinear)
    assert type(wq).__name__ == "FreezableConfiguredLinear" and wq.config == {"in": 6, "out": 5}
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    assert model.scaled is scaled and not isinstance(scaled, FreezableLinear)
    assert not isinstance(model.attn.out_proj, FreezableLinear)
    assert report.converted == ("wq", "w2")
    reasons = dict(report.skipped)
    assert reasons["scaled"] == "ScaledLinear overrides nn.Linear.forward"
    assert "nn.MultiheadAttention" in reasons["attn.out_proj"]
    assert "skipped 2" in str(report) and "scaled: ScaledLinear overrides" in str(report)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "scaled" in warned[0] and "attn.out_proj" in warned[0]
    units = StageUnits.from_module(model, block_rows=2)
    assert {u.name for u in units.units} == {"wq", "w2"}
    assert type(convert_to_freezable(Model()).wq) is type(wq)  # one generated class per subclass
    wq.init_weights(0.1)  # the subclass's own methods are kept


def test_converted_subclass_grads_equal_masked_float64_autograd():
    torch.manual_seed(1)
    plain = ConfiguredLinear({"in": 6, "out": 5, "bias": True}).double()
    layer = ConfiguredLinear({"in": 6, "out": 5, "bias": True}).double()
    layer.load_state_dict(plain.state_dict())
    convert_to_freezable(layer)
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    grad = torch.randn(3, 7, 5, dtype=torch.float64)
    active = torch.tensor([True, False, True, True, False])
    with use_row_masks({layer: active}):
        layer(x).backward(grad)
    plain(x).backward(grad)
    keep = active.double()
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad * keep[:, None], rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, plain.bias.grad * keep, rtol=0, atol=1e-12)


def test_explicit_selection_of_an_unconvertible_linear_raises():
    with pytest.raises(ValueError, match="scaled.*overrides nn.Linear.forward"):
        convert_to_freezable(Model(), filter_fn=lambda m, fqn: fqn == "scaled")
    with pytest.raises(ValueError, match="attn.out_proj.*MultiheadAttention"):
        convert_to_freezable(Model(), filter_fn=lambda m, fqn: fqn == "attn.out_proj")
    lin = nn.Linear(4, 4)
    parametrize.register_parametrization(lin, "weight", nn.Identity())
    holder = nn.Sequential(lin)
    _, report = convert_to_freezable(holder, report=True)
    assert report.converted == () and "parametrized" in dict(report.skipped)["0"]


def test_filter_fn_exclusions_are_reported_without_a_warning(caplog):
    model = Model()
    with caplog.at_level(logging.WARNING, logger="tfz.nn"):
        _, report = convert_to_freezable(model, filter_fn=lambda m, fqn: fqn == "w2", report=True)
    assert report.converted == ("w2",)
    assert dict(report.skipped)["wq"] == "filter_fn returned False"
    assert not caplog.records


def test_a_stage_without_freezable_units_names_filter_fn_and_its_modules():
    model = nn.Sequential(ScaledLinear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError) as err:
        StageUnits.from_module(model)
    text = str(err.value)
    assert "freezable unit" in text and "filter_fn" in text and "include_tensors=True" in text
    assert "0 (test_convert.ScaledLinear)" in text and "1 (torch.nn.modules.normalization.LayerNorm)" in text
    many = nn.Sequential(*[nn.LayerNorm(2) for _ in range(10)])
    with pytest.raises(ValueError, match=r"\.\.\. \(10 in all\)"):
        StageUnits.from_module(many)
    with pytest.raises(ValueError, match="no trainable parameter"):
        StageUnits.from_module(nn.Sequential(nn.ReLU()), include_tensors=True)


def test_a_model_with_a_converted_subclass_pickles_whole():
    """torch.save(model) pickles modules by class; the generated Freezable<cls> is rebuilt from cls."""
    import io
    import pickle

    torch.manual_seed(0)
    model = convert_to_freezable(Model())
    x = torch.randn(3, 6)
    for load in (lambda m: pickle.loads(pickle.dumps(m)), lambda m: _torch_round_trip(m, io.BytesIO())):
        back = load(model)
        assert type(back.wq) is type(model.wq) and back.wq.config == {"in": 6, "out": 5}
        assert isinstance(back.w2, FreezableLinear) and back.wq.row_usage is not model.wq.row_usage
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
        active = torch.tensor([True, False, True, True, False])
        with use_row_masks({back.wq: active}):
            back(x).sum().backward()
        assert back.wq.weight.grad[~active].abs().max() == 0 and back.wq.weight.grad[active].abs().max() > 0


def _torch_round_trip(model, buffer):
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _masked_grads_match_plain(model: nn.Module, layer: nn.Linear, x: torch.Tensor) -> None:
    """``layer``'s weight gradient under a mask freezing its row 0 is plain autograd's with row 0 zeroed."""
    plain = torch.autograd.grad(model(x).sum(), layer.weight)[0]
    active = torch.ones(layer.out_features, dtype=torch.bool)
    active[0] = False
    layer.weight.grad = None
    layer.row_usage.reset()
    with use_row_masks({layer: active}):
        model(x).sum().backward()
    plain[0] = 0
    torch.testing.assert_close(layer.weight.grad, plain, rtol=1e-6, atol=1e-7)


def test_a_linear_used_twice_under_one_parent_is_converted_and_stays_shared():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    _, report = convert_to_freezable(model, report=True)
    assert report.converted == ("0",) and model[0] is model[2] is lin and isinstance(lin, FreezableLinear)
    _masked_grads_match_plain(model, lin, torch.randn(4, 3))
    assert lin.row_usage.calls == 2, "both uses record their usage"


def test_conversion_keeps_buffers_children_attributes_and_hooks():
    lin = nn.Linear(4, 3)
    lin.register_buffer("scale", torch.arange(3.0))
    lin.extra = nn.Linear(4, 3)
    lin.tag = "kept"
    calls = []
    lin.register_forward_hook(lambda *args: calls.append("hook"))
    model = nn.Sequential(lin)
    keys = list(model.state_dict())
    convert_to_freezable(model)
    assert type(model[0]) is FreezableLinear and isinstance(model[0].extra, FreezableLinear)
    assert list(model.state_dict()) == keys and model[0].tag == "kept"
    model(torch.randn(2, 4))
    assert calls == ["hook"]


def test_unconvertible_linears_are_skipped_and_a_selected_one_converts_nothing():
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.LazyLinear(3))
    prune.l1_unstructured(model[1], "weight", amount=0.5)
    with pytest.raises(
        ValueError, match="selected 1, which cannot be made freezable: its weight is not a Par"
    ):
        convert_to_freezable(model, filter_fn=lambda m, fqn: fqn in ("0", "1"))
    assert not any(isinstance(m, FreezableLinear) for m in model.modules()), "a failed call converts nothing"
    _, report = convert_to_freezable(model, report=True)
    reasons = dict(report.skipped)
    assert report.converted == ("0",)
    assert "computed by a hook" in reasons["1"] and "uninitialized lazy module" in reasons["2"]
    model(torch.randn(2, 4))  # the lazy layer initializes (a plain nn.Linear now) and converts
    assert convert_to_freezable(model, report=True)[1].converted == ("2",)
    model(torch.randn(2, 4))
    assert type(model[2]) is FreezableLinear


class TiedHead(nn.Module):
    """An output layer whose weight is the embedding's, as HuggingFace's ``tie_word_embeddings``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.body(self.embed(tokens))))


def test_a_linear_tied_to_another_module_is_skipped():
    """Freezing a row of a tied output layer would drop the embedding's gradient to that row too."""
    model = TiedHead()
    _, report = convert_to_freezable(model, report=True)
    assert report.converted == ("body",)
    assert "tied to other modules (embed (Embedding), head (Linear))" in dict(report.skipped)["head"]
    with pytest.raises(ValueError, match="selected head.*tied"):
        convert_to_freezable(TiedHead(), filter_fn=lambda m, fqn: fqn == "head")
    _masked_grads_match_plain(model, model.body, torch.tensor([[0, 3, 4]]))
