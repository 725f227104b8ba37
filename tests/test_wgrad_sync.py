"""No host synchronisation inside a masked dW, and no index build beyond the masks drawn.

On a GPU a host synchronisation is any read of a device tensor's value on the host: a copy to the
CPU (``.cpu()``, ``.to("cpu")``, ``.tolist()``, ``.numpy()``), a scalar read (``.item()``, ``int()``,
``bool()``), or an op whose output size depends on the data (``nonzero``, ``masked_select``,
``unique``...). This machine has no GPU, so :class:`SyncCounter` counts those operations on CPU
tensors: the host-read entry points are patched and the data-dependent ops are seen by a
``TorchDispatchMode``. The first test shows that it sees every one of them.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tfz.kernels import ActiveRows, has_triton, wgrad
from torch.utils._python_dispatch import TorchDispatchMode

import tfz.masks
from tfz.nn import FreezableLinear, WeightGradStore, use_row_masks
from tfz.pipeline.engine import PlanCache, StageParams, full_backward, input_backward, weight_backward

aten = torch.ops.aten
_DATA_DEPENDENT = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,
    aten.bincount.default,
}
_HOST_READS = ("tolist", "numpy", "cpu", "item", "__bool__", "__int__", "__float__", "__index__")


class SyncCounter(TorchDispatchMode):
    """Counts, by name, the operations that would make the host wait for a device (see above)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self._saved = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _DATA_DEPENDENT:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))

    def _wrap(self, name):
        original = self._saved[name]

        def counted(tensor, *args, **kwargs):
            self.seen.append(f"Tensor.{name}")
            return original(tensor, *args, **kwargs)

        return counted

    def _wrap_to(self):
        original = self._saved["to"]

        def to(tensor, *args, **kwargs):
            target = kwargs.get("device", args[0] if args else None)
            if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
                self.seen.append("Tensor.to(cpu)")
            return original(tensor, *args, **kwargs)

        return to

    def __enter__(self):
        for name in (*_HOST_READS, "to"):
            self._saved[name] = getattr(torch.Tensor, name)
        for name in _HOST_READS:
            setattr(torch.Tensor, name, self._wrap(name))
        torch.Tensor.to = self._wrap_to()
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


@pytest.mark.parametrize(
    "op",
    [
        lambda m: m.cpu(),
        lambda m: m.to("cpu"),
        lambda m: m.tolist(),
        lambda m: m.numpy(),
        lambda m: int(m.sum()),
        lambda m: bool(m[0]),
        lambda m: m.nonzero(),
        lambda m: torch.masked_select(m, m),
        lambda m: m.sum().item(),
        lambda m: ActiveRows(m),  # preparing a mask from a tensor reads it once
    ],
)
def test_counter_sees_every_kind_of_host_read(op):
    mask = torch.tensor([True, False, True])
    with SyncCounter() as counter:
        op(mask)
    assert counter.seen, "a host read went unseen"


def _stage(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        FreezableLinear(48, 192),
        torch.nn.GELU(),
        FreezableLinear(192, 320),
        torch.nn.GELU(),
        FreezableLinear(320, 40),
    )


def _draw(units, ratios, decision):
    return tfz.masks.select_covering(units, ratios, stage=0, step=decision, seed=1)


def _partial_layer_masks(masks) -> int:
    """Distinct layer masks with some row frozen and some active (what needs row-block lists)."""
    return sum(
        int(0 < rows.sum() < rows.size) for m in masks if m is not None for rows in m.active_rows.values()
    )


@pytest.mark.parametrize("kind", ["B", "I+W"])
def test_no_host_read_in_backward_and_builds_bounded_by_masks_drawn(kind):
    """Six steps of four microbatches, masks drawn at decision steps 0 and 3: per step, the index
    builds are at most the layer masks drawn for it (0 on other steps), and no backward, input
    backward or W flush reads a tensor on the host."""
    model = _stage()
    units = tfz.masks.StageUnits.from_module(model, block_rows=64)
    params, cache, store = StageParams(model), PlanCache(), WeightGradStore()
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(16, 48, generator=g) for _ in range(4)]
    drawn = None
    for step in range(6):
        fresh = 0
        if step in (0, 3):
            drawn = _draw(units, [0.3, 0.5, 0.7, 0.9], decision=step)
            fresh = _partial_layer_masks(drawn)
            assert fresh > 0
        before = ActiveRows.builds
        with SyncCounter() as counter:
            for mb, x in enumerate(inputs):
                plan = cache.get(drawn[mb], params)
                out = model(x)
                if kind == "B":
                    full_backward(out.square().mean(), None, [], plan, params)
                else:
                    xin = x.clone().requires_grad_()
                    out = model(xin)
                    input_backward((out.square().mean(),), None, [xin], plan, params, store, (0, mb))
                    weight_backward(plan, store, (0, mb))
        assert counter.seen == [], counter.seen
        assert ActiveRows.builds - before <= fresh, (step, ActiveRows.builds - before, fresh)
        if step in (1, 2, 4, 5):
            assert ActiveRows.builds == before
        model.zero_grad()


def test_triton_launcher_reads_nothing_on_the_host(monkeypatch):
    """The Triton path's host side (config choice, grid, launch arguments) with the kernels stubbed."""
    if not has_triton():
        pytest.skip("needs triton")
    from tfz.kernels import _wgrad_triton as mod

    launched = []

    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append(grid)

    monkeypatch.setattr(mod, "wgrad_kernel", Stub())
    monkeypatch.setattr(mod, "bias_kernel", Stub())
    monkeypatch.setattr(mod, "pinned_config", None)
    monkeypatch.setattr(mod, "INTERPRET", True)
    mask = np.ones(1024, dtype=bool)
    mask[64:256] = False
    rows = ActiveRows(mask)
    x, dy, out, db = torch.randn(512, 256), torch.randn(512, 1024), torch.zeros(1024, 256), torch.zeros(1024)
    with SyncCounter() as counter:
        for dtype in (torch.float32, torch.bfloat16):
            wgrad(x.to(dtype), dy.to(dtype), active_rows=rows, out=out, bias_grad=db, backend="triton")
    mod.clear_picks()
    assert counter.seen == [] and len(launched) == 4


def test_raw_tensor_masks_are_read_once_per_call_and_prepared_ones_never():
    """The documented cost of an unprepared mask: one host read per call; a prepared mask none."""
    x, dy = torch.randn(8, 16), torch.randn(8, 200)
    mask = torch.rand(200, generator=torch.Generator().manual_seed(0)) < 0.5
    rows = ActiveRows(mask)
    with SyncCounter() as raw:
        wgrad(x, dy, active_rows=mask, backend="torch")
    with SyncCounter() as prepared, use_row_masks({}):
        wgrad(x, dy, active_rows=rows, backend="torch")
    assert raw.seen and not prepared.seen


def test_plans_prepared_at_the_decision_are_reused():
    """PlanCache.prepare builds the plans of freshly drawn masks at once; the backwards build nothing."""
    model = _stage(1)
    units = tfz.masks.StageUnits.from_module(model, block_rows=64)
    params, cache = StageParams(model), PlanCache()
    drawn = _draw(units, [0.5, 0.5, 0.8, 0.2], decision=0)
    before = ActiveRows.builds
    cache.prepare(drawn, params)
    assert ActiveRows.builds - before == _partial_layer_masks(drawn)
    before = ActiveRows.builds
    for mb, x in enumerate(torch.randn(4, 8, 48).unbind()):
        full_backward(model(x).sum(), None, [], cache.get(drawn[mb], params), params)
    assert ActiveRows.builds == before


def test_a_step_prepares_its_masks_when_it_starts():
    """A freeze-aware stage whose provider says how many microbatches a step has (TimelyFreeze) builds
    every plan of the step when the step starts; its backwards then build nothing."""
    from tfz.pipeline.stage import FreezeState

    model = _stage(2)
    units = tfz.masks.StageUnits.from_module(model, block_rows=64)
    drawn = _draw(units, [0.5, 0.5, 0.8, 0.2], decision=0)

    class Provider:
        num_microbatches = len(drawn)

        def masks_for(self, stage, microbatch):
            return drawn[microbatch]

    state = FreezeState(SimpleNamespace(stage_index=0, submod=model), Provider(), count_flops=False)
    before = ActiveRows.builds
    state.new_step()
    assert ActiveRows.builds - before == _partial_layer_masks(drawn)
    before = ActiveRows.builds
    params = state.params()
    for mb, x in enumerate(torch.randn(4, 8, 48).unbind()):
        full_backward(model(x).sum(), None, [], state._plan(mb, params), params)
    assert ActiveRows.builds == before
