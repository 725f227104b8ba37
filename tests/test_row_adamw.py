"""tfz.optim's native AdamW pass (``tfz._row_adamw``) against a float64 run of torch's AdamW with the
row-freezing hooks, on the same weights, state and masks each step; and where it must not be used."""

import copy

import pytest
import torch
from test_optim import (  # tfz.optim's own model and masks: layer "4" frozen on odd steps
    ROWS,
    make_model,
    step_masks,
)

import tfz.optim
from tfz.nn import use_row_masks
from tfz.optim import attach_row_freezing

pytestmark = pytest.mark.skipif(not tfz.optim.NATIVE, reason="tfz._row_adamw is not built")

N_MB = 4
IN = 4
"""Input width of test_optim's model."""


def backward(model, masks, xs):
    """Each microbatch's forward and backward under its masks ({layer name: bool [rows]})."""
    weight = model[0].weight
    for per, x in zip(masks, xs):
        with use_row_masks({model.get_submodule(k): m.to(weight.device) for k, m in per.items()}):
            (model(x.to(weight)) ** 2).sum().backward()


def whole_layer_masks(step, n_mb, gen):
    """Per microbatch {layer: bool [rows]}, each layer active whole or frozen whole: active in
    microbatch 0, frozen in microbatch 1, at random in the others (a layer no mask cuts into rows)."""
    whole = torch.rand(n_mb, len(ROWS), generator=gen) > 0.5
    whole[0], whole[1] = True, False
    return [{name: torch.full((n,), bool(on)) for (name, n), on in zip(ROWS.items(), mb)} for mb in whole]


MASKS = {"rows": step_masks, "whole layers": whole_layer_masks}


def masked_microbatches(model, step, gen, make_masks=step_masks):
    """make_masks(step) over N_MB microbatches of fresh inputs, their backward run; (masks, inputs)."""
    masks = make_masks(step, N_MB, gen)
    xs = [torch.randn(3, IN, generator=gen, dtype=torch.float64) for _ in range(N_MB)]
    backward(model, masks, xs)
    return masks, xs


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


def use_kernel_on_cpu(monkeypatch):
    """Route CPU tensors to the Triton kernel (the interpreter), as CUDA tensors are routed."""
    from tfz.kernels import row_adamw as kernel

    from tfz.optim import row_adamw

    if not kernel.available(torch.device("cpu")):
        pytest.skip("needs triton and TRITON_INTERPRET=1 (the compiled kernel runs on a GPU)")
    monkeypatch.setattr(row_adamw, "path", lambda p: "triton" if p.dtype in kernel.DTYPES else None)


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("step_scale", [0.0, 0.5, -1.0])
@pytest.mark.parametrize("path", ["native", "triton"])
@pytest.mark.parametrize("masks", list(MASKS))
def test_row_adamw_matches_float64_hooks(rescale, step_scale, path, masks, monkeypatch):
    if path == "triton":
        use_kernel_on_cpu(monkeypatch)
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
        mask_list, xs = masked_microbatches(model, step, gen, MASKS[masks])
        backward(ref, mask_list, xs)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: p.grad for n, p in model.named_parameters()}
        opt.step()
        ref_opt.step()
        fused = 3 if masks == "rows" and step % 2 else 5  # step_masks freeze layer "4" whole on odd steps
        assert hooks.fused_tensors == fused and ref_hooks.fused_tensors == 0
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            assert p.grad is grads[n], "gradients are back after the step"
            torch.testing.assert_close(p.double(), q, rtol=1e-5, atol=1e-6, msg=f"{n} step {step}")
            for key, value in opt.state[p].items():
                expected = ref_opt.state[q][key]
                torch.testing.assert_close(
                    value.double(),
                    expected.double(),
                    rtol=1e-4,
                    atol=5e-7,  # float32 gradient sums, rescaled up to N_MB-fold
                    msg=lambda m, key=key: f"{key}: {m}",
                )
            layer = n.split(".")[0]
            if layer in ("0", "2", "4"):
                never = ~torch.stack([per[layer] for per in mask_list]).any(0)
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
    masked_microbatches(model, 0, gen)
    opt.step()  # no zero_grad: .grad stays
    state = {k: v.clone() for k, v in opt.state[model[4].weight].items()}
    before = model[4].weight.detach().clone()
    masked_microbatches(model, 1, gen)  # layer 4 frozen in every call
    opt.step()
    assert hooks.fused_tensors == 5
    assert torch.equal(model[4].weight, before)
    assert torch.equal(opt.state[model[4].weight]["exp_avg"], state["exp_avg"])
    assert opt.state[model[4].weight]["step"].item() == state["step"].item() + 1


def test_checkpoint_continues_in_plain_torch():
    """State written by the native pass is torch's AdamW state: a plain AdamW loads it and steps on as
    the native pass does when every row is active."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    hooks = attach_row_freezing(opt, model)
    gen = torch.Generator().manual_seed(3)
    _, xs = masked_microbatches(model, 0, gen)
    opt.step()
    opt.zero_grad()
    plain = copy.deepcopy(model)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=0.01, weight_decay=0.1)
    plain_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m in (model, plain):
        (m(xs[0].float()) ** 2).sum().backward()  # no masks: every row active
    opt.step()
    plain_opt.step()
    assert hooks.fused_tensors == 5
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)
        assert torch.equal(opt.state[p]["step"], plain_opt.state[q]["step"])


def _fused_count(opt, model, fused=True, **step_kwargs):
    hooks = attach_row_freezing(opt, model, fused=fused)
    masked_microbatches(model, 0, torch.Generator().manual_seed(4))
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


def _reference(p, g, m, v, t, counts, calls, rescale, step_scale, lr, b1, b2, eps, wd):
    """float64 AdamW with the row semantics of tfz.optim (module docstring), written out."""
    p, g, m, v = (x.double().clone() for x in (p, g, m, v))
    rows = p.shape[0]
    c = torch.full((rows,), calls, dtype=torch.float64) if counts is None else counts.double()
    share = calls / c.clamp(min=1)
    shape = (-1,) + (1,) * (p.dim() - 1)
    g = g * (share if rescale else torch.ones_like(share)).view(shape)
    f = torch.where((c > 0) & (c < calls), share**step_scale, torch.ones_like(share)).view(shape)
    m2 = m + (1 - b1) * (g - m)
    v2 = b2 * v + (1 - b2) * g * g
    denom = v2.sqrt() / (1 - b2**t) ** 0.5 + eps
    p2 = p * (1 - lr * wd * f) - lr * f / (1 - b1**t) * m2 / denom
    keep = (c == 0).view(shape)
    return torch.where(keep, p, p2), torch.where(keep, m, m2), torch.where(keep, v, v2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 40), (3, 1100), (5,)])
@pytest.mark.parametrize(
    "rescale,step_scale,on_device,lr_on_device",
    [(False, 0.0, True, True), (True, 0.5, False, False), (True, -1.0, True, False)],
)
def test_triton_row_adamw_matches_float64(dtype, shape, rescale, step_scale, on_device, lr_on_device):
    from tfz.kernels import row_adamw as kernel

    if not kernel.available(torch.device("cpu")):
        pytest.skip("needs triton and TRITON_INTERPRET=1 (the compiled kernel runs on a GPU)")
    gen = torch.Generator().manual_seed(7)
    p, g = (torch.randn(shape, generator=gen) for _ in range(2))
    m = torch.randn(shape, generator=gen) * 0.1
    v = torch.rand(shape, generator=gen) * 0.01
    counts = torch.tensor([0, 4, 1, 3, 2, 4][: shape[0]], dtype=torch.int32)
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    t = 3.0
    tensors = [x.to(dtype) for x in (p, g, m, v)]
    expected = _reference(*tensors, t, counts, 4, rescale, step_scale, *hyper.values())
    before = tensors[0].clone()
    step = torch.tensor(t) if on_device else t
    if lr_on_device:
        hyper = dict(hyper, lr=torch.tensor(hyper["lr"]))
    kernel.row_adamw(*tensors, step, counts=counts, calls=4, rescale=rescale, step_scale=step_scale, **hyper)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    ref = [x.to(dtype).double() for x in expected]  # the reference rounded as the kernel stores
    for name, got, want in zip(("param", "exp_avg", "exp_avg_sq"), (tensors[0], tensors[2], tensors[3]), ref):
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda s, n=name: f"{n}: {s}")
    assert torch.equal(tensors[0][0], before[0]), "row 0 (active in no call) untouched"


@pytest.mark.parametrize("fused,lr", [(True, 0.01), (True, "tensor"), (False, 0.01)])
def test_device_path_reads_nothing_back_from_the_device(fused, lr, monkeypatch):
    """On the Triton path the hooks launch one kernel per tensor and read no device value, a tensor
    learning rate included (counted on CPU tensors, as test_wgrad_sync does; the launch itself is
    recorded, not run: it is asynchronous on a GPU). The hooks around torch's step read the masks back
    (the control)."""
    from test_wgrad_sync import SyncCounter

    from tfz.optim import row_adamw

    launched = []
    monkeypatch.setattr(row_adamw, "path", lambda p: "triton")
    monkeypatch.setattr(row_adamw._kernel, "row_adamw", lambda *args, **kw: launched.append(kw["counts"]))
    model = make_model()
    lr = torch.tensor(0.01) if lr == "tensor" else lr
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    hooks = attach_row_freezing(opt, model, rescale=True, step_scale=0.5, fused=fused)
    masked_microbatches(model, 0, torch.Generator().manual_seed(8))
    with SyncCounter() as counter:
        opt.step()
    if fused:
        assert counter.seen == [] and hooks.fused_tensors == 5 and len(launched) == 5
        assert all(c is not None and c.dtype == torch.int32 for c in launched)
    else:
        assert counter.seen and not launched


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_on_gpu_matches_float64_and_never_syncs(dtype):
    """The compiled kernel against the float64 formulas; then RowFreezing on a CUDA model steps every
    FreezableLinear through it with torch's sync debug mode set to error, with a float and with a
    tensor learning rate on the device."""
    from tfz.kernels import row_adamw as kernel

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(9)
    shape = (96, 1500)  # two column blocks, the second partial
    p, g = (torch.randn(shape, generator=gen) for _ in range(2))
    m, v = torch.randn(shape, generator=gen) * 0.1, torch.rand(shape, generator=gen) * 0.01
    counts = torch.randint(0, 5, (shape[0],), generator=gen, dtype=torch.int32)
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    expected = _reference(*(x.to(dtype) for x in (p, g, m, v)), 5.0, counts, 4, True, 0.5, *hyper.values())
    for step in (torch.tensor(5.0, device=dev), 5.0):
        t = [x.to(dev, dtype) for x in (p, g, m, v)]
        kernel.row_adamw(*t, step, counts=counts.to(dev), calls=4, rescale=True, step_scale=0.5, **hyper)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        for got, want in zip((t[0], t[2], t[3]), expected):
            torch.testing.assert_close(got.double().cpu(), want.to(dtype).double(), **tol)
    for lr in (0.01, torch.tensor(0.01, device=dev)):
        model = make_model().to(dev, dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
        hooks = attach_row_freezing(opt, model, rescale=True, step_scale=0.5)
        masked_microbatches(model, 0, torch.Generator().manual_seed(10))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert hooks.fused_tensors == 5


def test_rescaled_before_the_step_is_not_rescaled_again():
    """rescale_grads() before the step (e.g. for clipping): the one-pass step does not rescale again."""
    results = []
    for early in (False, True):
        model = make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        hooks = attach_row_freezing(opt, model, rescale=True, step_scale=0.5)
        masked_microbatches(model, 0, torch.Generator().manual_seed(11))
        if early:
            hooks.rescale_grads()
        opt.step()
        assert hooks.fused_tensors == 5
        # the moments, not only the weights: Adam's step hardly moves when a gradient is scaled twice
        results.append([t.clone() for p in model.parameters() for t in (p.detach(), opt.state[p]["exp_avg"])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
