"""FreezableLinear against plain nn.Linear autograd: masked grads, B/W split, model conversion."""

import copy
import threading

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import tfz.nn as tnn
from tfz.nn import FreezableLinear, WeightGradStore, convert_to_freezable, use_row_masks


class MLP(nn.Module):
    """Three Linears (bias / no bias), nested, with a LayerNorm whose grads are never masked."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.inp = nn.Linear(5, 7, dtype=dtype)
        self.block = nn.Sequential(
            nn.Tanh(), nn.Linear(7, 6, bias=False, dtype=dtype), nn.LayerNorm(6, dtype=dtype), nn.Tanh()
        )
        self.out = nn.Linear(6, 3, dtype=dtype)

    def forward(self, x):
        return self.out(self.block(self.inp(x)))


LAYERS = ("inp", "block.1", "out")
ROWS = {"inp": 7, "block.1": 6, "out": 3}


def make_pair(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    ref = MLP(dtype)
    model = convert_to_freezable(copy.deepcopy(ref))
    return ref, model


def make_batches(n, lead=(2, 3), dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(*lead, 5, generator=g, dtype=dtype) for _ in range(n)]
    ts = [torch.randn(*lead, 3, generator=g, dtype=dtype) for _ in range(n)]
    return xs, ts


def loss_fn(y, t):
    return (y * t).sum() + 0.5 * (y**2).sum()


def random_masks(n_mb, seed=2, p_frozen=0.5):
    """Per microbatch {layer name: bool [rows] or None}, with all-active, all-frozen and single rows."""
    g = torch.Generator().manual_seed(seed)
    masks = []
    for m in range(n_mb):
        per = {}
        for i, name in enumerate(LAYERS):
            kind = (m + i) % 4
            if kind == 0:
                per[name] = None
            elif kind == 1:
                per[name] = torch.zeros(ROWS[name], dtype=torch.bool)
            elif kind == 2:
                one = torch.zeros(ROWS[name], dtype=torch.bool)
                one[(m * 3 + i) % ROWS[name]] = True
                per[name] = one
            else:
                per[name] = torch.rand(ROWS[name], generator=g) > p_frozen
        masks.append(per)
    return masks


def by_layer(model, named):
    return {model.get_submodule(name): mask for name, mask in named.items()}


def reference_grads(ref, xs, ts, masks):
    """Sum over microbatches of plain-autograd grads, each Linear row kept only where it is active."""
    names, params = zip(*ref.named_parameters())
    total = {name: None for name in names}
    for x, t, per in zip(xs, ts, masks):
        grads = torch.autograd.grad(loss_fn(ref(x), t), params)
        for name, g in zip(names, grads):
            layer = name.rsplit(".", 1)[0]
            mask = per.get(layer) if layer in LAYERS else None
            if mask is not None:
                if not mask.any():
                    continue
                g = g * mask.to(g.dtype).view(-1, *([1] * (g.dim() - 1)))
            total[name] = g if total[name] is None else total[name] + g
    return total


def input_grads(ref, xs, ts):
    out = []
    for x, t in zip(xs, ts):
        x = x.clone().requires_grad_()
        loss_fn(ref(x), t).backward()
        out.append(x.grad)
    ref.zero_grad(set_to_none=True)
    return out


def assert_grads(model, expected, atol=1e-12, rtol=1e-12):
    for name, p in model.named_parameters():
        if expected[name] is None:
            assert p.grad is None, f"{name} should have no grad"
        else:
            assert p.grad is not None, f"{name} has no grad"
            torch.testing.assert_close(p.grad, expected[name], atol=atol, rtol=rtol, msg=name)


def run_immediate(model, xs, ts, masks):
    dxs = []
    for x, t, per in zip(xs, ts, masks):
        x = x.clone().requires_grad_()
        with use_row_masks(by_layer(model, per)):
            loss_fn(model(x), t).backward()
        dxs.append(x.grad)
    return dxs


def test_no_context_equals_nn_linear():
    ref, model = make_pair()
    xs, ts = make_batches(3)
    expected = reference_grads(ref, xs, ts, [{}] * 3)
    dx_ref = input_grads(ref, xs, ts)
    dxs = run_immediate(model, xs, ts, [{}] * 3)
    assert_grads(model, expected, atol=0, rtol=0)
    for a, b in zip(dxs, dx_ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("lead", [(), (4,), (2, 3), (2, 1, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_immediate_masks_match_reference(lead, seed):
    ref, model = make_pair(seed=seed)
    xs, ts = make_batches(5, lead=lead, seed=seed + 10)
    masks = random_masks(5, seed=seed)
    expected = reference_grads(ref, xs, ts, masks)
    dx_ref = input_grads(ref, xs, ts)
    dxs = run_immediate(model, xs, ts, masks)
    assert_grads(model, expected)
    for a, b in zip(dxs, dx_ref):  # dX never depends on the masks
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_fully_frozen_layer_keeps_grad_none():
    ref, model = make_pair()
    xs, ts = make_batches(2)
    frozen = {"inp": torch.zeros(7, dtype=torch.bool), "out": torch.zeros(3, dtype=torch.bool)}
    run_immediate(model, xs, ts, [frozen, frozen])
    assert model.inp.weight.grad is None and model.inp.bias.grad is None
    assert model.out.weight.grad is None and model.out.bias.grad is None
    expected = reference_grads(ref, xs, ts, [frozen, frozen])
    assert_grads(model, expected)


def test_float32_through_kernels_close_to_float64_reference():
    ref, model = make_pair(dtype=torch.float64)
    model = model.float()
    xs, ts = make_batches(4)
    masks = random_masks(4, seed=5)
    expected = reference_grads(ref, xs, ts, masks)
    run_immediate(model, [x.float() for x in xs], [t.float() for t in ts], masks)
    for name, p in model.named_parameters():
        if expected[name] is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad.double(), expected[name], atol=1e-4, rtol=1e-4, msg=name)


def test_bf16_autocast_close_to_nn_linear_autocast():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    model = convert_to_freezable(copy.deepcopy(ref))
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = ref(x), model(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    y_ref.float().square().sum().backward()
    y.float().square().sum().backward()
    for (name, p_ref), p in zip(ref.named_parameters(), model.parameters()):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, p_ref.grad, atol=0.05, rtol=0.02, msg=name)


def test_float64_stays_float64_under_autocast_as_in_nn_linear():
    ref = nn.Linear(4, 3, dtype=torch.float64)
    layer = convert_to_freezable(copy.deepcopy(ref))
    x = torch.randn(2, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = ref(x), layer(x)
    assert y.dtype == y_ref.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_layer_without_inputs_matches_nn_linear():
    ref = nn.Linear(0, 3)
    layer = convert_to_freezable(copy.deepcopy(ref))
    for m in (ref, layer):
        m(torch.ones(2, 0)).sum().backward()
    for p_ref, p in zip(ref.parameters(), layer.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=0, rtol=0)


def test_fx_trace_calls_the_layers_and_keeps_their_masks():
    """torch.fx.symbolic_trace records each FreezableLinear as one call node taking the layer, so the
    traced module's masked gradients are the module's own (float64 autograd with rows zeroed)."""
    ref, model = make_pair()
    traced = torch.fx.symbolic_trace(model)
    assert "freezable_linear" in traced.code
    xs, ts = make_batches(2)
    masks = random_masks(2, seed=4)
    for m, (x, t) in enumerate(zip(xs, ts)):
        with use_row_masks(by_layer(model, masks[m])):
            loss_fn(traced(x), t).backward()
    assert_grads(model, reference_grads(ref, xs, ts, masks))
    assert model.get_submodule(LAYERS[0]).row_usage.calls == 2


def test_usage_counts_rows_per_microbatch():
    _, model = make_pair()
    xs, ts = make_batches(5)
    masks = random_masks(5, seed=3)
    run_immediate(model, xs, ts, masks)
    for name in LAYERS:
        usage = model.get_submodule(name).row_usage
        ones = torch.ones(ROWS[name], dtype=torch.int32)
        expected = sum(ones if per[name] is None else per[name].int() for per in masks)
        assert usage.calls == 5
        assert usage.counts is not None
        torch.testing.assert_close(usage.counts, expected)
    tnn.reset_row_usage(model)
    assert model.inp.row_usage.calls == 0 and model.inp.row_usage.counts is None
    run_immediate(model, xs[:2], ts[:2], [{}, {"out": torch.zeros(3, dtype=torch.bool)}])
    assert model.inp.row_usage.counts.tolist() == [2] * 7
    assert model.out.row_usage.calls == 2 and model.out.row_usage.counts.tolist() == [1] * 3
    assert not model.inp.row_usage.frozen_throughout and not model.out.row_usage.frozen_throughout
    tnn.reset_row_usage(model)
    assert model.out.row_usage.frozen_throughout  # no call yet
    run_immediate(model, xs[:1], ts[:1], [{"out": torch.zeros(3, dtype=torch.bool)}])
    assert model.out.row_usage.frozen_throughout and model.out.row_usage.calls == 1
    assert not model.inp.row_usage.frozen_throughout


def test_innermost_context_wins_and_unnamed_layers_are_active():
    ref, model = make_pair()
    xs, ts = make_batches(1)
    outer = {"inp": torch.zeros(7, dtype=torch.bool), "out": torch.zeros(3, dtype=torch.bool)}
    inner = {"out": torch.tensor([True, False, True])}
    with use_row_masks(by_layer(model, outer)), use_row_masks(by_layer(model, inner)):
        loss_fn(model(xs[0]), ts[0]).backward()
    assert_grads(model, reference_grads(ref, xs, ts, [{**outer, **inner}]))


def test_main_grad_accumulates_in_place():
    ref, model = make_pair(dtype=torch.float32)
    xs, ts = make_batches(3, dtype=torch.float32)
    for p in model.parameters():
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32)
    masks = random_masks(3, seed=4)
    run_immediate(model, xs, ts, masks)
    expected = reference_grads(ref, xs, ts, masks)
    for name in ("inp.weight", "inp.bias", "block.1.weight", "out.weight", "out.bias"):
        p = model.get_parameter(name)
        assert p.grad is None
        assert p.grad_added_to_main_grad
        torch.testing.assert_close(p.main_grad, expected[name], atol=1e-5, rtol=1e-5, msg=name)
    assert model.block[2].weight.grad is not None  # LayerNorm is not a FreezableLinear


def test_weight_hooks_fire_in_immediate_mode():
    _, model = make_pair()
    seen = []
    model.inp.weight.register_hook(lambda g: seen.append(g.shape))
    xs, ts = make_batches(1)
    run_immediate(model, xs, ts, [{}])
    assert seen == [torch.Size([7, 5])]


def test_backward_without_weight_in_inputs_computes_no_dw():
    _, model = make_pair()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad(model(x).sum(), [x])
    assert dx.shape == x.shape
    for layer in (model.inp, model.block[1], model.out):
        assert layer.row_usage.calls == 0
        assert layer.weight.grad is None
    model(x).sum().backward(inputs=[model.out.weight])
    assert model.out.row_usage.calls == 1 and model.inp.row_usage.calls == 0
    assert model.inp.weight.grad is None and model.out.bias.grad is None


def test_masks_are_per_thread():
    ref, model = make_pair()
    xs, ts = make_batches(1)
    frozen = {"out": torch.zeros(3, dtype=torch.bool)}
    errors = []

    def other_thread():
        try:
            loss_fn(model(xs[0]), ts[0]).backward()  # the main thread's context does not apply here
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    with use_row_masks(by_layer(model, frozen)):
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert not errors
    assert_grads(model, reference_grads(ref, xs, ts, [{}]))


def test_state_reaches_a_thread_that_receives_the_torch_tls():
    """Autograd device threads see the caller's state through torch's TLS object slots."""
    from tfz.nn import context

    if not context._HAS_TORCH_TLS:
        pytest.skip("this torch has no TLS object slots")
    _, model = make_pair()
    with use_row_masks({model.out: torch.zeros(3, dtype=torch.bool)}):
        state = context._current_state()
    seen = []

    def device_thread():
        torch._C._stash_obj_in_tls(context._TLS_KEY, state)  # what the engine's TLS guard does
        try:
            seen.append(context._resolve_mask(context._current_state(), model.out))
        finally:
            torch._C._remove_obj_from_tls(context._TLS_KEY)

    worker = threading.Thread(target=device_thread)
    worker.start()
    worker.join()
    assert seen[0].all_frozen
    assert context._current_state() is None


@pytest.mark.gpu
def test_cuda_backward_sees_masks_on_the_device_thread():
    ref, model = make_pair(dtype=torch.float32)
    xs, ts = make_batches(3, dtype=torch.float32)
    masks = random_masks(3, seed=7)
    expected = reference_grads(ref, xs, ts, masks)
    model.cuda()
    run_immediate(model, [x.cuda() for x in xs], [t.cuda() for t in ts], masks)
    for name, p in model.named_parameters():
        if expected[name] is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad.cpu(), expected[name], atol=1e-4, rtol=1e-4, msg=name)


def test_bad_masks_raise():
    _, model = make_pair()
    with pytest.raises(TypeError, match="torch.bool"):
        with use_row_masks({model.out: torch.ones(3)}):
            pass
    with pytest.raises(ValueError, match=r"\(3,\)"):
        with use_row_masks({model.out: torch.ones(4, dtype=torch.bool)}):
            pass
    with pytest.raises(TypeError, match="LayerNorm"):
        with use_row_masks({model.block[2]: None}):
            pass
    with pytest.raises(TypeError, match="mapping"):
        with use_row_masks([model.out]):
            pass


def test_meta_masks_and_bad_sizes_are_named():
    _, model = make_pair()
    meta = torch.ones(model.out.out_features, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="row mask is on the meta device"):
        tnn.prepare_row_masks({model.out: meta})
    with pytest.raises(ValueError, match="row mask is on the meta device"):
        with use_row_masks({model.out: meta}):
            pass
    with pytest.raises(ValueError, match="row mask is on the meta device"):
        tnn.RowMask(meta, model.out.out_features)
    with pytest.raises(ValueError, match="device must be .*got 'tpu'"):
        tnn.prepare_row_masks({model.out: None}, device="tpu")
    for bad in (-1, 3.0, True, None):
        with pytest.raises(ValueError, match=f"out_features must be an integer >= 0, got {bad!r}"):
            tnn.RowMask(None, bad)
        with pytest.raises(ValueError, match=f"in_features must be an integer >= 0, got {bad!r}"):
            FreezableLinear(bad, 4)
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got str"):
        model.out("x")
    with pytest.raises(TypeError, match="module must be an nn.Module, got str"):
        tnn.reset_row_usage("model")


@pytest.mark.parametrize("masked", [False, True])
def test_meta_device_layer_runs_like_nn_linear(masked):
    """A FreezableLinear built on the meta device (deferred initialisation, shape inference) runs
    forward and backward there with the shapes nn.Linear gives."""
    layer = FreezableLinear(16, 8, device="meta")
    plain = nn.Linear(16, 8, device="meta")
    for module in (layer, plain):
        x = torch.randn(4, 16, device="meta", requires_grad=True)
        mask = torch.arange(8) < 5 if masked and module is layer else None
        with use_row_masks({layer: mask}):
            y = module(x)
            y.sum().backward()
        assert y.shape == (4, 8) and y.device.type == "meta"
        assert module.weight.grad.shape == (8, 16) and module.weight.grad.device.type == "meta"
        assert x.grad.shape == (4, 16)


def test_store_takes_numpy_integers():
    _, model = make_pair()
    store = WeightGradStore()
    x = torch.randn(2, 5, dtype=torch.float64)
    with store.capture(np.int64(1), np.int32(2)):
        model(x).sum().backward()
    assert store.pending() == [(1, 2)] and all(type(v) is int for v in store.pending()[0])
    store.flush(np.int64(1), 2)
    for bad in (-1, 1.0, True, "0"):
        with pytest.raises(ValueError, match=f"stage must be an integer >= 0, got {bad!r}"):
            store.capture(bad, 0).__enter__()


# ---------------------------------------------------------------- split mode (W queue)


def run_split(model, xs, ts, masks, order, store=None, stage=0, fresh=True):
    store = store or WeightGradStore()
    dxs = []
    for m, (x, t) in enumerate(zip(xs, ts)):
        x = x.clone().requires_grad_()
        with store.capture(stage, m):
            loss_fn(model(x), t).backward()
        dxs.append(x.grad)
    for name, p in model.named_parameters():
        if fresh and name.rsplit(".", 1)[0] in LAYERS:
            assert p.grad is None, "dW must wait for the flush"
    for m in order:
        with use_row_masks(by_layer(model, masks[m])):
            store.flush(stage, m)
    return store, dxs


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]])
def test_split_equals_immediate_in_any_flush_order(order):
    ref, model = make_pair()
    _, immediate = make_pair()
    xs, ts = make_batches(4, lead=(3,))
    masks = random_masks(4, seed=11)
    run_immediate(immediate, xs, ts, masks)
    store, dxs = run_split(model, xs, ts, masks, order)
    assert store.pending() == []
    expected = reference_grads(ref, xs, ts, masks)
    assert_grads(model, expected)
    for (name, p), q in zip(model.named_parameters(), immediate.parameters()):
        if q.grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=1e-12, msg=name)
    for a, b in zip(dxs, input_grads(ref, xs, ts)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_split_masks_resolve_at_flush_not_at_capture():
    ref, model = make_pair()
    xs, ts = make_batches(1)
    store = WeightGradStore()
    frozen_at_capture = {"out": torch.zeros(3, dtype=torch.bool)}
    flush_masks = {"out": torch.tensor([False, True, True]), "inp": torch.zeros(7, dtype=torch.bool)}
    with use_row_masks(by_layer(model, frozen_at_capture)), store.capture(0, 0):
        loss_fn(model(xs[0]), ts[0]).backward()
    assert store.flush(0, 0, masks=by_layer(model, flush_masks)) == 3
    assert_grads(model, reference_grads(ref, xs, ts, [flush_masks]))


def test_split_accumulates_into_existing_grads_and_main_grad():
    ref, model = make_pair(dtype=torch.float32)
    xs, ts = make_batches(2, dtype=torch.float32)
    masks = random_masks(2, seed=8)
    model.out.weight.main_grad = torch.zeros(3, 6)
    run_immediate(model, xs[:1], ts[:1], masks[:1])  # .grad / main_grad already hold microbatch 0
    run_split(model, xs[1:], ts[1:], masks[1:], order=[0], fresh=False)
    expected = reference_grads(ref, xs, ts, masks)
    assert model.out.weight.grad is None
    torch.testing.assert_close(model.out.weight.main_grad, expected["out.weight"], atol=1e-5, rtol=1e-5)
    for name in ("inp.weight", "inp.bias", "block.1.weight", "out.bias"):
        p = model.get_parameter(name)
        if expected[name] is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, expected[name], atol=1e-5, rtol=1e-5, msg=name)


def test_backward_outside_capture_does_not_enqueue():
    ref, model = make_pair()
    xs, ts = make_batches(1)
    store = WeightGradStore()
    with store.capture(0, 0):
        pass
    loss_fn(model(xs[0]), ts[0]).backward()  # no capture active: immediate
    assert_grads(model, reference_grads(ref, xs, ts, [{}]))
    assert store.flush(0, 0) == 0


def test_input_only_backward_inside_capture_does_not_enqueue():
    _, model = make_pair()
    store = WeightGradStore()
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    with store.capture(1, 0):
        torch.autograd.grad(model(x).sum(), [x])  # e.g. pipelining's metadata inference
    assert store.flush(1, 0) == 0
    assert all(p.grad is None for p in model.parameters())


def test_store_guards_and_bookkeeping():
    _, model = make_pair()
    store = WeightGradStore()
    x = torch.randn(2, 5, dtype=torch.float64)
    for stage, mb in [(0, 1), (1, 0), (0, 0)]:
        with store.capture(stage, mb):
            model(x).sum().backward()
    assert store.pending() == [(0, 0), (0, 1), (1, 0)]
    with pytest.raises(ValueError, match=r"\(2, 0\)"):
        store.flush(2, 0)
    store.flush(0, 1)
    with pytest.raises(ValueError, match="already flushed"):
        store.flush(0, 1)
    with pytest.raises(RuntimeError, match="already active"):
        with store.capture(0, 2), store.capture(0, 3):
            pass
    with pytest.raises(ValueError, match="microbatch"):
        store.capture(0, -1).__enter__()
    assert store.clear(stage=1) == 3
    assert store.pending() == [(0, 0), (0, 2)]
    assert store.clear() == 3
    assert store.pending() == []
    with pytest.raises(ValueError, match="no captured backward"):
        store.flush(0, 0)


def test_capture_is_reusable_next_step():
    ref, model = make_pair()
    xs, ts = make_batches(2)
    store = WeightGradStore()
    for x, t in zip(xs, ts):  # two "steps" of one microbatch each, same key
        with store.capture(0, 0):
            loss_fn(model(x), t).backward()
        store.flush(0, 0)
    assert_grads(model, reference_grads(ref, xs, ts, [{}, {}]))


# ---------------------------------------------------------------- conversion


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.stack = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU()), self.shared])
        self.attn = nn.MultiheadAttention(4, 2)
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        x = self.stack[0](x)
        x = self.shared(self.stack[1](x))
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(x)


def test_convert_keeps_outputs_state_dict_and_parameters():
    torch.manual_seed(0)
    model = Tower()
    x = torch.randn(3, 4)
    y = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    assert convert_to_freezable(model) is model
    assert isinstance(model.stack[0][0], FreezableLinear) and isinstance(model.head, FreezableLinear)
    assert model.shared is model.stack[1] and isinstance(model.shared, FreezableLinear)
    assert type(model.attn.out_proj) is not FreezableLinear  # nn.Linear subclass: left alone
    assert isinstance(model.shared, nn.Linear)
    for name, p in model.named_parameters():
        assert p is params[name], name
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    torch.testing.assert_close(model(x), y, atol=0, rtol=0)
    assert "row_freezing=True" in repr(model.head)


def test_convert_with_filter_fn_and_fqns():
    model = Tower()
    seen = []

    def only_head(module, fqn):
        seen.append(fqn)
        return fqn == "head"

    convert_to_freezable(model, filter_fn=only_head)
    assert isinstance(model.head, FreezableLinear)
    assert not isinstance(model.shared, FreezableLinear)
    assert {"stack.0.0", "shared", "attn.out_proj", "head", ""} <= set(seen)
    with pytest.raises(TypeError, match="ReLU"):
        convert_to_freezable(Tower(), filter_fn=lambda m, fqn: fqn == "stack.0.1")
    with pytest.raises(TypeError, match="filter_fn"):
        convert_to_freezable(Tower(), filter_fn="head")


def test_convert_a_bare_linear_in_place_and_from_linear():
    lin = nn.Linear(3, 2).eval()
    weight = lin.weight
    assert convert_to_freezable(lin) is lin and type(lin) is FreezableLinear
    assert lin.weight is weight and not lin.training and lin.row_usage.calls == 0
    new = FreezableLinear.from_linear(nn.Linear(3, 2).eval())
    assert type(new) is FreezableLinear and not new.training
    no_bias = FreezableLinear.from_linear(nn.Linear(3, 2, bias=False))
    assert no_bias.bias is None
    hooked = nn.Linear(3, 2)
    hooked.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="hooks"):
        FreezableLinear.from_linear(hooked)
    with pytest.raises(TypeError, match="Conv1d"):
        FreezableLinear.from_linear(nn.Conv1d(1, 1, 1))


# ---------------------------------------------------------------- in-place accumulation (no dense dW)


def test_in_place_immediate_equals_reference_and_hooks_see_the_sum():
    """use_row_masks(in_place=True): masked layers add into .grad themselves; a post-accumulate-grad
    hook still runs after that add and sees the updated .grad."""
    ref, model = make_pair(dtype=torch.float32)
    xs, ts = make_batches(4, lead=(3,), dtype=torch.float32)
    masks = random_masks(4, seed=21)
    seen = {}
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda p, name=name: seen.__setitem__(name, None if p.grad is None else p.grad.clone())
        )
    for m, (x, t) in enumerate(zip(xs, ts)):
        seen.clear()
        with use_row_masks(by_layer(model, masks[m]), in_place=True):
            loss_fn(model(x), t).backward()
        for name, p in model.named_parameters():
            if p.grad is not None and name in seen:
                assert torch.equal(seen[name], p.grad), (m, name)
    assert_grads(model, reference_grads(ref, xs, ts, masks), atol=1e-5, rtol=1e-5)


def _sequential_rounded(weight_grads, dtype):
    """What an accumulation rounded to ``dtype`` after every microbatch holds (float64 sums), and a
    bound on how far one whose sums carry fp32 error can be: one ulp of every rounded partial sum."""
    acc, bound = None, 0.0
    eps = torch.finfo(dtype).eps
    for g in weight_grads:
        total = g if acc is None else acc.double() + g
        acc = total.to(dtype)
        bound = bound + eps * total.abs() + 1e-6
    return acc, bound


@pytest.mark.parametrize("mode", ["split", "in_place"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_grads_accumulate_active_rows_in_place(mode, dtype):
    """A 16-bit .grad gets each microbatch's active rows added in fp32 and rounded once; frozen rows
    keep their bits."""
    torch.manual_seed(0)
    layer = FreezableLinear(32, 256, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(24, 32, generator=g).to(dtype) for _ in range(3)]
    dys = [torch.randn(24, 256, generator=g).to(dtype) for _ in range(3)]
    masks = [(torch.rand(4, generator=g) < 0.5).repeat_interleave(64) for _ in range(3)]
    masks[0][:64] = True
    store = WeightGradStore()
    per_mb = []
    for m, (x, dy, mask) in enumerate(zip(xs, dys, masks)):
        before = None if layer.weight.grad is None else layer.weight.grad.clone()
        if mode == "split":
            with store.capture(0, m):
                layer(x).backward(dy)
            store.flush(0, m, masks={layer: mask})
        else:
            with use_row_masks({layer: mask}, in_place=True):
                layer(x).backward(dy)
        prod = dy.double().t() @ x.double()
        per_mb.append(torch.where(mask[:, None], prod, torch.zeros(())))
        if before is not None:
            frozen = ~mask
            assert torch.equal(layer.weight.grad[frozen].view(torch.int16), before[frozen].view(torch.int16))
    want, bound = _sequential_rounded(per_mb, dtype)
    got = layer.weight.grad
    assert got.dtype == dtype
    assert bool(((got.double() - want.double()).abs() <= bound).all())


class _Fp32Traffic(TorchDispatchMode):
    """Elements of the fp32 tensors that ops create (views, and ops writing into a given tensor such as
    ``index_add_`` or ``mm(out=...)``, are not counted: they create nothing)."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func._schema.is_mutable:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    self.elements += t.numel()
        return out


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("mode", ["split", "in_place", "main_grad"])
def test_no_dense_fp32_buffer_per_microbatch(mode, param_dtype):
    """With 3/4 of the rows frozen, a microbatch's dW accumulation makes fp32 data in proportion to the
    active rows (and the microbatch's inputs), never a dense [out, in] fp32 buffer."""
    n_in, n_out, tokens = 64, 1024, 16
    torch.manual_seed(0)
    layer = FreezableLinear(n_in, n_out, bias=True, dtype=param_dtype)
    if mode == "main_grad":
        layer.weight.main_grad = torch.zeros(n_out, n_in, dtype=param_dtype)
    g = torch.Generator().manual_seed(2)
    mask = torch.zeros(n_out // 64, dtype=torch.bool)
    mask[torch.randperm(n_out // 64, generator=g)[: n_out // 256]] = True
    mask = mask.repeat_interleave(64)
    n_active = int(mask.sum())
    prepared = tnn.prepare_row_masks({layer: mask})
    store = WeightGradStore()
    traffic = []
    for m in range(3):
        x = torch.randn(tokens, n_in, generator=g).to(param_dtype)
        dy = torch.randn(tokens, n_out, generator=g).to(param_dtype)
        y = layer(x)
        counter = _Fp32Traffic()
        if mode == "split":
            with store.capture(0, m):
                y.backward(dy)
            with counter:
                store.flush(0, m, masks=prepared)
        else:
            with counter, use_row_masks(prepared, in_place=True):
                y.backward(dy)
        traffic.append(counter.elements)
    budget = 2 * n_active * n_in + tokens * (n_in + n_active) + 2 * n_out
    assert n_out * n_in > budget  # a dense buffer alone would break it
    assert max(traffic[1:]) <= budget, (traffic, budget)


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("in_place", [False, True])
def test_all_active_layer_accumulates_into_its_grad_in_place(in_place, param_dtype):
    """Under use_row_masks(in_place=True) an all-active layer's first backward hands autograd its dW,
    and later ones add into that same .grad (fp32: with no fresh [out, in] tensor); the sum matches
    the float64 sum of dY^T X (16 bits: to one rounding per microbatch). Without in_place autograd
    makes a fresh dW every microbatch, which the traffic count sees."""
    n_in, n_out, tokens = 48, 320, 16
    torch.manual_seed(0)
    layer = FreezableLinear(n_in, n_out, bias=True, dtype=param_dtype)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(tokens, n_in, generator=g).to(param_dtype) for _ in range(3)]
    dys = [torch.randn(tokens, n_out, generator=g).to(param_dtype) for _ in range(3)]
    traffic = []
    for x, dy in zip(xs, dys):
        y = layer(x)
        counter = _Fp32Traffic()
        with counter, use_row_masks({}, in_place=in_place):
            y.backward(dy)
        traffic.append(counter.elements)
    dense = n_out * n_in
    if param_dtype == torch.float32:  # (a 16-bit .grad is added to in fp32: a dense fp32 product)
        if in_place:
            assert max(traffic[1:]) < dense, traffic
        else:
            assert min(traffic[1:]) >= dense, traffic  # the count sees autograd's fresh dW
    # autograd's path rounds each fresh 16-bit dW and then the sum: twice per microbatch
    roundings = 1 if in_place else 2
    for got, parts in (
        (layer.weight.grad, [dy.double().t() @ x.double() for x, dy in zip(xs, dys)]),
        (layer.bias.grad, [dy.double().sum(0) for dy in dys]),
    ):
        assert got.dtype == param_dtype
        if param_dtype == torch.float32:
            torch.testing.assert_close(got.double(), sum(parts), atol=1e-4, rtol=1e-5)
        else:
            want, bound = _sequential_rounded(parts, param_dtype)
            assert bool(((got.double() - want.double()).abs() <= roundings * bound).all())


def test_linear_flops_counts_every_linear_and_the_freezable_weight_gradients():
    """2 FLOPs per weight and token in the forward, the input gradient and the weight gradient of
    every nn.Linear; only FreezableLinears' weight gradients are freezable. Other modules count none."""
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 2))
    assert tnn.linear_flops(model) == (0, 6 * (15 + 35 + 14))
    convert_to_freezable(model, lambda module, fqn: fqn in ("0", "4"))
    assert isinstance(model[0], FreezableLinear) and not isinstance(model[2], FreezableLinear)
    assert tnn.linear_flops(model) == (2 * (15 + 14), 6 * (15 + 35 + 14))
