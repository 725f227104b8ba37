"""Each private torch API tfz uses (tfz/_torch_compat.py) still exists and behaves as tfz relies on.

A failure names the API and the installed torch version: that torch changed it, and the matching
function of tfz/_torch_compat.py (and the pyproject cap) needs a look. One test also checks that no
other tfz module reaches a private torch name itself.
"""

from __future__ import annotations

import inspect
import io
import re
import tokenize
from pathlib import Path

import pytest
import torch

from tfz import _torch_compat as compat

ROOT = Path(__file__).resolve().parents[1]


def expect(ok: bool, api: str, detail: str) -> None:
    if not ok:
        pytest.fail(f"torch {torch.__version__} changed {api}: {detail}", pytrace=False)


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


PRIVATE_NAME = re.compile(
    r"torch\._C\._|pipelining\._|pipelining import _|_PipelineSchedule|_PipelineStageBase|"
    r"\._load_csv\b|\._step_microbatches\b|_forward_initialized\b"
)


def code_without_strings(path: Path) -> str:
    """Source of ``path`` with strings and comments removed (docstrings may name private APIs)."""
    kept = []
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    for tok in tokens:
        if tok.type not in (tokenize.STRING, tokenize.COMMENT):
            kept.append(tok.string)
    return " ".join(kept).replace(" . ", ".").replace(" .", ".").replace(". ", ".")


def test_private_torch_names_only_in_the_compat_module():
    offenders = []
    for folder in ("tfz", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "_torch_compat.py":
                continue
            for hit in PRIVATE_NAME.findall(code_without_strings(path)):
                offenders.append(f"{path.relative_to(ROOT)}: {hit}")
    assert not offenders, "private torch names outside tfz/_torch_compat.py:\n" + "\n".join(offenders)


def test_the_scan_sees_code_not_strings(tmp_path):
    """Guard of the test above."""
    sample = tmp_path / "sample.py"
    sample.write_text('"""torch._C._doc"""\nx = torch._C._will_engine_execute_node(n)  # torch._C._c\n')
    assert PRIVATE_NAME.findall(code_without_strings(sample)) == ["torch._C._"]
    sample.write_text("runtime._load_csv(path)\nsched._step_microbatches()\n")
    assert PRIVATE_NAME.findall(code_without_strings(sample)) == ["._load_csv", "._step_microbatches"]


OVERRIDDEN = {
    "forward_one_chunk": ["fwd_chunk_id", "args", "kwargs", "save_forward_output"],
    "backward_one_chunk": ["bwd_chunk_id", "loss", "full_backward", "last_backward"],
    "backward_weight_one_chunk": ["bwd_chunk_id", "last_backward"],
    "backward_maybe_with_nosync": ["backward_type", "bwd_kwargs", "last_backward"],
    "clear_runtime_states": [],
}
"""Stage methods tfz.pipeline.stage overrides, with the parameters it passes on."""


def test_stage_base_class_and_the_methods_tfz_overrides():
    from torch.distributed.pipelining import PipelineStage

    base = compat.stage_base_class()
    api = "torch.distributed.pipelining.stage._PipelineStageBase"
    expect(issubclass(PipelineStage, base), api, "PipelineStage no longer derives from it")
    for name, expected in OVERRIDDEN.items():
        method = getattr(base, name, None)
        expect(callable(method), f"{api}.{name}", "the method is gone")
        expect(params(method)[: len(expected)] == expected, f"{api}.{name}", f"parameters {params(method)}")
    source = inspect.getsource(base)
    for attribute in ("submod", "stage_index", "fwd_cache", "has_backward", "dw_builder", "group_rank"):
        found = f"self.{attribute}" in source or hasattr(base, attribute)
        expect(found, f"{api}.{attribute}", "tfz reads this attribute, torch no longer sets it")


def test_stage_backward_functions_are_looked_up_at_call_time():
    from torch.distributed.pipelining import stage

    for name, leading in compat.STAGE_BACKWARD_FUNCTIONS.items():
        api = f"torch.distributed.pipelining.stage.{name}"
        fn = compat.stage_backward(name)
        original = getattr(fn, "_tfz_original", fn)  # tfz's wrapper, once a freeze-aware stage exists
        expect(params(original)[: len(leading)] == list(leading), api, f"parameters {params(original)}")
    dispatcher = inspect.getsource(compat.stage_base_class().backward_maybe_with_nosync)
    for name in compat.STAGE_BACKWARD_FUNCTIONS:
        expect(
            re.search(rf"\b{name}\(", dispatcher) is not None,
            "_PipelineStageBase.backward_maybe_with_nosync",
            f"no longer calls the module-level {name} (tfz's wrapper would not run)",
        )
    before = stage.stage_backward
    sentinel = object()
    try:
        compat.set_stage_backward("stage_backward", sentinel)
        assert stage.stage_backward is sentinel
    finally:
        compat.set_stage_backward("stage_backward", before)
    with pytest.raises(ValueError, match="not a stage backward"):
        compat.stage_backward("stage_forward")


def test_split_backward_functions_match_autograd():
    backward_input, backward_weight = compat.split_backward_functions()
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(3, 4).double(), torch.nn.Linear(4, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, 2, dtype=torch.float64)
    ref = torch.autograd.grad(lin2(torch.tanh(lin1(x))), [x, *lin1.parameters(), *lin2.parameters()], grad)
    out = lin2(torch.tanh(lin1(x)))
    weights = [*lin1.parameters(), *lin2.parameters()]
    api = "torch.distributed.pipelining._backward.stage_backward_{input,weight}"
    dinputs, groups = backward_input([out], [grad], [x], iter(weights))
    expect(torch.allclose(dinputs[0], ref[0]), api, "the input gradient differs from autograd's")
    expect(all(w.grad is None for w in weights), api, "the input pass wrote weight gradients")
    backward_weight(iter(weights), groups)
    for w, r in zip(weights, ref[1:]):
        ok = w.grad is not None and torch.allclose(w.grad, r)
        expect(ok, api, "weight gradients differ from autograd's")


def test_schedule_classes_csv_loading_and_the_step_loop(tmp_path):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleZBVZeroBubble

    from tfz.schedule import build_schedule
    from tfz.schedule.torch_io import from_torch, instantiate_torch, replay_on_torch

    base = compat.schedule_base_class()
    for cls in (Schedule1F1B, ScheduleZBVZeroBubble, compat.runtime_schedule_class()):
        expect(issubclass(cls, base), "torch...schedules._PipelineSchedule", f"not a base of {cls.__name__}")
    load = compat.runtime_schedule_class()._load_csv
    expect("format" in params(load), "_PipelineScheduleRuntime._load_csv", f"parameters {params(load)}")
    # the step loop run with recording stages gives the executed order (independent: tfz's builder)
    for name, torch_name in (("1f1b", "Schedule1F1B"), ("zbv", "ScheduleZBVZeroBubble")):
        executed = from_torch(torch_name, 2, 4)
        expect(
            executed.orders == build_schedule(name, 2, 4).orders,
            f"{torch_name}._step_microbatches",
            "the loop run with recording stages no longer gives the documented order",
        )
    zbh1 = build_schedule("zbh1", 2, 4)
    expect(replay_on_torch(zbh1, tmp_path / "z.csv").orders == zbh1.orders, "_load_csv", "orders changed")
    single = instantiate_torch("Schedule1F1B", 2, 4)
    multi = instantiate_torch("ScheduleZBVZeroBubble", 2, 4)
    assert [s.stage_index for s in compat.schedule_stages(single)] == [0]
    assert [s.stage_index for s in compat.schedule_stages(multi)] == [0, 1]
    with pytest.raises(TypeError, match="torch pipeline schedule"):
        compat.schedule_stages(object())


def test_will_engine_execute_node_tells_needed_weights():
    seen = {}

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x * w

        @staticmethod
        def backward(ctx, g):
            seen["x"] = compat.will_engine_execute_node(ctx.next_functions[0][0])
            seen["w"] = compat.will_engine_execute_node(ctx.next_functions[1][0])
            x, w = ctx.saved_tensors
            return g * w, g * x

    x = torch.ones(3, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    h = x * 2  # a non-leaf: its node is asked
    v = w.view_as(w)
    torch.autograd.grad(Probe.apply(h, v).sum(), [x])
    api = "torch._C._will_engine_execute_node"
    expect(seen == {"x": True, "w": False}, api, f"answered {seen} for (needed input, unneeded weight)")


def test_tls_objects_reach_autograd_threads():
    api = "torch._C._{stash,get,is_key_in,remove}_obj{_in,_from}_tls"
    if not compat.tls_supported() and torch_version() < (2, 13):
        pytest.skip(f"torch {torch.__version__} has no TLS object slots (tfz uses a Python thread-local)")
    expect(compat.tls_supported(), api, "the functions are gone")
    key, value = "tfz.test.compat", object()
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(compat.tls_get(key) if compat.tls_has(key) else None)
            return g

    compat.tls_stash(key, value)
    try:
        expect(compat.tls_has(key) and compat.tls_get(key) is value, api, "stash/get round trip failed")
        Probe.apply(torch.ones(2, requires_grad=True)).sum().backward()
    finally:
        compat.tls_remove(key)
    expect(seen == [value], api, "the object did not reach the backward")
    expect(not compat.tls_has(key), api, "remove left the key")


@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU build of torch has no CUDA stream getter")
def test_cuda_raw_stream_getter_exists_in_cuda_builds():
    expect(compat.cuda_raw_stream_getter() is not None, "torch._C._cuda_getCurrentRawStream", "gone")


def test_compat_error_names_the_torch_version():
    err = compat._missing("torch.x._y", "the function is gone")
    assert torch.__version__ in str(err) and "torch.x._y" in str(err)
    assert set(compat.__all__) <= set(dir(compat))
