"""tfz.kernels.wgrad against the float64 reference, for every backend that can run here.

Poisoning: in "accumulate" mode the destination holds random values (a kernel touching a frozen row
changes its bits); in "overwrite" mode it is NaN-filled (a skipped active element stays NaN, a touched
frozen element loses its NaN payload bits); in "fresh" mode frozen rows must be exactly 0.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tfz.kernels import (
    BACKENDS,
    ActiveRows,
    has_triton,
    resolve_backend,
    wgrad,
    wgrad_gemm_accum_fp16,
    wgrad_gemm_accum_fp32,
    wgrad_ref,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = ["accumulate", "overwrite", "fresh"]
MASKS = ["none", "all_active", "all_frozen", "random", "single", "blocks"]
# (leading dims, out, in): tokens 1 / 37 / 130 / 2x3, out and in not multiples of any tile
SHAPES = [
    ((1,), 1, 33),
    ((37,), 70, 96),
    ((130,), 129, 33),
    ((2, 3), 70, 33),
    ((130,), 1, 96),
    ((1,), 129, 96),
    ((37,), 129, 96),
]
EPS32 = torch.finfo(torch.float32).eps
_interpreting = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")
# A payload NaN: a kernel that reads and rewrites it produces a different bit pattern on most hardware.
POISON_BITS = 0x7FC0_1234


def _poison(shape, dtype=torch.float32) -> torch.Tensor:
    """A NaN with a payload; 16-bit dtypes get a 16-bit one."""
    if dtype == torch.float32:
        return torch.full(shape, POISON_BITS, dtype=torch.int32).view(torch.float32)
    bits = {torch.bfloat16: 0x7FC1, torch.float16: 0x7E01}[dtype]
    return torch.full(shape, bits, dtype=torch.int16).view(dtype)


def make_mask(kind: str, n_out: int, seed: int) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "all_active":
        return torch.ones(n_out, dtype=torch.bool)
    if kind == "all_frozen":
        return torch.zeros(n_out, dtype=torch.bool)
    if kind == "random":
        return torch.rand(n_out, generator=g) < 0.5
    if kind == "single":
        m = torch.zeros(n_out, dtype=torch.bool)
        m[int(torch.randint(n_out, (1,), generator=g))] = True
        return m
    if kind == "blocks":  # blocks of 16 rows, as tfz.masks produces (at a smaller granularity)
        blocks = torch.rand(-(-n_out // 16), generator=g) < 0.5
        return blocks.repeat_interleave(16)[:n_out]
    raise AssertionError(kind)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = torch.int32 if a.element_size() == 4 else torch.int16
    return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


def check_case(
    backend,
    lead,
    n_out,
    n_in,
    dtype,
    mask_kind,
    mode,
    *,
    bias=True,
    seed=0,
    transpose_x=False,
    device="cpu",
    out_dtype=torch.float32,
    prepared=False,
    tf32=False,
):
    """Run one wgrad call on poisoned outputs and check it against wgrad_ref (see the module docstring).

    ``out_dtype``: dtype of the destination (16-bit: one rounding allowed); ``prepared``: pass the mask
    as ActiveRows; ``tf32``: the products ran in TF32 (10-bit mantissa operands)."""
    g = torch.Generator().manual_seed(seed)
    if transpose_x:  # X given as a non-contiguous [T, in] view
        x = torch.randn(n_in, *lead, generator=g).to(dtype).movedim(0, -1)
    else:
        x = torch.randn(*lead, n_in, generator=g).to(dtype)
    dy = torch.randn(*lead, n_out, generator=g).to(dtype)
    mask = make_mask(mask_kind, n_out, seed + 1)
    accumulate = mode == "accumulate"
    if mode == "accumulate":
        out, db = torch.randn(n_out, n_in, generator=g).to(out_dtype), torch.randn(n_out, generator=g)
    elif mode == "overwrite":
        out, db = _poison((n_out, n_in), out_dtype), _poison((n_out,))
    else:
        out, db = None, _poison((n_out,))
    db = db if bias else None
    out_before = None if out is None else out.clone()
    db_before = None if db is None else db.clone()

    dev = lambda t: None if t is None else t.to(device)
    out_d, db_d = dev(out), dev(db)
    rows = ActiveRows(mask, device) if (prepared and mask is not None) else dev(mask)
    res = wgrad(
        dev(x),
        dev(dy),
        active_rows=rows,
        out=out_d,
        accumulate=accumulate,
        bias_grad=db_d,
        backend=backend,
    )
    if out is not None:
        assert res is out_d
    res, out, db = res.cpu(), None if out is None else out_d.cpu(), None if db is None else db_d.cpu()

    ref_dw, ref_db = wgrad_ref(
        x, dy, active_rows=mask, out=out_before, accumulate=accumulate, bias_grad=db_before
    )
    assert res.dtype == (out_dtype if out is not None else torch.float32) and res.shape == (n_out, n_in)
    active = torch.ones(n_out, dtype=torch.bool) if mask is None else mask
    frozen = ~active
    if out_before is not None:
        assert _bitwise_equal(res[frozen], out_before[frozen]), "frozen rows of out were modified"
    else:
        assert torch.equal(res[frozen], torch.zeros_like(res[frozen])), "frozen rows of a fresh dW must be 0"
    if db is not None:
        assert _bitwise_equal(db[frozen], db_before[frozen]), "frozen entries of bias_grad were modified"

    # Tolerance: twice torch's own fp32 error on the same upcast operands, plus a few ulps of the
    # magnitude sum_t |dY||X| (+ |base|), far below the O(1) error of any missed token or tile.
    x64 = x.reshape(-1, n_in).double()
    dy64 = dy.reshape(-1, n_out).double()
    base32 = torch.zeros(n_out, n_in) if (out_before is None or not accumulate) else out_before.float()
    torch_dw = base32 + dy.reshape(-1, n_out).float().t() @ x.reshape(-1, n_in).float()
    scale = dy64.abs().t() @ x64.abs() + base32.double().abs()
    rounding = 0.0 if res.dtype == torch.float32 else torch.finfo(res.dtype).eps
    products = 2.0**-10 if tf32 else 0.0
    _assert_close(
        res, ref_dw, torch_dw, scale, active, "dW", extra=rounding * ref_dw.abs() + products * scale
    )
    if db is not None:
        b_base = db_before if accumulate else torch.zeros(n_out)
        torch_db = b_base + dy.reshape(-1, n_out).float().sum(0)
        b_scale = dy64.abs().sum(0) + b_base.double().abs()
        _assert_close(db, ref_db, torch_db, b_scale, active, "bias_grad")


def _assert_close(res, ref, torch_res, scale, active, what, extra=0.0):
    """Within twice torch's fp32 error plus a few fp32 ulps of ``scale``, plus ``extra`` (the
    destination's rounding, TF32 products)."""
    if not bool(active.any()):
        return
    if isinstance(extra, torch.Tensor):
        extra = extra[active]
    res, ref, torch_res, scale = res[active], ref[active], torch_res[active], scale[active]
    assert bool(torch.isfinite(res).all()), f"{what}: non-finite values in active rows (poison left?)"
    err = (res.double() - ref).abs()
    torch_err = float((torch_res.double() - ref).abs().max())
    tol = 2 * torch_err + 8 * EPS32 * scale + extra
    worst = float((err - tol).max())
    assert worst <= 0, (
        f"{what}: max err {float(err.max()):.3e}, torch err {torch_err:.3e}, over tol by {worst:.3e}"
    )


# ---------------------------------------------------------------- torch backend: full cross product


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_backend_matches_reference(shape, dtype, mask_kind, mode):
    lead, n_out, n_in = shape
    check_case("torch", lead, n_out, n_in, dtype, mask_kind, mode)


@pytest.mark.parametrize("path", ["per_run", "gather"])
def test_torch_backend_both_paths(path, monkeypatch):
    from tfz.kernels import _wgrad_torch

    calls = []
    gathered = _wgrad_torch._gathered
    monkeypatch.setattr(_wgrad_torch, "_gathered", lambda *a: calls.append(1) or gathered(*a))
    monkeypatch.setattr(_wgrad_torch, "GATHER_MIN_RUNS", 0 if path == "gather" else 10**9)
    for mode in MODES:
        for mask_kind, dtype in [
            ("random", torch.float32),
            ("blocks", torch.bfloat16),
            ("single", torch.float16),
        ]:
            check_case("torch", (37,), 300, 33, dtype, mask_kind, mode, seed=len(calls))
    assert (len(calls) > 0) == (path == "gather")


def test_torch_backend_workspace_is_per_thread():
    import threading

    mask = make_mask("random", 300, 0)  # many runs: the gathered path with its CPU workspace
    errors = []

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        for i in range(10):
            x, dy = torch.randn(64 + i, 40, generator=g), torch.randn(64 + i, 300, generator=g)
            got = wgrad(x, dy, active_rows=mask, backend="torch")
            want = torch.where(mask[:, None], dy.t() @ x, torch.zeros(()))
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-4):
                errors.append((seed, i))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


def test_torch_backend_strided_input():
    check_case("torch", (37,), 70, 33, torch.float32, "random", "accumulate", transpose_x=True)


# ---------------------------------------------------------------- row bookkeeping vs brute force


def _runs_brute(mask: list[bool]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, v in enumerate([*mask, False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("n", [1, 2, 7, 64, 129])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9, 1.0])
def test_active_rows_match_brute_force(n, p):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < p
    for source in (mask, mask.numpy()):
        rows = ActiveRows(source)
        assert rows.runs == _runs_brute(mask.tolist())
        assert rows.n_rows == n and rows.n_active == int(mask.sum())
        assert torch.equal(rows.mask, mask) and rows.index.tolist() == [i for i in range(n) if mask[i]]
        for bm in (1, 16, 64, 128):
            want = [b for b in range(-(-n // bm)) if any(mask[b * bm : (b + 1) * bm].tolist())]
            got = rows.blocks(bm)
            assert got.dtype == torch.int32 and got.tolist() == want and rows.n_blocks(bm) == len(want)


def test_active_rows_built_together_equal_built_alone():
    g = torch.Generator().manual_seed(3)
    masks = [torch.rand(n, generator=g) < 0.5 for n in (1, 70, 129, 300)] + [torch.zeros(5, dtype=torch.bool)]
    together = ActiveRows.build_many([m.numpy() for m in masks], "cpu")
    before = ActiveRows.builds
    alone = [ActiveRows(m) for m in masks]
    assert ActiveRows.builds == before + len(masks)
    for a, b in zip(together, alone):
        assert a.runs == b.runs and a.n_active == b.n_active
        assert torch.equal(a.mask, b.mask) and torch.equal(a.index, b.index)
        for bm in (64, 128):
            assert torch.equal(a.blocks(bm), b.blocks(bm))


@pytest.mark.parametrize("sizes", [(128, 384, 256, 128, 640), (64, 192, 128), (128, 70, 256)])
def test_active_rows_built_together_match_brute_force(sizes):
    """Masks built in one call (whole 64- and 128-row blocks take the reshaped path, others the
    per-mask one): runs stop at each mask's edge even where the next mask starts active."""
    g = torch.Generator().manual_seed(len(sizes))
    masks = [torch.rand(n, generator=g) < p for n, p in zip(sizes, (0.5, 0.2, 0.9, 1.0, 0.0))]
    masks[0][-3:] = True  # active up to the edge, and the next mask active from its first row
    masks[1][:2] = True
    built = ActiveRows.build_many([m.numpy() for m in masks], "cpu")
    aligned = ActiveRows._build([m.numpy() for m in masks], torch.device("cpu"), align=True)  # as on GPUs
    for mask, rows, rows_aligned in zip(masks, built, aligned):
        assert torch.equal(rows_aligned.mask, mask) and torch.equal(rows_aligned.index, rows.index)
        assert rows_aligned.runs == rows.runs and rows_aligned.n_active == rows.n_active
        for bm in (64, 128):
            assert torch.equal(rows.blocks(bm), rows_aligned.blocks(bm))
            assert rows_aligned.blocks(bm).data_ptr() % 16 == 0
        for field in (rows_aligned.mask_bytes, rows_aligned.index):
            assert field.data_ptr() % 16 == 0  # what the kernels are specialised and compiled for
        n = mask.numel()
        assert rows.runs == _runs_brute(mask.tolist())
        assert rows.n_rows == n and rows.n_active == int(mask.sum()) and torch.equal(rows.mask, mask)
        assert rows.index.dtype == torch.int64 and rows.index.tolist() == mask.nonzero().flatten().tolist()
        assert rows.host.tolist() == mask.tolist()
        for bm in (64, 128):
            want = [b for b in range(-(-n // bm)) if any(mask[b * bm : (b + 1) * bm].tolist())]
            got = rows.blocks(bm)
            assert got.dtype == torch.int32 and got.tolist() == want and rows.n_blocks(bm) == len(want)


def test_active_rows_is_a_snapshot_and_raw_masks_are_read_per_call():
    """A prepared mask does not follow later edits of its source; a raw tensor is read at every call."""
    mask = torch.zeros(10, dtype=torch.bool)
    mask[2:5] = True
    rows = ActiveRows(mask)
    x, dy = torch.randn(3, 4), torch.randn(3, 10)
    mask[2:5] = False
    mask[7] = True
    assert rows.runs == [(2, 5)]
    out = wgrad(x, dy, active_rows=rows, backend="torch")
    assert out[2:5].abs().sum() > 0 and torch.equal(out[7], torch.zeros(4))
    out = wgrad(x, dy, active_rows=mask, backend="torch")
    assert torch.equal(out[2:5], torch.zeros(3, 4)) and out[7].abs().sum() > 0


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(4, dtype=torch.int64), "bool"),
        (np.ones((2, 2), dtype=bool), "1-D bool"),
        ([True, False], "ActiveRows"),
    ],
)
def test_active_rows_refuses_bad_masks(mask, match):
    with pytest.raises(TypeError, match=match):
        ActiveRows(mask)


def test_prepared_mask_must_match_the_call():
    x, dy = torch.randn(3, 4), torch.randn(3, 10)
    with pytest.raises(ValueError, match="9 rows, expected 10"):
        wgrad(x, dy, active_rows=ActiveRows(torch.ones(9, dtype=torch.bool)))


@pytest.mark.parametrize("mode", ["accumulate", "overwrite"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_torch_backend_16bit_destination(out_dtype, mode):
    """A 16-bit dW (a bf16 .grad or main_grad): active rows are rounded once, frozen rows untouched."""
    for mask_kind in ("random", "blocks", "none"):
        for prepared in (False, True):
            check_case(
                "torch",
                (37,),
                129,
                40,
                torch.bfloat16,
                mask_kind,
                mode,
                out_dtype=out_dtype,
                prepared=prepared,
            )


# ---------------------------------------------------------------- API behaviour


def test_apex_compatible_wrapper_accumulates_in_place():
    x, dy = torch.randn(2, 5, 33), torch.randn(2, 5, 70)
    mask = make_mask("random", 70, 0)
    main_grad = torch.randn(70, 33)
    before = main_grad.clone()
    assert wgrad_gemm_accum_fp32(x, dy, main_grad, active_rows=mask, backend="torch") is None
    ref, _ = wgrad_ref(x, dy, active_rows=mask, out=before)
    torch.testing.assert_close(main_grad.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(main_grad[~mask], before[~mask])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_tokens(backend):
    if backend == "triton" and (not (has_triton() and _interpreting) or _interpreter_breaks_on_numpy()):
        pytest.skip("needs triton and TRITON_INTERPRET=1, and numpy < 2.4 with triton < 3.7")
    x, dy = torch.randn(0, 33), torch.randn(0, 70)
    out = torch.randn(70, 33)
    before = out.clone()
    wgrad(x, dy, out=out, backend=backend)
    assert torch.equal(out, before)
    mask = make_mask("random", 70, 0)
    fresh = wgrad(x, dy, active_rows=mask, out=_poison((70, 33)), accumulate=False, backend=backend)
    assert torch.equal(fresh[mask], torch.zeros(int(mask.sum()), 33))
    assert torch.equal(wgrad(x, dy, backend=backend), torch.zeros(70, 33))


def test_inputs_requiring_grad_are_fine():
    x = torch.randn(5, 8, requires_grad=True)
    dy = torch.randn(5, 3)
    main_grad = torch.zeros(3, 8, requires_grad=False)
    wgrad_gemm_accum_fp32(x, dy, main_grad, backend="torch")
    torch.testing.assert_close(main_grad, dy.t() @ x.detach())


def _good():
    return torch.randn(6, 8), torch.randn(6, 5), torch.zeros(5, 8)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"out": torch.zeros(5, 8, dtype=torch.float64)}, TypeError, "out.*float64"),
        ({"out": torch.zeros(8, 5).t()}, ValueError, "out.*contiguous"),
        ({"out": torch.zeros(5, 9)}, ValueError, r"out.*\(5, 9\)"),
        ({"active_rows": torch.ones(5, dtype=torch.int64)}, TypeError, "active_rows.*int64"),
        ({"active_rows": torch.ones(4, dtype=torch.bool)}, ValueError, r"active_rows.*\(4,\)"),
        ({"bias_grad": torch.zeros(6)}, ValueError, r"bias_grad.*\(6,\)"),
        ({"bias_grad": torch.zeros(5, dtype=torch.bfloat16)}, TypeError, "bias_grad.*bfloat16"),
        ({"backend": "cuda"}, ValueError, "backend.*'cuda'"),
        ({"input": torch.randn(7, 8)}, ValueError, "tokens.*7"),
        ({"input": torch.randn(6, 8, dtype=torch.float64)}, TypeError, "input.*float64"),
        ({"input": torch.randn(6, 8).half()}, TypeError, "same dtype.*float16"),
        ({"input": [[1.0]]}, TypeError, "input must be a torch.Tensor.*list"),
    ],
)
def test_bad_inputs_raise_with_the_argument_named(kwargs, exc, match):
    x, dy, out = _good()
    args = {"input": x, "grad_output": dy, "out": out, **kwargs}
    with pytest.raises(exc, match=match):
        wgrad(args.pop("input"), args.pop("grad_output"), **args)


def _aliasing_cases():
    """(name, make) pairs: ``make()`` gives wgrad's arguments where the destination shares memory
    with what the kernel reads; n = 8 tokens, in = out = 8, so every shape fits."""

    def buf():
        return torch.randn(24, 8)

    def view_over_x():
        b = buf()
        return {"input": b[:8], "grad_output": torch.randn(8, 8), "out": b[4:12]}

    def out_is_dy():
        dy = torch.randn(8, 8)
        return {"input": torch.randn(8, 8), "grad_output": dy, "out": dy}

    def out_is_x():
        x = torch.randn(8, 8)
        return {"input": x, "grad_output": torch.randn(8, 8), "out": x}

    def strided_x_over_out():  # x reads every other row of the buffer out is in
        b = buf()
        return {"input": b[::2][:8], "grad_output": torch.randn(8, 8), "out": b[9:17]}

    def bias_in_dy():
        dy = torch.randn(8, 8)
        return {"input": torch.randn(8, 8), "grad_output": dy, "bias_grad": dy[3]}

    def bias_in_out():
        out = torch.zeros(8, 8)
        return {"input": torch.randn(8, 8), "grad_output": torch.randn(8, 8), "out": out, "bias_grad": out[2]}

    def numpy_alias():  # two tensors over one numpy array: different storages, same memory
        a = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
        return {"input": torch.from_numpy(a), "grad_output": torch.randn(8, 8), "out": torch.from_numpy(a)}

    return [
        ("out is input", out_is_x, "out.*shares memory with input"),
        ("out is grad_output", out_is_dy, "out.*shares memory with grad_output"),
        ("out overlaps a view of input", view_over_x, "out.*shares memory with input"),
        ("strided input over out", strided_x_over_out, "out.*shares memory with input"),
        ("bias_grad in grad_output", bias_in_dy, "bias_grad shares memory with grad_output"),
        ("bias_grad in out", bias_in_out, "bias_grad shares memory with out"),
        ("numpy alias", numpy_alias, "out.*shares memory with input"),
    ]


@pytest.mark.parametrize("name, make, match", _aliasing_cases(), ids=[c[0] for c in _aliasing_cases()])
@pytest.mark.parametrize("accumulate", [True, False])
def test_destination_sharing_memory_with_an_input_is_refused(name, make, match, accumulate):
    args = make()
    before = {k: v.clone() for k, v in args.items()}
    kwargs = {k: v for k, v in args.items() if k not in ("input", "grad_output")}
    with pytest.raises(ValueError, match=match):
        wgrad(args["input"], args["grad_output"], accumulate=accumulate, backend="torch", **kwargs)
    assert all(torch.equal(before[k], v) for k, v in args.items())  # refused before writing


def test_disjoint_views_of_one_buffer_are_fine():
    """Views of one storage that do not overlap are no alias: the result equals the float64 reference."""
    buf = torch.randn(40, 8)
    x, dy, out, bias = buf[:8], buf[8:16], buf[16:24], buf[24]
    start, bias_start, tail = out.clone(), bias.clone(), buf[25:].clone()
    mask = make_mask("random", 8, 0)
    wgrad(x, dy, active_rows=mask, out=out, bias_grad=bias, backend="torch")
    ref, ref_bias = wgrad_ref(x, dy, active_rows=mask, out=start, bias_grad=bias_start)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.double(), ref_bias, rtol=1e-5, atol=1e-5)
    assert torch.equal(buf[25:], tail)


def test_meta_masks_and_bad_devices_are_named():
    meta = torch.ones(8, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="active_rows is on the meta device"):
        ActiveRows(meta)
    x, dy = torch.randn(3, 4), torch.randn(3, 8)
    with pytest.raises(ValueError, match="active_rows must be on device cpu.*meta"):
        wgrad(x, dy, active_rows=meta)
    for device in ("tpu", 5.5, "cuda:x"):
        with pytest.raises(ValueError, match=f"device must be .*got {device!r}"):
            ActiveRows(np.ones(8, dtype=bool), device)
        with pytest.raises(ValueError, match=f"got {device!r}"):
            resolve_backend("auto", device)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"cuda:0 was given, but torch.cuda.is_available\(\) is False"):
            ActiveRows(np.ones(8, dtype=bool), "cuda:0")
    rows = ActiveRows(np.ones(8, dtype=bool))
    for block in (0, -64, 1.5, True):
        with pytest.raises(ValueError, match=f"block must be an integer >= 1, got {block!r}"):
            rows.n_blocks(block)
    with pytest.raises(TypeError, match="sequence of masks, got one ndarray"):
        ActiveRows.build_many(np.ones(8, dtype=bool), "cpu")


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("TFZ_DISABLE_TRITON", raising=False)
    assert resolve_backend("auto", "cpu") == "torch"
    if has_triton():  # fp32 goes to Triton only with TF32 on; without it, to cuBLAS
        matmul = torch.backends.cuda.matmul
        was = matmul.allow_tf32
        try:
            matmul.allow_tf32 = False
            assert resolve_backend("auto", "cuda", torch.bfloat16) == "triton"
            assert resolve_backend("auto", "cuda", torch.float32) == "torch"
            matmul.allow_tf32 = True
            assert resolve_backend("auto", "cuda", torch.float32) == "triton"
        finally:
            matmul.allow_tf32 = was
    assert resolve_backend("torch", "cpu") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_backend("triton", "cpu")
    monkeypatch.setenv("TFZ_DISABLE_TRITON", "1")
    with pytest.raises(RuntimeError, match="TFZ_DISABLE_TRITON"):
        resolve_backend("triton", "cpu")
    assert resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cublas", "cpu")
    assert set(BACKENDS) == {"auto", "torch", "triton"}


def test_import_is_lean():
    code = (
        "import sys, torch, tfz.kernels, tfz.nn, tfz.pipeline\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# ---------------------------------------------------------------- Triton kernel under the interpreter


def _interpreter_breaks_on_numpy() -> bool:
    """triton < 3.7's interpreter turns program ids into 1-element arrays and calls int() on them,
    which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars")."""
    if not has_triton():
        return False
    import numpy
    import triton

    def version(text):
        return tuple(int(p) for p in text.split("+")[0].split(".")[:2])

    return version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4)


needs_interpreter = pytest.mark.skipif(
    not (has_triton() and _interpreting) or _interpreter_breaks_on_numpy(),
    reason="needs triton and TRITON_INTERPRET=1 (the compiled kernel is tested in test_wgrad_gpu.py), "
    "and numpy < 2.4 with triton < 3.7",
)


@needs_interpreter
@pytest.mark.parametrize("mask_kind", ["random", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(shape, dtype, mask_kind):
    lead, n_out, n_in = shape
    check_case("triton", lead, n_out, n_in, dtype, mask_kind, "accumulate", seed=n_out + n_in)


@needs_interpreter
@pytest.mark.parametrize("mode", ["overwrite", "fresh"])
@pytest.mark.parametrize("mask_kind", ["blocks", "single", "all_frozen", "all_active"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_modes_and_masks(dtype, mask_kind, mode):
    check_case("triton", (130,), 129, 96, dtype, mask_kind, mode, seed=7)


@needs_interpreter
def test_triton_without_bias_and_strided_input():
    check_case("triton", (2, 3), 70, 33, torch.float16, "random", "accumulate", bias=False)
    check_case("triton", (37,), 70, 33, torch.float32, "random", "overwrite", transpose_x=True)


@needs_interpreter
@pytest.mark.parametrize("mode", ["accumulate", "overwrite"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_16bit_destination(out_dtype, mode):
    check_case("triton", (130,), 129, 96, torch.bfloat16, "blocks", mode, out_dtype=out_dtype, prepared=True)
    check_case("triton", (37,), 70, 33, torch.float16, "random", mode, out_dtype=out_dtype, seed=4)


@needs_interpreter
def test_apex_fp16_wrapper_and_dtype_checks():
    x, dy = torch.randn(2, 5, 33), torch.randn(2, 5, 70)
    mask = make_mask("blocks", 70, 0)
    for backend in ("torch", "triton"):
        main_grad = torch.randn(70, 33).bfloat16()
        before = main_grad.clone()
        wgrad_gemm_accum_fp16(x, dy, main_grad, active_rows=mask, backend=backend)
        ref, _ = wgrad_ref(x, dy, active_rows=mask, out=before)
        torch.testing.assert_close(main_grad.double(), ref, rtol=2**-7, atol=1e-2)
        assert torch.equal(main_grad[~mask].view(torch.int16), before[~mask].view(torch.int16))
    with pytest.raises(TypeError, match="main_grad.*float32"):
        wgrad_gemm_accum_fp16(x, dy, torch.zeros(70, 33))
    with pytest.raises(TypeError, match="main_grad.*bfloat16"):
        wgrad_gemm_accum_fp32(x, dy, torch.zeros(70, 33).bfloat16())


def launch_thrice(wgrad_triton, x, dy, rows, start):
    """Accumulate into copies of ``start`` with deterministic algorithms off, on, on; returns the
    launched split_k values and the results."""
    splits, outs = [], []
    for deterministic in (False, True, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            dw = start.clone()
            splits.append(wgrad_triton(x, dy, dw, rows, True, None, True).split_k)
            outs.append(dw)
        finally:
            torch.use_deterministic_algorithms(False)
    return splits, outs


@needs_interpreter
def test_triton_split_k_is_off_in_deterministic_mode(monkeypatch):
    """A pinned split-K config adds with atomics; deterministic mode runs it without a split, with the
    same result bit for bit on every run."""
    from tfz.kernels import _wgrad_triton

    cfg = _wgrad_triton.WgradConfig(block_m=32, block_n=32, block_k=16, split_k=3)
    monkeypatch.setattr(_wgrad_triton, "pinned_config", cfg)
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(100, 40, generator=g), torch.randn(100, 70, generator=g)
    rows = ActiveRows(make_mask("blocks", 70, 2))
    start = torch.randn(70, 40, generator=g)
    launched, outs = launch_thrice(_wgrad_triton.wgrad_triton, x, dy, rows, start)
    assert launched == [3, 1, 1]
    assert torch.equal(outs[1].view(torch.int32), outs[2].view(torch.int32))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize(
    "cfg",
    [
        {"block_m": 16, "block_n": 32, "block_k": 16, "group_m": 2, "split_k": 3},
        {"block_m": 32, "block_n": 16, "block_k": 32, "group_m": 1, "split_k": 2},
        {"block_m": 128, "block_n": 128, "block_k": 128, "group_m": 8, "split_k": 1},
    ],
    ids=lambda c: "x".join(str(v) for v in c.values()),
)
@pytest.mark.parametrize("mode", MODES)
def test_triton_explicit_configs(cfg, mode, monkeypatch):
    """Other tile shapes, grouped ordering with several groups, and split-K (fp32 atomics)."""
    from tfz.kernels import _wgrad_triton

    monkeypatch.setattr(_wgrad_triton, "pinned_config", _wgrad_triton.WgradConfig(**cfg))
    check_case("triton", (130,), 129, 96, torch.bfloat16, "random", mode, seed=11)


@pytest.mark.skipif(not has_triton(), reason="needs triton")
def test_compiled_kernel_refuses_cpu_tensors():
    code = (
        "import torch\n"
        "from tfz.kernels._wgrad_triton import wgrad_triton\n"
        "x, dy, dw = torch.randn(4, 3), torch.randn(4, 2), torch.zeros(2, 3)\n"
        "try:\n"
        "    wgrad_triton(x, dy, dw, None, True, None, True)\n"
        "except RuntimeError as exc:\n"
        "    print('raised', 'compiled for GPUs' in str(exc))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.strip() == "raised True", proc.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["none", "random", "blocks", "single"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_wgrad_unchecked_matches_the_float64_reference(dtype, kind, accumulate):
    """The entry FreezableLinear's backward uses: the same result as the float64 reference, frozen rows
    of the destination untouched (poisoned: any write shows)."""
    from tfz.kernels.wgrad import wgrad_unchecked

    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 40, generator=g).to(dtype)
    dy = torch.randn(24, 72, generator=g).to(dtype)
    mask = make_mask(kind, 72, seed=5)
    out = torch.randn(72, 40, generator=g).to(dtype)
    if mask is not None:
        out[~mask] = _poison((int((~mask).sum()), 40), dtype)
    before = out.clone()
    want, _ = wgrad_ref(x, dy, active_rows=mask, out=before.float(), accumulate=accumulate)
    rows = None if mask is None else ActiveRows(mask, "cpu")
    wgrad_unchecked(x, dy, out, rows, accumulate)
    active = torch.ones(72, dtype=torch.bool) if mask is None else mask
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[active].double(), want[active], rtol=tol, atol=tol)
    assert _bitwise_equal(out[~active], before[~active])
