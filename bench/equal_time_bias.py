"""How far a straight line between validation points sits from the loss curve of ``tfz demo`` runs.

Leaves out each evaluation after ``--from-step`` (not the first two or the last) of every method and
seed, predicts it from the points beside it (linear, and shape-preserving cubic for comparison), and
prints the mean and RMS of (prediction / measured - 1). A positive mean is a line above the curve:
read there, the reference's loss at another method's end looks worse than it was.

    python bench/equal_time_bias.py docs/demo/report.json [more report.json ...] [--from-step 40]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy.interpolate import PchipInterpolator


def leave_one_out(report: dict, from_step: int) -> dict[str, list[float]]:
    errors: dict[str, list[float]] = {"linear": [], "pchip": []}
    for seed in report["per_seed"]:
        for method in seed["methods"].values():
            evals = method["evals"]
            t = [e["wall_time_s"] for e in evals]
            v = [e["val_loss"] for e in evals]
            for k in range(2, len(evals) - 1):
                if evals[k]["step"] < from_step:
                    continue
                tt, vv = t[:k] + t[k + 1 :], v[:k] + v[k + 1 :]
                errors["linear"].append(float(np.interp(t[k], tt, vv)) / v[k] - 1)
                errors["pchip"].append(float(PchipInterpolator(tt, vv)(t[k])) / v[k] - 1)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+")
    parser.add_argument("--from-step", type=int, default=0)
    args = parser.parse_args()
    total: dict[str, list[float]] = {"linear": [], "pchip": []}
    for path in args.reports:
        with open(path) as f:
            for name, errs in leave_one_out(json.load(f), args.from_step).items():
                total[name] += errs
    for name, errs in total.items():
        e = 100 * np.asarray(errs)
        if e.size:
            print(f"{name:7s} n {e.size:3d}  mean {e.mean():+.3f}%  rms {np.sqrt((e**2).mean()):.3f}%")


if __name__ == "__main__":
    main()
