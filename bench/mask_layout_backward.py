"""B of the demo's last stage under each mask layout, the variants alternating in one process.

Run: ``python bench/mask_layout_backward.py [--rounds 40]``

The demo's last stage (``bench_nn.demo_last_stage``: two LLaMA layers at dim 384 and the LM head, 15
FreezableLinears, 4 x 64 tokens, 32-row blocks), 1 thread, grads accumulated as the pipeline's B
actions do. Variants: no row frozen, every row frozen, and the masks of 4 steps x 8 microbatches at
ratios 0.5 and 0.8 drawn by ``tfz.masks.select_covering`` (scattered blocks) and
``tfz.masks.select_row_arcs`` (one run of rows per layer), taken in turn. Each round runs every
variant once, in an order reversed every other round, so the machine's drift falls on all of them.
Prints each variant's median and its excess over the line through the unfrozen and all-frozen
medians (what a B linear in its frozen fraction takes).
"""

import argparse
import time

from bench_nn import all_frozen, alternating_medians, demo_last_stage

from tfz.masks import select_covering, select_row_arcs

LAYOUTS = {"cover": select_covering, "arcs": select_row_arcs}
RATIOS = (0.5, 0.8)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args(argv)
    units, plan, forward, run_b = demo_last_stage()
    masks = {0.0: [None], 1.0: [all_frozen(units)]}
    variants = {"unfrozen": 0.0, "all frozen": 1.0}
    for r in RATIOS:
        for name, draw in LAYOUTS.items():
            variants[f"{name} {r}"] = (name, r)
            masks[name, r] = [m for step in range(4) for m in draw(units, [r] * 8, stage=1, step=step)]
    plans = {k: [plan(m) for m in masks[key]] for k, key in variants.items()}

    def backward(name: str, i: int) -> float:
        loss, inp = forward()
        t = time.perf_counter()
        run_b(loss, inp, plans[name][i % len(plans[name])])
        return time.perf_counter() - t

    names = list(plans)
    for name in names:  # grads exist from here on
        backward(name, 0)
    med, _ = alternating_medians(backward, names, args.rounds)
    lo, hi = med["all frozen"], med["unfrozen"]
    print(f"{'variant':<12} {'median ms':>10} {'linear ms':>10} {'excess ms':>10}")
    for name, key in variants.items():
        r = key if isinstance(key, float) else key[1]
        line = hi - r * (hi - lo)
        print(f"{name:<12} {med[name]:>10.2f} {line:>10.2f} {med[name] - line:>+10.2f}")


if __name__ == "__main__":
    main()
