"""tfz.optim's native AdamW pass (``tfz._row_adamw``) against a float64 run of torch's AdamW with the
row-freezing hooks, on the same weights, state and masks each step; and where it must not be used."""

import copy

import pytest
import torch
from torch import nn

import tfz.optim
from tfz.nn import FreezableLinear, use_row_masks
from tfz.optim import attach_row_freezing

pytestmark = pytest.mark.skipif(not tfz.optim.NATIVE, reason="tfz._row_adamw is not built")

N_MB = 4


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        FreezableLinear(6, 8),
        nn.Tanh(),
        FreezableLinear(8, 5, bias=False),
        nn.LayerNorm(5),
        FreezableLinear(5, 3),
    )


def masks_for(step, gen, model):
    """Per microbatch {layer: bool [rows]}: random rows, row 0 never active, layer 2 frozen on step 1."""
    out = []
    for _ in range(N_MB):
        per = {}
        for i in (0, 2, 4):
            m = torch.rand(model[i].out_features, generator=gen) > 0.5
            m[0] = False
            if i == 2 and step == 1:
                m[:] = False
            per[i] = m
        out.append(per)
    return out


def backward(model, masks, xs):
    for per, x in zip(masks, xs):
        with use_row_masks({model[i]: m for i, m in per.items()}):
            (model(x.to(model[0].weight.dtype)) ** 2).sum().backward()


def sync(dst_model, dst_opt, src_model, src_opt):
    """dst := src (weights and AdamW state, cast to dst's dtype)."""
    with torch.no_grad():
        for d, s in zip(dst_model.parameters(), src_model.parameters()):
            d.copy_(s)
            state = src_opt.state.get(s)
            if state:
                dst_opt.state[d] = {
                    k: v.clone() if k == "step" else v.to(d.dtype).clone() for k, v in state.items()
                }


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("step_scale", [0.0, 0.5, -1.0])
def test_row_adamw_matches_float64_hooks(rescale, step_scale):
    model = make_model()
    ref = copy.deepcopy(model).double()
    kw = dict(lr=0.02, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt, ref_opt = torch.optim.AdamW(model.parameters(), **kw), torch.optim.AdamW(ref.parameters(), **kw)
    hooks = attach_row_freezing(opt, model, rescale=rescale, step_scale=step_scale)
    ref_hooks = attach_row_freezing(ref_opt, ref, rescale=rescale, step_scale=step_scale)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        for group in (*opt.param_groups, *ref_opt.param_groups):
            group["lr"] = 0.02 / (step + 1)  # as a scheduler would set it
        sync(ref, ref_opt, model, opt)
        masks = masks_for(step, gen, model)
        xs = [torch.randn(3, 6, generator=gen, dtype=torch.float64) for _ in range(N_MB)]
        backward(model, masks, xs)
        backward(ref, masks, xs)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: p.grad for n, p in model.named_parameters()}
        opt.step()
        ref_opt.step()
        assert hooks.fused_tensors == 5 - (step == 1) and ref_hooks.fused_tensors == 0
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            assert p.grad is grads[n], "gradients are back after the step"
            torch.testing.assert_close(p.double(), q, rtol=1e-5, atol=1e-6, msg=f"{n} step {step}")
            for key, value in opt.state[p].items():
                expected = ref_opt.state[q][key]
                torch.testing.assert_close(
                    value.double(),
                    expected.double(),
                    rtol=1e-4,
                    atol=1e-7,
                    msg=lambda m, key=key: f"{key}: {m}",
                )
            if n.split(".")[0] in ("0", "2", "4"):
                layer = int(n.split(".")[0])
                never = ~torch.stack([per[layer] for per in masks]).any(0)
                assert torch.equal(p[never], before[n][never]), "rows active in no call are kept bit for bit"
                if step == 0:
                    assert (opt.state[p]["exp_avg"][never] == 0).all(), "fresh state of frozen rows is zero"
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)


def test_whole_layer_frozen_with_a_held_gradient_only_advances_the_step():
    """A gradient left from an earlier backward, then a step whose calls all froze the layer."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    hooks = attach_row_freezing(opt, model)
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(3, 6, generator=gen) for _ in range(N_MB)]
    backward(model, masks_for(0, gen, model), xs)
    opt.step()  # no zero_grad: .grad stays
    state = {k: v.clone() for k, v in opt.state[model[2].weight].items()}
    before = model[2].weight.detach().clone()
    backward(model, masks_for(1, gen, model), xs)  # layer 2 frozen in every call
    opt.step()
    assert hooks.fused_tensors == 5
    assert torch.equal(model[2].weight, before)
    assert torch.equal(opt.state[model[2].weight]["exp_avg"], state["exp_avg"])
    assert opt.state[model[2].weight]["step"].item() == state["step"].item() + 1


def test_checkpoint_continues_in_plain_torch():
    """State written by the native pass is torch's AdamW state: a plain AdamW loads it and steps on as
    the native pass does when every row is active."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    hooks = attach_row_freezing(opt, model)
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(3, 6, generator=gen) for _ in range(N_MB)]
    backward(model, masks_for(0, gen, model), xs)
    opt.step()
    opt.zero_grad()
    plain = copy.deepcopy(model)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=0.01, weight_decay=0.1)
    plain_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m in (model, plain):
        (m(xs[0]) ** 2).sum().backward()  # no masks: every row active
    opt.step()
    plain_opt.step()
    assert hooks.fused_tensors == 5
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)
        assert torch.equal(opt.state[p]["step"], plain_opt.state[q]["step"])


def _fused_count(opt, model, fused=True, **step_kwargs):
    hooks = attach_row_freezing(opt, model, fused=fused)
    gen = torch.Generator().manual_seed(4)
    backward(model, masks_for(0, gen, model), [torch.randn(3, 6, generator=gen) for _ in range(N_MB)])
    opt.step(**step_kwargs)
    hooks.remove()
    return hooks.fused_tensors


@pytest.mark.parametrize(
    "case",
    ["amsgrad", "maximize", "adam", "float64", "closure", "switched_off", "fused_false", "plain_adamw"],
)
def test_falls_back_to_the_hooks_where_it_does_not_apply(case, monkeypatch):
    model = make_model()
    kwargs = {}
    if case in ("amsgrad", "maximize"):
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, **{case: True})
    elif case == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
    else:
        if case == "float64":
            model = model.double()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    if case == "closure":
        kwargs = {"closure": lambda: None}
    if case == "switched_off":
        monkeypatch.setenv("TFZ_FORCE_SKIP_CPP", "1")
    expected = 5 if case == "plain_adamw" else 0  # the control: same setup, native pass taken
    assert _fused_count(opt, model, fused=case != "fused_false", **kwargs) == expected


def test_bad_fused_argument_raises():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="fused must be a bool, got 1"):
        attach_row_freezing(opt, model, fused=1)
    assert "fused=False" in repr(attach_row_freezing(opt, model, fused=False))
