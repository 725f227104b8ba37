"""How much of each ``tfz demo`` stage's work freezing can remove, and what that allows at the cap.

Builds the demo's stages (``tfz.demo.worker.build_model``: FreezableLinear decoder layers, the output
layer trained on every microbatch unless ``--output-layer freezable``) and times one microbatch's
forward and backward per stage, one thread as each demo rank, with every FreezableLinear's rows
active, with ``1 - cap`` of them active (a contiguous run, as the demo's arcs) and with none active.
Measurements of all settings take turns in each round; the table gives the medians over rounds and
the spread of the per-round ratios.

- freezable share: (F+B all active - F+B none active) / F+B all active: the weight-gradient work
  that freezing removes, as a fraction of the stage's forward and backward;
- ceiling at the cap: F+B all active / F+B with ``1 - cap`` active: the most a stage gains when
  every microbatch freezes at the cap;
- critical stage: the slowest stage unfrozen against the slowest stage frozen at the cap, the steady
  state of a pipeline that freezes every stage at the cap (no bubbles, no communication);
- FLOP bound: the same share and ceiling counted in the linear layers' FLOPs alone (forward,
  input gradient and weight gradient of each, 2 * in * out per token apiece; the FreezableLinears'
  weight gradients are the freezable part). Attention's own matmuls, norms, activations, the softmax
  and the loss add work that freezing keeps, so on any hardware the measured share and ceiling are
  below these.

    python bench/wgrad_share.py [--rounds 7] [--cap 0.8] [--output-layer trained|freezable]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from tfz.demo.config import OUTPUT_LAYERS, DemoConfig
from tfz.demo.worker import build_model
from tfz.nn import linear_flops, prepare_row_masks, use_row_masks
from tfz.nn.freezable_linear import FreezableLinear


def _masks(module, active: float):
    masks = {}
    for layer in module.modules():
        if isinstance(layer, FreezableLinear):
            mask = torch.zeros(layer.out_features, dtype=torch.bool)
            mask[: int(round(active * layer.out_features))] = True
            masks[layer] = mask
    return prepare_row_masks(masks)


def _step(module, x, target, masks) -> float:
    """Seconds of one forward and backward of ``module`` under ``masks`` (dW added into .grad)."""
    start = time.perf_counter()
    with use_row_masks(masks, in_place=True):
        out = module(x)
        if target is None:
            out.backward(torch.ones_like(out))
        else:
            F.cross_entropy(out.flatten(0, 1), target.flatten()).backward()
    return time.perf_counter() - start


def measure(modules: dict, cfg: DemoConfig, cap: float, rounds: int) -> dict[int, dict[str, np.ndarray]]:
    """Per stage of ``modules`` (the demo's two stages): seconds per round of F+B with every row
    active (``all``), ``1 - cap`` active (``cap``) and none active (``none``)."""
    torch.set_num_threads(cfg.threads_per_rank)
    g = torch.Generator().manual_seed(0)
    shape = (cfg.microbatch_size, cfg.seq_len)
    tokens = torch.randint(0, cfg.vocab_size, shape, generator=g)
    hidden = torch.randn(*shape, cfg.dim, generator=g, requires_grad=True)
    inputs = {0: (tokens, None), 1: (hidden, tokens)}
    settings = {"all": 1.0, "cap": 1.0 - cap, "none": 0.0}
    masks = {s: {k: _masks(m, a) for k, a in settings.items()} for s, m in modules.items()}
    times = {s: {k: [] for k in settings} for s in modules}
    for r in range(rounds + 1):  # round 0 warms up
        for s, module in modules.items():
            for k in settings:
                t = np.median([_step(module, *inputs[s], masks[s][k]) for _ in range(5)])
                if r:
                    times[s][k].append(t)
    return {s: {k: np.array(v) for k, v in t.items()} for s, t in times.items()}


def table(times: dict[int, dict[str, np.ndarray]], cap: float, flops: dict[int, tuple[int, int]]) -> str:
    """Markdown of ``times`` (from :func:`measure`) beside the FLOP bound of ``flops`` (per stage,
    from :func:`tfz.nn.linear_flops`)."""

    def spread(ratios: np.ndarray, fmt: str) -> str:
        return f"{np.median(ratios):{fmt}} ({ratios.min():{fmt}}-{ratios.max():{fmt}})"

    lines = [
        f"| stage | F+B all active (ms) | F+B at cap {cap} (ms) | F+B none active (ms) | freezable share | "
        "ceiling at the cap | FLOP bound: share | FLOP bound: ceiling |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, t in times.items():
        share = (t["all"] - t["none"]) / t["all"]
        ceiling = t["all"] / t["cap"]
        cells = [f"{np.median(t[k]) * 1e3:.1f}" for k in ("all", "cap", "none")]
        freezable, total = flops[s]
        bound = f"{freezable / total:.3f} | {total / (total - cap * freezable):.3f}x"
        lines.append(
            f"| {s} | {' | '.join(cells)} | {spread(share, '.3f')} | {spread(ceiling, '.3f')}x | {bound} |"
        )
    slowest = {k: np.max([t[k] for t in times.values()], axis=0) for k in ("all", "cap")}
    critical = spread(slowest["all"] / slowest["cap"], ".3f")
    unfrozen = max(total for _, total in flops.values())
    frozen = max(total - cap * freezable for freezable, total in flops.values())
    lines.append(
        f"\ncritical stage, unfrozen against frozen at the cap: {critical}x (median over rounds, min-max); "
        f"FLOP bound {unfrozen / frozen:.3f}x"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cap", type=float, default=DemoConfig().max_freeze_ratio)
    parser.add_argument("--output-layer", choices=OUTPUT_LAYERS, default=DemoConfig().output_layer)
    args = parser.parse_args()
    cfg = DemoConfig(output_layer=args.output_layer)
    print(
        f"demo stages, output layer {cfg.output_layer}, microbatch {cfg.microbatch_size} x {cfg.seq_len} "
        f"tokens, {cfg.threads_per_rank} thread(s) each, torch {torch.__version__}, {args.rounds} rounds"
    )
    modules = build_model(cfg, 2, [0, 1], seed=0)
    flops = {s: linear_flops(m) for s, m in modules.items()}
    print(table(measure(modules, cfg, args.cap, args.rounds), args.cap, flops))


if __name__ == "__main__":
    main()
