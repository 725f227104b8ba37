"""Measuring: F / I / W per pipeline stage on one device, unfrozen and fully frozen (``tfz profile``).

The measured times become a :class:`tfz.profile.Profile` (the data; this module is the measuring).

The stages of a model run one after another on a single device, each through the same backward code
the freeze-aware runtime uses (:mod:`tfz.pipeline.engine`), so one GPU predicts a P-GPU pipeline the way
the zero-bubble authors compute bubble rates: per-stage action times fed to a schedule model
(``tfz simulate`` / ``tfz plan --profile``). Communication is not measured.

Per stage, each repeat runs (stage inputs and output gradients are fixed random tensors):

- ``F``: the stage forward (the last stage includes its loss, which torch computes right after F);
- ``I``: stages > 0: the input backward with FreezableLinear dW queued (``input_backward``); stage 0:
  nothing, as in the runtime, where stage 0's I is a no-op (its time is the timer's own overhead);
- ``W``: stages > 0: flushing the queued dW (``weight_backward``); stage 0: the full backward, which is
  what torch runs at stage 0's W;
- ``W_frozen``: the same with every row and whole tensor frozen (stage 0: the backward is skipped);
- ``B`` / ``B_frozen``: the full backward (``full_backward``), unfrozen / fully frozen.

The median over ``repeats`` (after ``warmup`` repeats) is kept. Frozen times are clamped to at most
their unfrozen time (timer noise), as the profile format requires. CUDA work is timed with
:class:`tfz.timing.ActionTimer` events on the current stream.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tfz._validate import MAX_SEED, check_choice, check_int, short_repr
from tfz.masks import StageMasks, StageUnits
from tfz.models import PRESETS, build_stages
from tfz.nn import WeightGradStore, convert_to_freezable
from tfz.pipeline.engine import MaskPlan, StageParams, full_backward, input_backward, weight_backward
from tfz.profile import Profile, StageTimes
from tfz.timing import ActionTimer

__all__ = [
    "DTYPES",
    "MAX_REPEATS",
    "ProfileConfig",
    "check_memory",
    "device_memory",
    "estimate_bytes",
    "host_memory",
    "measure_stage",
    "profile_model",
    "stage_layers",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_KINDS = ("F", "I", "W", "W_frozen", "B", "B_frozen")
MAX_REPEATS = 10_000
"""Most timed (and most warm-up) repeats per action."""
_DEVICE = re.compile(r"cpu|cuda(:\d{1,4})?")


@dataclass(frozen=True)
class ProfileConfig:
    """What ``tfz profile`` measures (see :func:`profile_model`)."""

    model: str = "tiny"
    """A key of ``tfz.models.PRESETS``."""
    stages: int = 2
    layers_per_stage: int | None = None
    """Decoder layers per stage; None: tiny splits all its layers, llama-1b/8b use 1."""
    microbatch_size: int = 1
    seq_len: int = 128
    vocab_size: int | None = None
    """Embedding / output rows; None: the preset's (128256 for llama-1b/8b)."""
    device: str = "cpu"
    dtype: str = "float32"
    warmup: int = 2
    repeats: int = 5
    seed: int = 0
    """In [0, 2^32)."""

    def __post_init__(self):
        check_choice("model", self.model, PRESETS)
        check_choice("dtype", self.dtype, DTYPES)
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be cpu or cuda[:N], got {short_repr(self.device)}")
        for name, low, high in (
            ("stages", 1, None),
            ("microbatch_size", 1, None),
            ("seq_len", 1, None),
            ("warmup", 0, MAX_REPEATS),
            ("repeats", 1, MAX_REPEATS),
            ("seed", 0, MAX_SEED),
        ):
            object.__setattr__(self, name, check_int(name, getattr(self, name), low, maximum=high))
        for name in ("layers_per_stage", "vocab_size"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), 1, optional=True))
        preset = PRESETS[self.model]
        if self.seq_len > preset.max_seq_len:
            raise ValueError(
                f"seq_len {self.seq_len} exceeds {self.model}'s max_seq_len {preset.max_seq_len}"
            )


def stage_layers(config: ProfileConfig) -> list[list[int]]:
    """Decoder layer ids of each stage; ValueError when the model has too few layers."""
    n_layers = PRESETS[config.model].n_layers
    k = config.layers_per_stage
    if k is None and config.model == "tiny":
        if config.stages > n_layers:
            raise ValueError(
                f"--stages {config.stages} exceeds tiny's {n_layers} layers (one per stage at least)"
            )
        from tfz.models.llama import split_layers

        return split_layers(n_layers, config.stages)
    k = 1 if k is None else k
    if config.stages * k > n_layers:
        raise ValueError(
            f"--stages {config.stages} x --layers-per-stage {k} = {config.stages * k} layers exceeds "
            f"{config.model}'s {n_layers} layers"
        )
    return [list(range(s * k, (s + 1) * k)) for s in range(config.stages)]


def _stage_shapes(config: ProfileConfig):
    """(model shape, layer ids per stage) that :func:`profile_model` builds."""
    layers = stage_layers(config)
    cfg = PRESETS[config.model]
    cfg = cfg.with_(n_layers=sum(len(ids) for ids in layers), vocab_size=config.vocab_size or cfg.vocab_size)
    return cfg, layers


def estimate_bytes(config: ProfileConfig) -> tuple[int, int, int]:
    """(host bytes, device bytes, parameters) of the largest stage :func:`profile_model` measures: a
    lower bound from the shapes alone, so a configuration over it cannot fit. The stage is built in
    float32 on the host; on the device it holds its weights and their gradients in ``dtype``, ten
    [B, L, dim] tensors and three [B, L, ffn_dim] tensors per layer saved by a forward, and, on the
    last stage, the logits with their float32 loss and gradient."""
    cfg, layers = _stage_shapes(config)
    size = DTYPES[config.dtype].itemsize
    B, L, D = config.microbatch_size, config.seq_len, cfg.dim
    kv = cfg.n_kv_heads * cfg.head_dim
    per_layer = 2 * D * D + 2 * D * kv + 3 * D * cfg.ffn_dim + 2 * D
    act_layer = B * L * (10 * D + 3 * cfg.ffn_dim) * size
    host = device = largest = 0
    for s, ids in enumerate(layers):
        first, last = s == 0, s == len(layers) - 1
        embed = cfg.vocab_size * D
        params = len(ids) * per_layer + (embed if first else 0) + (embed + D if last else 0)
        acts = len(ids) * act_layer + (B * L * cfg.vocab_size * (size + 8) if last else 0)
        host = max(host, params * 4)
        device = max(device, params * 2 * size + acts)
        largest = max(largest, params)
    return host, device, largest


def host_memory() -> int:
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(config: ProfileConfig, host: int, device: int | None = None, where: str = "cpu") -> None:
    """ValueError naming the sizes when :func:`estimate_bytes` exceeds ``host`` bytes of host memory
    or ``device`` bytes of ``where``'s memory (None: the device is the host)."""
    need_host, need_device, params = estimate_bytes(config)
    if device is None:
        need_host, device = max(need_host, need_device), host
    for need, have, name in ((need_host, host, "host"), (need_device, device, where)):
        if need > have:
            vocab = config.vocab_size or PRESETS[config.model].vocab_size
            raise ValueError(
                f"{config.model} with {config.stages} stages, microbatch {config.microbatch_size} x "
                f"{config.seq_len} tokens, vocab {vocab:,}: the largest stage ({params:.3g} parameters) "
                f"needs at least {_gb(need)} of {name} memory, which has {_gb(have)}"
            )


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def _all_frozen(module: nn.Module) -> StageMasks:
    units = StageUnits.from_module(module, include_tensors=True)
    return StageMasks(units=units, ratio=1.0, frozen=np.ones(len(units), dtype=bool))


def measure_stage(
    module: nn.Module,
    x: torch.Tensor,
    *,
    first: bool,
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    timer: ActionTimer,
    warmup: int = 2,
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """Median milliseconds of F, I, W, W_frozen, B, B_frozen of one stage (see the module docstring).

    Args:
        module: the stage (its linear layers FreezableLinear to defer / mask dW).
        x: the stage input ([B, L] token ids on stage 0, [B, L, D] hidden states otherwise).
        first: stage 0 (no input gradient; I does nothing, W is the full backward).
        loss_fn: ``output -> scalar loss`` for the last stage; other stages get a fixed random dY.
        timer: times every action (its device decides host or CUDA-event timing).
        seed: of the random output gradient dY.
    """
    need = 2 * len(_KINDS)  # one start and one end record per action of a repetition
    capacity = getattr(timer, "capacity", None)  # None: a stand-in without a record pool
    if capacity is not None and capacity < need:
        raise ValueError(f"timer capacity {capacity} is below the {need} records one repetition takes")
    if not first:
        x = x.detach().requires_grad_(True)
    params = StageParams(module)
    open_plan = MaskPlan(None, params)
    frozen_plan = MaskPlan(_all_frozen(module), params)
    store = WeightGradStore()
    dy = None

    def forward():
        nonlocal dy
        out = module(x)
        if loss_fn is not None:
            return loss_fn(out), None  # a bare loss, as torch hands the last stage's backward
        if dy is None:
            gen = torch.Generator().manual_seed(seed)
            dy = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype)
        return (out,), (dy,)

    def split(plan, w_name: str, record_input: bool) -> None:
        outs, grads = forward()
        if first:
            if record_input:
                with timer.action("I"):
                    pass  # the runtime's stage-0 I: nothing
            with timer.action(w_name):
                full_backward(outs, grads, [x], plan, params)
            return
        with timer.action("I") if record_input else nullcontext():
            input_backward(outs, grads, [x], plan, params, store, (0, 0))
        with timer.action(w_name):
            weight_backward(plan, store, (0, 0))

    def full(plan, name: str) -> None:
        outs, grads = forward()
        with timer.action(name):
            full_backward(outs, grads, [x], plan, params)

    samples: dict[str, list[float]] = {k: [] for k in _KINDS}
    for rep in range(warmup + repeats):
        with timer.action("F"):
            outs, grads = forward()
        del outs, grads
        split(open_plan, "W", True)
        full(open_plan, "B")
        split(frozen_plan, "W_frozen", False)
        full(frozen_plan, "B_frozen")
        spans = timer.collect_spans()
        other = next((span.name for span in spans if span.name not in samples), None)
        if other is not None:
            raise ValueError(
                f"timer holds action {other!r}, which measure_stage did not time: give it a timer of "
                "its own, or collect() the timer first"
            )
        if rep >= warmup:
            for span in spans:
                samples[span.name].append(span.duration_ms)
    missing = next((k for k, v in samples.items() if not v), None)
    if missing is not None:
        raise ValueError(f"timer recorded no {missing} time (a full timer drops actions): raise its capacity")
    times = {k: statistics.median(v) for k, v in samples.items()}
    times["W_frozen"] = min(times["W_frozen"], times["W"])
    times["B_frozen"] = min(times["B_frozen"], times["B"])
    return times


def device_memory(name: str) -> int | None:
    """Bytes of memory of device ``name`` ("cuda[:N]"; None for "cpu", the host); ValueError when
    the device does not exist here."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise ValueError(f"device must be cpu or cuda[:N], got {short_repr(name)}")
    if name == "cpu":
        return None
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available on this machine")
    index = int(name.partition(":")[2] or torch.cuda.current_device())
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), 0-{count - 1}")
    return torch.cuda.get_device_properties(index).total_memory


def _device(name: str) -> torch.device:
    device_memory(name)
    return torch.device(name)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return "cpu"


def profile_model(config: ProfileConfig, progress: Callable[[str], None] | None = None) -> Profile:
    """Build each stage of ``config.model`` in turn on ``config.device``, measure it, free it.

    ``progress`` gets one line per stage. Raises ValueError before building anything when the
    largest stage needs more memory than the host or device has (:func:`check_memory`). Returns the
    :class:`tfz.profile.Profile` (meta records the model, shapes, device, dtype, torch version,
    warmup and repeats).
    """
    if not isinstance(config, ProfileConfig):
        raise TypeError(f"config must be a ProfileConfig, got {type(config).__name__}")
    check_memory(config, host_memory(), device_memory(config.device), config.device)
    device = _device(config.device)
    cfg, layers = _stage_shapes(config)
    dtype = DTYPES[config.dtype]
    timer = ActionTimer(device if device.type == "cuda" else "cpu")
    gen = torch.Generator().manual_seed(config.seed)
    B, L = config.microbatch_size, config.seq_len
    stages: dict[int, StageTimes] = {}
    for s in range(config.stages):
        module = build_stages(
            cfg, config.stages, stage_ids=[s], layers=layers, seed=config.seed, dtype=dtype
        )[s]
        module = convert_to_freezable(module.to(device))
        first, last = s == 0, s == config.stages - 1
        if first:
            x = torch.randint(0, cfg.vocab_size, (B, L), generator=gen).to(device)
        else:
            x = torch.randn(B, L, cfg.dim, generator=gen).to(device=device, dtype=dtype)
        loss_fn = None
        if last:
            target = torch.randint(0, cfg.vocab_size, (B * L,), generator=gen).to(device)

            def loss_fn(out, target=target):
                return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), target)

        t = measure_stage(
            module, x, first=first, loss_fn=loss_fn, timer=timer, warmup=config.warmup, repeats=config.repeats
        )
        stages[s] = StageTimes(
            f=t["F"],
            i=t["I"],
            w=t["W"],
            w_frozen=t["W_frozen"],
            b=t["B"],
            b_frozen=t["B_frozen"],
            where=f"stage {s}",
        )
        if progress is not None:
            progress(
                f"stage {s + 1}/{config.stages} (layers {layers[s][0]}-{layers[s][-1]}): "
                + ", ".join(f"{k} {t[k]:.3f}" for k in _KINDS)
                + " ms"
            )
        del module, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    from tfz import __version__

    meta = {
        "model": config.model,
        "stages": config.stages,
        "layers_per_stage": [len(ids) for ids in layers],
        "microbatch_size": B,
        "seq_len": L,
        "dim": cfg.dim,
        "ffn_dim": cfg.ffn_dim,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        "dtype": config.dtype,
        "device": _device_name(device),
        "timer": timer.backend,
        "torch": torch.__version__,
        "tfz": __version__,
        "warmup": config.warmup,
        "repeats": config.repeats,
        "statistic": "median",
        "python": sys.version.split()[0],
    }
    return Profile(stages=stages, meta=meta)
