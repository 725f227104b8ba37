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

from tfz._validate import MAX_SEED
from tfz.cli._common import bounded_int, check_output, path_arg, positive_int

__all__ = ["add_arguments", "run"]

MODELS = ("tiny", "llama-1b", "llama-8b")
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
MAX_REPEATS = 10_000
"""Most --repeats and --warmup (``tfz.measure.MAX_REPEATS``; not imported here: it needs torch)."""


def _repeats(low: int):
    return lambda text: bounded_int(text, low, MAX_REPEATS)


def _seed(text: str) -> int:
    return bounded_int(text, 0, MAX_SEED)


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
    r.add_argument(
        "--repeats",
        type=_repeats(1),
        default=5,
        metavar="N",
        help="timed repeats, at most 10,000 (median; 5)",
    )
    r.add_argument(
        "--warmup", type=_repeats(0), default=2, metavar="N", help="untimed repeats first, at most 10,000 (2)"
    )
    r.add_argument("--seed", type=_seed, default=0, help="weights and inputs seed, < 2^32 (0)")
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out",
        required=True,
        type=path_arg,
        metavar="FILE",
        help="profile JSON to write (checked before measuring)",
    )
    out.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    check_output(args.out, "--out", (".json",))
    from tfz.measure import ProfileConfig, check_memory, device_memory, host_memory, profile_model

    device = str(args.device)
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
    # layer counts, the device and the memory the largest stage needs, before anything is built
    check_memory(config, host_memory(), device_memory(device), device)

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
