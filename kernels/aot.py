"""Ahead-of-time compilation of the wgrad and row-AdamW kernels for sm_80 / sm_90, without a GPU.

The triton wheel ships ptxas, so ``triton.compile`` can target any NVIDIA architecture on a CPU-only
machine. Each case is compiled with the specialisation a real launch gets: the arguments go through
triton's own launch binder (``create_function_from_signature`` + ``JITFunction._pack_args``, the code
``JITFunction.run`` uses), with 16-byte-aligned pointers, in/out features divisible by 16 and unit
strides, so the unit strides become constants and the rest carry ``tt.divisibility=16`` exactly as on
the GPU. The ptxas ``-v`` log of the compile gives registers and spill bytes; the PTX shows whether
tensor-core MMA (``wgmma`` on sm_90, ``mma.sync`` on sm_80) and 16-byte ``cp.async`` loads are used.

Run as a script (needs triton only, not torch; e.g. in a separate virtual environment with another
triton version)::

    python kernels/aot.py --arch 90 --arch 80 --jobs 2            # markdown table, exit 1 on spills
    python kernels/aot.py --arch 90 --json out.json

Every case is compiled in a fresh Triton cache directory, so ptxas always runs (a cache hit would
give no log).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    from . import configs
except ImportError:  # run as a file: load the torch-free sibling by path
    _spec = importlib.util.spec_from_file_location(
        "_tfz_wgrad_configs", Path(__file__).with_name("configs.py")
    )
    configs = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = configs  # dataclasses look the module up by name
    _spec.loader.exec_module(configs)

__all__ = ["Case", "Result", "cases", "compile_case", "main", "run_cases"]

# architecture -> the most shared memory a block may use (bytes): A100 163 KB, H100/H200 227 KB
SMEM_LIMIT = {80: 166912, 90: 232448}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class Case:
    """One kernel compile: ``kernel`` "wgrad", "bias" or "row_adamw", operand dtype, dW dtype (the
    parameter's for row_adamw), flags, config."""

    kernel: str
    arch: int
    dtype: str
    """Operand dtype: "bf16", "fp16" or "fp32" (fp32 runs with TF32)."""
    config: dict
    dw_dtype: str = "fp32"
    has_mask: bool = True
    accumulate: bool = True
    n_in: int = 4096
    n_out: int = 4096


@dataclass(frozen=True)
class Result:
    case: Case
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    """Shared memory per block (bytes), dynamic, as the compiled kernel's metadata says."""
    mma: str
    """"wgmma", "mma.sync" or "none" (FMA only)."""
    cp_async_bytes: tuple[int, ...]
    """Widths of the cp.async copies in the PTX (16 = full vectors)."""
    atomics: bool
    vector_loads: bool
    """16-byte global loads (``ld.global.v4``) in the PTX: what a memory-bound kernel needs."""
    triton: str

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


class _Ptr:
    """What the launch binder reads from a tensor argument: dtype name and an aligned address."""

    def __init__(self, dtype: str):
        self.dtype = f"torch.{DTYPES.get(dtype, dtype)}"

    @staticmethod
    def data_ptr() -> int:
        return 1 << 20


ROW_ADAMW_CONFIG = {"block": 1024, "num_warps": 4, "num_stages": 3}
"""The row-AdamW launch: BLOCK of kernels/row_adamw.py and triton's default warps and stages."""


def _kernel_module(name: str):
    """``kernels/<name>.py`` (imports triton only), as a package module or loaded by path."""
    import triton  # noqa: F401 - before loading the kernels module

    if __package__:
        with contextlib.suppress(ImportError):
            return importlib.import_module(f".{name}", __package__)
    spec = importlib.util.spec_from_file_location(f"_tfz{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kernel_fn(kind: str):
    if kind == "row_adamw":
        return _kernel_module("_row_adamw_triton").row_adamw_kernel
    mod = _kernel_module("_triton_kernels")
    return mod.wgrad_kernel if kind == "wgrad" else mod.bias_kernel


def _launch_args(case: Case) -> tuple[list, dict]:
    if case.kernel == "row_adamw":  # a 4096-column row, counts, step and lr on the device, every flag
        args = [_Ptr(case.dtype)] * 4 + [
            _Ptr("int32"),
            _Ptr("fp32"),
            _Ptr("fp32"),
            4096,
            8,
            1.0,
            1e-3,
            0.9,
            0.95,
            1e-8,
            0.1,
            0.5,
        ]
        meta = dict(
            HAS_COUNTS=True,
            RESCALE=True,
            SCALE_STEP=True,
            STEP_ON_DEVICE=True,
            LR_ON_DEVICE=True,
            BLOCK=case.config["block"],
        )
        return args, dict(meta, num_warps=case.config["num_warps"], num_stages=case.config["num_stages"])
    cfg = configs.WgradConfig(**case.config)
    m, n, t = case.n_out, case.n_in, 4096
    dtype = case.dtype
    if case.kernel == "wgrad":
        args = [_Ptr(dtype), _Ptr(dtype), _Ptr(case.dw_dtype), _Ptr("uint8"), _Ptr("int32")]
        args += [t, m, n, m // cfg.block_m, m, 1, n, 1, n]
        meta = dict(
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m,
            SPLIT_K=cfg.split_k,
            HAS_MASK=case.has_mask,
            ACCUMULATE=case.accumulate,
            UPCAST=False,
            INPUT_PRECISION="tf32" if dtype == "fp32" else "ieee",
        )
    else:
        args = [_Ptr(dtype), _Ptr("fp32"), _Ptr("uint8"), _Ptr("int32"), t, m, m, 1]
        meta = dict(
            BLOCK_M=cfg.block_m,
            BLOCK_T=cfg.block_k,
            SPLIT_T=cfg.split_k,
            HAS_MASK=case.has_mask,
            ACCUMULATE=case.accumulate,
        )
    return args, dict(meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def compile_case(case: Case, cache_dir: str | None = None) -> Result:
    """Compile one case for ``case.arch`` and read its resources (ptxas -v log, metadata, PTX)."""
    with tempfile.TemporaryDirectory(prefix="tfz-aot-") as fresh:
        os.environ["TRITON_CACHE_DIR"] = cache_dir or fresh
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature

        knobs.cache.dir = os.environ["TRITON_CACHE_DIR"]
        knobs.nvidia.dump_ptxas_log = True
        fn = _kernel_fn(case.kernel)
        target = GPUTarget("cuda", case.arch, 32)
        backend = make_backend(target)
        args, kwargs = _launch_args(case)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
            )
    text = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not regs:
        raise RuntimeError(f"no ptxas -v log for {case}:\n{text[-2000:]}")
    ptx = kernel.asm["ptx"]
    if "wgmma.mma_async" in ptx:
        mma = "wgmma"
    elif re.search(r"\bmma\.sync\b", ptx):
        mma = "mma.sync"
    else:
        mma = "none"
    widths = re.findall(
        r"cp\.async\.c[ag]\.shared\.global(?:\.L2::\w+)*\s*\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-fA-F]+|\d+)",
        ptx,
    )
    return Result(
        case=case,
        registers=int(regs[-1]),
        spill_stores=sum(int(s) for s, _ in spills),
        spill_loads=sum(int(ld) for _, ld in spills),
        shared=int(kernel.metadata.shared),
        mma=mma,
        cp_async_bytes=tuple(sorted({int(w, 0) for w in widths})),
        atomics=bool(re.search(r"^\s*(?:@%p\d+\s+)?(?:red|atom)\.", ptx, re.MULTILINE)),
        vector_loads=bool(re.search(r"ld\.global(?:\.\w+)*\.v4\.", ptx)),
        triton=triton.__version__,
    )


def cases(archs=(90, 80)) -> list[Case]:
    """Every kernel a launch can use on these architectures: each config of the table (and its split-K
    twin and the fallback) for bf16 and fp32 (TF32) operands with the heaviest flags (row mask,
    accumulate into fp32), the 16-bit-dW epilogue of every bf16 config, the bias kernel, and the
    row-AdamW step for bf16 and fp32 parameters."""
    out = []
    for arch in archs:
        fam = configs.family((arch // 10, arch % 10))
        for dtype, dclass in (("bf16", "16bit"), ("fp32", "tf32")):
            for cfg in configs.table_configs(fam, dclass):
                out.append(Case("wgrad", arch, dtype, asdict(cfg)))
                if dtype == "bf16" and cfg.split_k == 1:
                    out.append(Case("wgrad", arch, dtype, asdict(cfg), dw_dtype="bf16"))
            out.append(Case("bias", arch, dtype, asdict(configs.BIAS_CONFIG)))
            out.append(Case("bias", arch, dtype, asdict(configs.BIAS_CONFIG.with_split(configs.SPLIT_K))))
            out.append(Case("row_adamw", arch, dtype, ROW_ADAMW_CONFIG, dw_dtype=dtype))
    return out


def run_cases(todo: list[Case], jobs: int = 1) -> list[Result]:
    """Compile ``todo`` (in ``jobs`` worker processes, each case in a fresh cache directory)."""
    if jobs <= 1:
        return [compile_case(c) for c in todo]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_case, todo))


def _config_name(c: dict) -> str:
    if "block" in c:
        return f"{c['block']} w{c['num_warps']}"
    return f"{c['block_m']}x{c['block_n']}x{c['block_k']} w{c['num_warps']} s{c['num_stages']}" + (
        f" split{c['split_k']}" if c["split_k"] > 1 else ""
    )


def markdown(results: list[Result]) -> str:
    """A table: one row per compiled case."""
    head = (
        "| triton | arch | kernel | operands -> dW | config | registers | spill bytes (st/ld) | "
        "shared KB | MMA | cp.async bytes |"
    )
    lines = [head, "|---|---|---|---|---|---:|---:|---:|---|---|"]
    for r in results:
        c = r.case
        dw = f"{c.dtype} -> {c.dw_dtype}" if c.kernel != "bias" else f"{c.dtype} -> fp32"
        lines.append(
            f"| {r.triton} | sm_{c.arch} | {c.kernel} | {dw} | {_config_name(c.config)} | {r.registers} | "
            f"{r.spill_stores}/{r.spill_loads} | {r.shared / 1024:.0f} | {r.mma} | "
            f"{','.join(map(str, r.cp_async_bytes)) or '-'} |"
        )
    return "\n".join(lines)


def problems(results: list[Result]) -> list[str]:
    """What the ahead-of-time check refuses: spills, shared memory over the architecture's limit,
    wgrad kernels without tensor-core MMA, atomics in kernels that do not split (row_adamw: none), a
    row-AdamW kernel without 16-byte loads."""
    out = []
    for r in results:
        c = r.case
        name = f"{c.kernel} sm_{c.arch} {c.dtype}->{c.dw_dtype} {_config_name(c.config)}"
        if r.spills:
            out.append(f"{name}: {r.spill_stores} bytes spill stores, {r.spill_loads} bytes spill loads")
        if r.shared > SMEM_LIMIT[c.arch]:
            out.append(f"{name}: {r.shared} bytes of shared memory > {SMEM_LIMIT[c.arch]}")
        if c.kernel == "wgrad" and r.mma != ("wgmma" if c.arch == 90 else "mma.sync"):
            out.append(f"{name}: MMA {r.mma}")
        if c.kernel == "row_adamw" and not r.vector_loads:
            out.append(f"{name}: no 16-byte global loads")
        split = c.config.get("split_k", 1)
        if r.atomics != (split > 1):
            out.append(f"{name}: atomics {r.atomics} with split {split}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SMEM_LIMIT), help="repeatable")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--kernel", choices=("wgrad", "bias", "row_adamw"), help="only this kernel")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="only these operands")
    ns = parser.parse_args(argv)
    todo = [
        c
        for c in cases(tuple(ns.arch or (90, 80)))
        if ns.kernel in (None, c.kernel) and ns.dtype in (None, c.dtype)
    ]
    results = run_cases(todo, ns.jobs)
    print(markdown(results))
    if ns.json:
        Path(ns.json).write_text(json.dumps([dict(asdict(r), spills=r.spills) for r in results], indent=1))
    bad = problems(results)
    for line in bad:
        print("PROBLEM:", line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
