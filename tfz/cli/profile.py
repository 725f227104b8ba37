"""Measure per-stage F/I/W times of a model on one device and write a tfz-profile JSON.

The stages of --model run one after another on --device, each through the same backward code as the
freeze-aware pipeline runtime, unfrozen and with everything frozen; the medians (ms) per stage go to
--out, which `tfz plan --profile` and `tfz simulate --profile` read. One device thus predicts a
pipeline over --stages devices (communication is not measured).

tiny (8 layers, dim 256) runs on CPU in seconds. llama-1b / llama-8b use those models' layer shapes
with --layers-per-stage decoder layers per stage (default 1); stage 0 holds the embedding and the
last stage the output projection, both with --vocab-size rows (default: the preset's 128256; pass a
smaller one if they do not fit in memory).
"""

from __future__ import annotations

import argparse
import sys

from tfz.cli import UsageError
from tfz.cli._common import positive_int

__all__ = ["add_arguments", "run"]

MODELS = ("tiny", "llama-1b", "llama-8b")
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("model")
    m.add_argument("--model", default="tiny", choices=MODELS, help="model shapes (default tiny)")
    m.add_argument("--stages", required=True, type=positive_int, metavar="S", help="pipeline stages (>= 1)")
    m.add_argument(
        "--layers-per-stage",
        type=positive_int,
        default=None,
        metavar="K",
        help="decoder layers per stage (default: tiny splits its 8 layers, llama-* use 1)",
    )
    m.add_argument(
        "--microbatch-size", type=positive_int, default=1, metavar="B", help="sequences per microbatch"
    )
    m.add_argument("--seq-len", type=positive_int, default=128, metavar="L", help="tokens per sequence (128)")
    m.add_argument(
        "--vocab-size", type=positive_int, default=None, metavar="V", help="embedding/output rows (preset's)"
    )
    r = parser.add_argument_group("measurement")
    r.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    r.add_argument(
        "--dtype", default="float32", choices=DTYPE_CHOICES, help="parameter dtype (default float32)"
    )
    r.add_argument("--repeats", type=positive_int, default=5, metavar="N", help="timed repeats (median; 5)")
    r.add_argument(
        "--warmup", type=_nonnegative_int, default=2, metavar="N", help="untimed repeats first (2)"
    )
    r.add_argument("--seed", type=_nonnegative_int, default=0, help="weights and inputs seed (0)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", required=True, metavar="FILE", help="profile JSON to write")
    out.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    device = str(args.device)
    if device.split(":")[0] not in ("cpu", "cuda") or (device.startswith("cpu") and device != "cpu"):
        raise UsageError(f"--device must be cpu or cuda[:N], got {device!r}")
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} requested but CUDA is not available on this machine")

    from tfz.measure import ProfileConfig, profile_model

    config = ProfileConfig(
        model=args.model,
        stages=args.stages,
        layers_per_stage=args.layers_per_stage,
        microbatch_size=args.microbatch_size,
        seq_len=args.seq_len,
        vocab_size=args.vocab_size,
        device=device,
        dtype=args.dtype,
        warmup=args.warmup,
        repeats=args.repeats,
        seed=args.seed,
    )
    from tfz.measure import stage_layers

    stage_layers(config)  # layer-count errors before anything is built

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    progress(
        f"profiling {args.model}: {args.stages} stages, microbatch {args.microbatch_size} x {args.seq_len} "
        f"tokens, {args.dtype} on {device}"
    )
    profile = profile_model(config, progress)
    profile.save(args.out)
    print(f"wrote {args.out}")
    return 0
