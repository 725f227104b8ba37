"""B of the demo's last stage with nothing frozen: torch's backward against tfz's, alternating in one process.

Run: ``python bench/accumulate_backward.py [--rounds 60]``

The demo's last stage (``bench_nn.demo_last_stage``: two LLaMA layers at dim 384 and the LM head, 15
linear layers, 4 x 64 tokens), 1 thread, every B adding into grads that already exist (a step's
later microbatches). Variants:

- ``nn.Linear``: plain linear layers, autograd's backward (a fresh dW per layer, then added);
- ``FreezableLinear, torch``: ``loss.backward()`` with no tfz context, what the demo's no-freezing
  runs execute (torch's own pipelining backward);
- ``FreezableLinear, tfz B``: the freeze-aware stage's B with no masks (``full_backward``), where
  each layer's GEMM accumulates into its ``.grad`` (``use_row_masks(..., in_place=True)``).

Each round runs every variant once, in an order reversed every other round. Prints medians and
ratios to ``nn.Linear``.
"""

import argparse
import time

from bench_nn import alternating_medians, demo_last_stage


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=60)
    args = p.parse_args(argv)
    _, plain_plan, plain_forward, plain_b = demo_last_stage(plain=True)
    _, plan, forward, tfz_b = demo_last_stage()
    unmasked, plain_unmasked = plan(None), plain_plan(None)

    def torch_b(loss, inp):
        loss.backward()

    variants = {
        "nn.Linear": (plain_forward, lambda loss, inp: plain_b(loss, inp, plain_unmasked)),
        "FreezableLinear, torch": (forward, torch_b),
        "FreezableLinear, tfz B": (forward, lambda loss, inp: tfz_b(loss, inp, unmasked)),
    }

    def backward(name: str, i: int = 0) -> float:
        fwd, run_b = variants[name]
        loss, inp = fwd()
        t = time.perf_counter()
        run_b(loss, inp)
        return time.perf_counter() - t

    names = list(variants)
    for name in names * 2:  # grads exist from here on
        backward(name)
    med, times = alternating_medians(backward, names, args.rounds)
    print(f"{'variant':<24} {'median ms':>10} {'min ms':>8} {'/ nn.Linear':>12}")
    for name, v in times.items():
        print(f"{name:<24} {med[name]:>10.2f} {min(v) * 1e3:>8.2f} {med[name] / med['nn.Linear']:>12.3f}")


if __name__ == "__main__":
    main()
