"""tfz.optim: rows frozen for a whole step keep weight and optimizer state; the rest match plain torch."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import tfz.optim
from tfz.nn import FreezableLinear, use_row_masks
from tfz.optim import attach_row_freezing

ROWS = {"0": 6, "2": 5, "4": 3}


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        FreezableLinear(4, 6),
        nn.Tanh(),
        FreezableLinear(6, 5, bias=False),
        nn.LayerNorm(5),
        FreezableLinear(5, 3),
    )


def step_masks(step, n_mb, gen):
    """Per microbatch {layer: bool [rows]}: row 0 always frozen, the last layer fully frozen on odd steps."""
    masks = []
    for _ in range(n_mb):
        per = {}
        for name, rows in ROWS.items():
            m = torch.rand(rows, generator=gen) > 0.4
            m[0] = False
            if name == "4" and step % 2 == 1:
                m[:] = False
            per[name] = m
        masks.append(per)
    return masks


def run_backward(model, masks, gen):
    for per in masks:
        x = torch.randn(3, 4, generator=gen)
        with use_row_masks({model.get_submodule(k): v for k, v in per.items()}):
            (model(x) ** 2).sum().backward()


def frozen_all_step(masks):
    return {name: torch.stack([~per[name] for per in masks]).all(0) for name in ROWS}


def tracked(model):
    """(param name, layer name) of the FreezableLinear parameters."""
    return [(n, n.split(".")[0]) for n, _ in model.named_parameters() if n.split(".")[0] in ROWS]


OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "adam_amsgrad": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.05, amsgrad=True),
}


def same_or_close(exact):
    """torch.equal, or (the native AdamW pass against torch's kernels) equal up to float32 rounding."""
    if exact:
        return torch.equal

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
        return True

    return close


@pytest.mark.parametrize("name", sorted(OPTIMIZERS) + ["adamw_native"])
def test_frozen_rows_keep_weight_and_state_others_match_plain_torch(name):
    """Every optimizer through the hooks matches plain torch exactly; AdamW's native pass
    (``adamw_native``) up to rounding. Frozen rows are kept bit for bit either way."""
    native = name == "adamw_native"
    if native and not tfz.optim.NATIVE:
        pytest.skip("tfz._row_adamw is not built")
    make_opt = OPTIMIZERS["adamw" if native else name]
    same = same_or_close(exact=not native)
    model = make_model()
    opt = make_opt(model.parameters())
    handle = attach_row_freezing(opt, model, fused=native)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        masks = step_masks(step, 3, gen)
        run_backward(model, masks, gen)
        frozen = frozen_all_step(masks)
        # the plain optimizer: same weights, grads and state, no hooks
        ref_model = copy.deepcopy(model)
        for p, ref_p in zip(model.parameters(), ref_model.parameters()):
            ref_p.grad = None if p.grad is None else p.grad.clone()
        ref_opt = make_opt(ref_model.parameters())
        ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        params = dict(model.named_parameters())
        before = {n: p.detach().clone() for n, p in params.items()}
        state_before = {n: {k: v.clone() for k, v in opt.state.get(p, {}).items()} for n, p in params.items()}
        if step % 2 == 1:
            assert model[4].weight.grad is None and model[4].bias.grad is None
        opt.step()
        ref_opt.step()
        assert (handle.fused_tensors > 0) == native
        ref_params = dict(ref_model.named_parameters())
        layer_of = dict(tracked(model))
        for n, p in params.items():
            ref_p = ref_params[n]
            rows = frozen[layer_of[n]] if n in layer_of else torch.zeros(p.shape[0], dtype=torch.bool)
            assert same(p[~rows], ref_p[~rows]), (step, n)
            assert torch.equal(p[rows], before[n][rows]), (step, n)
            state, ref_state = opt.state.get(p, {}), ref_opt.state.get(ref_p, {})
            assert state.keys() == ref_state.keys(), (step, n)
            for key, value in state.items():
                if value.shape != p.shape:  # per-tensor scalars (Adam's step) advance as in plain torch
                    assert torch.equal(value, ref_state[key]), (step, n, key)
                    continue
                assert same(value[~rows], ref_state[key][~rows]), (step, n, key)
                if key in state_before[n]:
                    assert torch.equal(value[rows], state_before[n][key][rows]), (step, n, key)
                else:  # created this step from a zero gradient row
                    assert (value[rows] == 0).all(), (step, n, key)
            if p.grad is None:
                assert not state_before[n] or all(
                    torch.equal(v, state_before[n][k]) for k, v in state.items()
                ), "torch skips grad=None"
        assert all(model.get_submodule(k).row_usage.calls == 0 for k in ROWS), "usage resets after the step"
        opt.zero_grad(set_to_none=True)
    # row 0 of every layer was frozen in every step: never moved
    assert handle.layers == [model[0], model[2], model[4]]


def test_frozen_rows_would_move_without_the_hooks():
    """The comparison above can fail: plain torch applies weight decay and momentum to zero-grad rows."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    handle = attach_row_freezing(opt, model)
    gen = torch.Generator().manual_seed(2)
    run_backward(model, step_masks(0, 2, gen), gen)
    opt.step()
    opt.zero_grad()
    handle.remove()
    before = model[0].weight[0].detach().clone()
    run_backward(model, step_masks(0, 2, gen), gen)
    opt.step()
    assert not torch.equal(model[0].weight[0], before)


def reference_rescaled(model, xs, masks, rescale):
    """Per-microbatch plain autograd grads of a plain nn.Linear copy, summed over active microbatches."""
    plain = nn.Sequential(*[copy.deepcopy(m) for m in model])
    for i, m in enumerate(model):
        if isinstance(m, FreezableLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.load_state_dict(m.state_dict())
            plain[i] = lin
    params = dict(plain.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    counts = {name: torch.zeros(rows) for name, rows in ROWS.items()}
    for x, per in zip(xs, masks):
        grads = torch.autograd.grad((plain(x) ** 2).sum(), list(params.values()))
        for (n, _), g in zip(params.items(), grads):
            layer = n.split(".")[0]
            if layer in ROWS:
                g = g * per[layer].to(g.dtype).view(-1, *([1] * (g.dim() - 1)))
            total[n] += g
        for name in ROWS:
            counts[name] += per[name]
    if rescale:
        for n in total:
            layer = n.split(".")[0]
            if layer in ROWS:
                scale = len(xs) / counts[layer].clamp(min=1)
                total[n] *= scale.view(-1, *([1] * (total[n].dim() - 1)))
    return total


@pytest.mark.parametrize("rescale", [False, True])
def test_partially_frozen_rows_sum_or_rescale(rescale):
    model = make_model(seed=3)
    gen = torch.Generator().manual_seed(4)
    masks = step_masks(0, 4, gen)
    xs = [torch.randn(3, 4, generator=gen) for _ in masks]
    expected = reference_rescaled(model, xs, masks, rescale)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    handle = attach_row_freezing(opt, model, rescale=rescale)
    for x, per in zip(xs, masks):
        with use_row_masks({model.get_submodule(k): v for k, v in per.items()}):
            (model(x) ** 2).sum().backward()
    handle.rescale_grads()  # e.g. before clipping; the step must not rescale again
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], atol=1e-5, rtol=1e-5, msg=n)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n] - 0.5 * expected[n], atol=1e-5, rtol=1e-5, msg=n)


def test_state_layout_not_row_aligned_is_rejected():
    model = make_model()
    opt = torch.optim.Adafactor(model.parameters(), lr=0.01)
    attach_row_freezing(opt, model)
    gen = torch.Generator().manual_seed(6)
    before = model[0].weight[0].detach().clone()
    with pytest.raises(TypeError, match="row_var"):
        run_backward(model, step_masks(0, 2, gen), gen)
        opt.step()
    assert torch.equal(model[0].weight[0], before)  # weights of frozen rows were restored first


def test_layers_without_backward_are_left_to_torch_and_reset():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.5)
    handle = attach_row_freezing(opt, model)
    for p in model.parameters():  # grads set by hand: no backward went through the layers
        p.grad = torch.zeros_like(p)
    before = model[0].weight.detach().clone()
    opt.step()
    torch.testing.assert_close(model[0].weight, before * (1 - 0.1 * 0.5))
    gen = torch.Generator().manual_seed(7)
    run_backward(model, step_masks(0, 1, gen), gen)
    assert model[0].row_usage.calls == 1
    handle.reset()
    assert model[0].row_usage.calls == 0 and model[0].row_usage.counts is None
    assert "RowFreezing(SGD" in repr(handle)


def test_bad_arguments_raise():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="optimizer"):
        attach_row_freezing(object(), model)
    with pytest.raises(TypeError, match="model"):
        attach_row_freezing(opt, object())
    for name, bad in (("rescale", 1), ("rescale", None)):
        with pytest.raises(ValueError, match=f"{name} must be a bool, got {bad!r}"):
            attach_row_freezing(opt, model, **{name: bad})
    for bad in ("yes", float("nan"), 5, True):
        message = f"step_scale must be a finite number in \\[-4, 4\\], got {bad!r}"
        with pytest.raises(ValueError, match=message):
            attach_row_freezing(opt, model, step_scale=bad)
    hooks = attach_row_freezing(opt, model, rescale=np.bool_(True), step_scale=np.float32(0.5))
    assert (hooks.rescale, hooks.step_scale) == (True, 0.5) and type(hooks.rescale) is bool
    hooks.remove()


@pytest.mark.parametrize("step_scale", [-1.0, 0.5])
def test_step_scale_moves_partly_frozen_rows_by_their_data_share(step_scale):
    """Against plain AdamW on the same gradients: a row active in k of the 4 microbatches ends at
    before + (4/k) ** step_scale (plain after - before), with the plain step's moments; rows frozen all
    step keep weight and state; rows active throughout match plain torch."""
    model = make_model(seed=5).double()
    gen = torch.Generator().manual_seed(6)
    masks = step_masks(0, 4, gen)
    for per in masks:
        x = torch.randn(3, 4, generator=gen, dtype=torch.float64)
        with use_row_masks({model.get_submodule(k): v for k, v in per.items()}):
            (model(x) ** 2).sum().backward()
    plain = copy.deepcopy(model)
    for p, q in zip(model.parameters(), plain.parameters()):
        q.grad = p.grad.clone()
    make = OPTIMIZERS["adamw"]
    plain_opt = make(plain.parameters())
    plain_opt.step()
    opt = make(model.parameters())
    handle = attach_row_freezing(opt, model, step_scale=step_scale)
    assert f"step_scale={step_scale:g}" in repr(handle)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    after_plain = dict(plain.named_parameters())
    for name, layer in tracked(model):
        active = torch.stack([per[layer] for per in masks]).sum(0).double()  # microbatches per row
        factor = torch.where(active > 0, (len(masks) / active.clamp(min=1)) ** step_scale, 0.0)
        factor = factor.view(-1, *([1] * (before[name].dim() - 1)))
        expected = before[name] + factor * (after_plain[name].detach() - before[name])
        torch.testing.assert_close(dict(model.named_parameters())[name], expected, msg=name)
        p, q = dict(model.named_parameters())[name], after_plain[name]
        moved = active > 0
        torch.testing.assert_close(opt.state[p]["exp_avg"][moved], plain_opt.state[q]["exp_avg"][moved])
        assert torch.count_nonzero(opt.state[p]["exp_avg"][~moved]) == 0  # fresh state: frozen rows 0
    assert any(
        ((0 < c) & (c < 4)).any() for c in (torch.stack([per[k] for per in masks]).sum(0) for k in ROWS)
    )


@pytest.mark.parametrize("fused", [False, True])
def test_optimizers_of_disjoint_layers_each_step_their_own(fused):
    """Two AdamWs over disjoint layers, each attached with the whole model, step as one AdamW over
    all parameters does (AdamW is per parameter): the first step resets only its own layers' usage,
    so the second still keeps its frozen rows."""
    if fused and not tfz.optim.NATIVE:
        pytest.skip("tfz._row_adamw is not built")
    model, ref = make_model(), make_model()
    head = set(model[4].parameters())
    opt_body = torch.optim.AdamW([p for p in model.parameters() if p not in head], lr=0.01, weight_decay=0.1)
    opt_head = torch.optim.AdamW(list(head), lr=0.01, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.1)
    for opt, m in ((opt_body, model), (opt_head, model), (ref_opt, ref)):
        attach_row_freezing(opt, m, fused=fused)
    for step in range(3):
        masks = step_masks(0, 3, torch.Generator().manual_seed(step))
        for m in (model, ref):
            run_backward(m, masks, torch.Generator().manual_seed(10 + step))
        before = model[4].weight.detach().clone()
        opt_body.step()
        assert model[4].row_usage.calls == 3, "the head's usage is left for its own optimizer"
        opt_head.step()
        ref_opt.step()
        frozen = frozen_all_step(masks)["4"]
        assert torch.equal(model[4].weight[frozen], before[frozen])
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), (step, n)
        for opt in (opt_body, opt_head, ref_opt):
            opt.zero_grad(set_to_none=True)


def test_a_layer_split_between_optimizers_is_refused():
    model = make_model()
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if n != "4.bias"], lr=0.01)
    with pytest.raises(ValueError, match="FreezableLinear '4' has 1 of its 2 trainable parameters"):
        attach_row_freezing(opt, model)
    model[4].weight.requires_grad_(False)  # bias-only training of a layer is not a split
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    assert attach_row_freezing(opt, model).layers == [model[0], model[2], model[4]]
