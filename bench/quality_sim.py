"""Quality of freezing settings without a pipeline: a single-process simulation of ``tfz demo``'s masks.

Model quality does not depend on timing, so one process can train what the demo trains: the same
model (base weights for finetune), data, optimizer, learning-rate schedule and mask providers
(``tfz.demo.worker.make_provider``: TimelyFreeze with one controller for every stage, APF,
AutoFreeze). Each microbatch runs the stages one after another with the runtime's own backward
(``tfz.pipeline.engine.full_backward`` under the provider's masks), so a unit frozen for a
(stage, microbatch) gets no gradient there, exactly as in the pipeline. The controller is fed
synthetic action times from a fixed per-stage profile (F, B unfrozen, B with every unit frozen;
measured once with ``profile``), linear in the realised frozen fraction: the plan is the same for
every setting and seed, and the simulated batch time of each step (``tfz.dag.simulate``) gives a
simulated wall time.

    python bench/quality_sim.py profile --out bench/quality_profile.json
    python bench/quality_sim.py profile --masked 0.5,0.8 --out bench/quality_profile_masked.json
    python bench/quality_sim.py run --task finetune --seeds 10,11,12 --split tune \\
        --variant cover --variant "rescale_off:rescale_grads=False" --out runs.jsonl
    python bench/quality_sim.py table runs.jsonl

A variant is ``NAME[:key=value,...]``: DemoConfig fields (``max_freeze_ratio=0.7``, ``block_rows=64``,
``rescale_grads=False``, ``mask_layout=cover``), ``method=`` (a demo method, default timelyfreeze)
and ``layout=`` (arcs, cover, independent, nested: TimelyFreeze's masks within a step; default the
config's ``mask_layout``). ``none`` (no freezing) runs once per seed as the reference; it is
evaluated at every step of the run's second half too, so a variant up to 2x faster is compared with
the reference's loss one step from its own end (a line between points ``eval_every`` apart sits
above the convex curve, in the faster variant's favour). Evaluation is on fixed sequences of
``--split`` (``tune``: files held out of both training and the demo's validation set, for choosing
settings; ``val``: the demo's validation set).
Fine-tune rows also record the loss on the base's own corpus (``base_corpus_curve``: what the
fine-tune forgets).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tfz.dag import build_dag, simulate
from tfz.demo import DemoConfig
from tfz.demo.worker import _loss_fn, attach_optimizer, build_model, make_provider, observe, sequence_losses
from tfz.masks import StageMasks, select
from tfz.pipeline.engine import MaskPlan, PlanCache, StageParams, full_backward
from tfz.schedule import KINDS

TUNE_FRACTION = 0.1


@functools.lru_cache(maxsize=4)
def _load(data, corpus):
    from tfz.data import load_corpus

    # the demo's validation files are the same (same seed, same first files); tune files come next
    return load_corpus(data, corpus=corpus, seed=0, tune_fraction=TUNE_FRACTION)


def _corpus(cfg: DemoConfig):
    return _load(cfg.data, cfg.train_corpus)


def _base(cfg: DemoConfig):
    if cfg.task != "finetune":
        return None
    from tfz.demo.base import ensure_base

    return ensure_base(cfg.base_spec(2), progress=lambda m: print(m, file=sys.stderr, flush=True))[0]


class NestedMasks:
    """A TimelyFreeze controller whose masks within a step are nested: one random order per stage and
    decision, microbatch m freezes a first-fit prefix of it for its ratio (the rows a microbatch trains
    are a superset of those of every microbatch with a higher ratio)."""

    def __init__(self, controller):
        self.c = controller
        self._key = None
        self._masks: dict = {}

    def __getattr__(self, name):
        return getattr(self.c, name)

    def masks_for(self, stage: int, mb: int):
        key = (self.c.decision, self.c.phase)
        if key != self._key:
            self._key, self._masks = key, {}
        if (stage, mb) not in self._masks:
            m = self.c.masks_for(stage, mb)
            if m is not None and self.c.phase.value in ("ramp", "stable"):
                ratio = min(1.0, float(self.c.requested_ratios()[self.c._bw[stage, mb]]))
                units = self.c.units[stage]
                # microbatch 0's draw for every microbatch: the same order, a prefix per ratio
                m = select(
                    units, ratio, stage=stage, microbatch=0, step=self.c.decision, seed=self.c.config.seed
                )
                m = m if m.frozen.any() else None
            self._masks[stage, mb] = m
        return self._masks[stage, mb]


def _synthetic_times(dag, profile, provider) -> tuple[dict[str, float], float]:
    """Action times (ms) linear in each B's realised frozen fraction, and the simulated batch time."""
    times = np.zeros(dag.num_actions)
    named = {}
    for i, name in enumerate(dag.names):
        s, mb = int(dag.stage[i]), int(dag.microbatch[i])
        st = profile[s]
        if KINDS[dag.kind[i]] == "F":
            t = st["F"]
        else:
            m = provider.masks_for(s, mb) if provider is not None else None
            frac = 0.0 if m is None else m.frozen_fraction
            t = st["B"] - (st["B"] - st["B_frozen"]) * frac
        times[i] = t
        named[name] = t
    return named, float(simulate(dag, times).makespan)


def train(cfg: DemoConfig, method: str, layout: str | None, seed: int, split: str, profile, corpus, base):
    torch.manual_seed(seed)
    schedule = cfg.build_schedule()
    dag = build_dag(schedule)
    S, M, mbs = schedule.num_stages, cfg.microbatches, cfg.microbatch_size
    modules = build_model(cfg, S, range(S), seed, base)
    controller = {}
    if method.startswith("timelyfreeze"):
        controller = {"async_solve": False}  # the plan takes effect at the same step in every run
        if layout in ("arcs", "cover", "independent"):
            controller["mask_layout"] = layout
    provider = make_provider(method, cfg, schedule, modules, seed, **controller)
    if layout == "nested":
        provider = NestedMasks(provider)
    params = {s: StageParams(m) for s, m in modules.items()}
    optimizer, _, lr_schedule = attach_optimizer(cfg, modules)
    rng = np.random.default_rng([seed, 1])
    xv, yv = (torch.from_numpy(a) for a in corpus.sequences(split, cfg.val_sequences, cfg.seq_len))

    @torch.no_grad()
    def evaluate(x=xv, y=yv):
        out = []
        for lo in range(0, len(x), 64):
            h = x[lo : lo + 64]
            for s in range(S):
                h = modules[s](h)
            out.append(sequence_losses(h, y[lo : lo + 64]))
        return torch.cat(out)

    base_xy = None
    if base is not None:  # the base's own corpus: what fine-tuning forgets
        from tfz.demo.base import BaseSpec

        held = _load(None, BaseSpec.corpus).sequences("val", cfg.val_sequences, cfg.seq_len)
        base_xy = tuple(torch.from_numpy(a) for a in held)

    def evaluate_base():
        return float(evaluate(*base_xy).mean())

    curve = [(0, 0.0, float(evaluate().mean()))]
    base_curve = [] if base_xy is None else [(0, evaluate_base())]
    wall, frozen_log, batch_log = 0.0, [], []
    caches = {s: PlanCache() for s in range(S)}  # keyed by the masks object itself (weakly)
    stale = 0
    for step in range(cfg.steps):
        x, y = (torch.from_numpy(a) for a in corpus.batch("train", M * mbs, cfg.seq_len, rng))
        fr = np.zeros(S)
        for mb in range(M):
            xs, ys = x[mb * mbs : (mb + 1) * mbs], y[mb * mbs : (mb + 1) * mbs]
            inputs, outputs = [], []
            h = xs
            for s in range(S):
                inp = h if s == 0 else h.detach().requires_grad_(True)
                h = modules[s](inp)
                inputs.append(inp)
                outputs.append(h)
            loss = _loss_fn(h, ys) / M
            grad = None
            for s in reversed(range(S)):
                m = provider.masks_for(s, mb) if provider is not None else None
                if m is not None:
                    fr[s] += m.frozen_fraction / M
                plan = caches[s].get(m, params[s])
                if plan.frozen_fraction != (0.0 if m is None else m.frozen_fraction):
                    stale += 1
                out = loss if s == S - 1 else outputs[s]
                (g,) = full_backward(out, None if s == S - 1 else grad, [inputs[s]], plan, params[s])
                grad = g
        optimizer.step()
        lr_schedule.step()
        observe(provider, method, step, modules, cfg)
        optimizer.zero_grad(set_to_none=True)
        timings, batch = _synthetic_times(dag, profile, provider)
        if hasattr(provider, "step_end"):
            provider.step_end(step, timings)
        wall += batch / 1e3
        frozen_log.append(fr.tolist())
        batch_log.append(batch)
        regular = step + 1 in cfg.eval_steps
        if regular or (method == "none" and 2 * (step + 1) >= cfg.steps):
            curve.append((step + 1, wall, float(evaluate().mean())))
            if regular and base_xy is not None:
                base_curve.append((step + 1, evaluate_base()))
    seq = evaluate()
    plan = getattr(provider, "plan", None)
    return {
        "val_loss": float(seq.mean()),
        "seq_loss": seq.tolist(),
        "curve": curve,
        "base_corpus_curve": base_curve,
        "wall_s": wall,
        "frozen_per_step": frozen_log,
        "batch_ms_per_step": batch_log,
        "plan_stage_means": None if plan is None else list(plan.stage_mean_ratio),
        "plan_speedup": None if plan is None else plan.speedup,
        "stale_plans": stale,
    }


def _parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    out = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value.replace("False", "false").replace("True", "true"))
        except json.JSONDecodeError:
            out[key] = value
    return name, out


def cmd_profile(args):
    """Median F, B and B with every unit of the controller (row blocks only) frozen, per stage, each B
    as a step's first microbatch (no ``.grad`` yet). With ``--masked``, every B adds into existing
    grads, as a step's later microbatches do, and B_frozen is the frozen bound the demo's monitoring
    estimates (``tfz.controller.estimates.fit_linear`` over B unfrozen and B under covering masks at
    the ratios of ``--masked``: the masked path's fixed costs included); B with every layer left out
    is kept as ``B_all_frozen``."""
    import statistics

    from tfz.controller.estimates import fit_linear
    from tfz.masks import StageUnits, select_covering

    torch.set_num_threads(1)
    cfg = DemoConfig(task="pretrain", output_layer="freezable", vocab_size=256)  # as recorded
    modules = build_model(cfg, 2, range(2), 0)
    params = {s: StageParams(m) for s, m in modules.items()}
    plans = {"B": {s: MaskPlan(None, params[s]) for s in modules}, "B_frozen": {}}  # kind -> stage -> plan
    level = {"B": 0.0}  # the ratio asked of each kind fitted by --masked
    for s, m in modules.items():
        units = StageUnits.from_module(m, block_rows=cfg.block_rows)
        plans["B_frozen"][s] = MaskPlan(StageMasks(units, 1.0, np.ones(len(units), dtype=bool)), params[s])
        for ratio in args.masked:
            for mb, mask in enumerate(select_covering(units, [ratio] * cfg.microbatches, stage=s)):
                plans.setdefault(f"masked {ratio} {mb}", {})[s] = MaskPlan(mask, params[s])
                level[f"masked {ratio} {mb}"] = ratio
    x = torch.randint(0, 256, (cfg.microbatch_size, cfg.seq_len))
    y = torch.randint(0, 256, (cfg.microbatch_size, cfg.seq_len))
    samples = {(s, k): [] for s in range(2) for k in ("F", "B", "B_frozen")}
    fitted = {s: [] for s in modules}  # (ratio asked, active fraction, ms)
    for rep in range(2 + args.repeats):
        for kind, plan in plans.items():
            t0 = time.perf_counter()
            h0 = modules[0](x)
            t1 = time.perf_counter()
            inp = h0.detach().requires_grad_(True)
            loss = _loss_fn(modules[1](inp), y)
            t2 = time.perf_counter()
            (g,) = full_backward(loss, None, [inp], plan[1], params[1])
            t3 = time.perf_counter()
            full_backward(h0, g, [x], plan[0], params[0])
            t4 = time.perf_counter()
            b_ms = {0: (t4 - t3) * 1e3, 1: (t3 - t2) * 1e3}
            if rep >= 2 and kind in level:
                for st in range(2):
                    fitted[st].append((level[kind], 1.0 - plan[st].frozen_fraction, b_ms[st]))
            if rep >= 2 and kind in ("B", "B_frozen"):
                for st in range(2):
                    samples[st, kind].append(b_ms[st])
                samples[0, "F"].append((t1 - t0) * 1e3)
                samples[1, "F"].append((t2 - t1) * 1e3)
            if not args.masked:  # each B as a step's first microbatch; --masked: as the later ones
                for m in modules.values():
                    m.zero_grad(set_to_none=True)
    profile = [{k: statistics.median(samples[s, k]) for k in ("F", "B", "B_frozen")} for s in range(2)]
    if args.masked:
        for s, row in enumerate(profile):
            lv, active, ms = (np.array(c)[:, None] for c in zip(*fitted[s]))
            row["B_all_frozen"] = row["B_frozen"]
            row["B_frozen"] = float(fit_linear(active, ms, lv)[0][0])  # t = a + b x at x = 0 active
    Path(args.out).write_text(json.dumps(profile, indent=1) + "\n")
    print(json.dumps(profile))


def cmd_run(args):
    torch.set_num_threads(args.threads)
    profile = json.loads(Path(args.profile).read_text())
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [_parse_variant(v) for v in args.variant]
    common = dict(
        task=args.task,
        steps=args.steps,
        val_sequences=args.val_sequences,
        output_layer="freezable",
        vocab_size=256,
    )  # the model of its recorded results
    common.update(_parse_variant("common:" + ",".join(args.set))[1])
    base_cfg = DemoConfig(**common)
    base = _base(base_cfg)
    done = set()
    if Path(args.out).exists():
        for line in Path(args.out).read_text().splitlines():
            r = json.loads(line)
            done.add((r["task"], r["variant"], r["seed"], r["split"], r["steps"]))
    for seed in seeds:
        jobs = ([("none", {})] if not args.no_none else []) + variants
        for name, overrides in jobs:
            if (args.task, name, seed, args.split, args.steps) in done:
                continue
            over = dict(overrides)
            method = over.pop("method", "none" if name == "none" else "timelyfreeze")
            layout = over.pop("layout", None)
            methods = ("none", method) if method != "none" else ("none",)
            cfg = DemoConfig(**{**common, "methods": methods, **over})
            t = time.perf_counter()
            res = train(cfg, method, layout, seed, args.split, profile, _corpus(cfg), base)
            row = {
                "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()},
                "task": args.task,
                "variant": name,
                "overrides": overrides,
                "seed": seed,
                "split": args.split,
                "steps": args.steps,
                "seconds": time.perf_counter() - t,
                **res,
            }
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"{args.task} {name} seed {seed}: val {res['val_loss']:.4f}, "
                f"wall {res['wall_s']:.1f} s (sim), "
                f"plan {res['plan_stage_means']}, {row['seconds']:.0f} s",
                flush=True,
            )


def _interp(curve, t):
    ts = [c[1] for c in curve]
    vs = [c[2] for c in curve]
    if t > ts[-1]:
        return None
    return float(np.interp(t, ts, vs))


def _variant_rows(rs, pairs):
    """Per variant of one study: (name, per-seed rows) of the seeds its reference also ran."""
    refs: dict = {}
    for r in rs:
        refs.setdefault(r["variant"], {})[r["seed"]] = r
    for name in dict.fromkeys(r["variant"] for r in rs):
        ref = refs.get(pairs.get(name, "none"), {})
        mine = sorted((r for r in rs if r["variant"] == name and r["seed"] in ref), key=lambda r: r["seed"])
        if mine:
            yield name, [(r, ref[r["seed"]]) for r in mine]


def _compare(r, base) -> dict:
    """One seed against its reference: relative loss, its paired SE, the loss against the reference's
    at equal simulated time (None past the reference's run), the simulated speedup."""
    d = np.array(r["seq_loss"]) - np.array(base["seq_loss"])
    mean = np.mean(base["seq_loss"])
    at = _interp(base["curve"], r["wall_s"])
    return {
        "rel": d.mean() / mean,
        "se": d.std(ddof=1) / np.sqrt(len(d)) / mean,
        "equal_time": None if at is None else r["val_loss"] / at - 1,
        "speedup": base["wall_s"] / r["wall_s"],
    }


def cmd_table(args):
    groups: dict = {}
    for f in args.files:  # one table per file and setting: a file holds one study
        for line in Path(f).read_text().splitlines():
            r = json.loads(line)
            groups.setdefault((f, r["task"], r["split"], r["steps"]), []).append(r)
    pairs = dict(p.split("=", 1) for p in args.pair)
    studies = []
    for (_, task, split, steps), rs in groups.items():
        seeds = sorted({r["seed"] for r in rs if r["variant"] == "none"})
        title = f"{task}, {steps} steps, evaluated on {split}, seeds {seeds}"
        print(f"\n{title}")
        print(
            "| variant | val loss vs none (mean, per seed) | paired SE | vs none at equal sim. time "
            "| sim. speedup | plan stage means |"
        )
        print("|---|---|---|---|---|---|")
        points = []
        for name, runs in _variant_rows(rs, pairs):
            cs = [_compare(r, base) for r, base in runs]
            rel = [c["rel"] for c in cs]
            eqs = [c["equal_time"] for c in cs if c["equal_time"] is not None]
            plan = runs[0][0]["plan_stage_means"]
            print(
                f"| {name} | {np.mean(rel):+.2%} ({', '.join(f'{v:+.2%}' for v in rel)}) | "
                f"{np.sqrt(np.sum(np.square([c['se'] for c in cs]))) / len(cs):.2%} | "
                f"{(f'{np.mean(eqs):+.2%}' if eqs else '-')} | {np.mean([c['speedup'] for c in cs]):.3f}x | "
                f"{'-' if plan is None else ' '.join(f'{p:.2f}' for p in plan)} |"
            )
            points.append((name, cs))
        studies.append((title, points))
    if args.png:
        _tradeoff_png(args.png, studies)
        print(f"\nwrote {args.png}")


def _tradeoff_png(path, studies):
    """Speedup against the loss behind the reference at equal simulated time, one panel per study:
    a dot per seed, a ring at each variant's mean."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4 * len(studies), 4.8))
    FigureCanvasAgg(fig)
    for i, (title, points) in enumerate(studies):
        ax = fig.add_subplot(1, len(studies), i + 1)
        for name, cs in points:
            seeds = [(c["speedup"], 100 * c["equal_time"]) for c in cs if c["equal_time"] is not None]
            if not seeds:
                continue
            xs, ys = zip(*seeds)
            dots = ax.scatter(xs, ys, s=12, alpha=0.5)
            mean = (np.mean(xs), np.mean(ys))
            ax.scatter(*mean, s=70, facecolors="none", edgecolors=dots.get_facecolor())
            ax.annotate(name, mean, textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("simulated speedup over the reference")
        ax.set_ylabel("val loss vs reference at equal simulated time (%)")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("profile")
    pr.add_argument("--out", default="bench/quality_profile.json")
    pr.add_argument("--repeats", type=int, default=7)
    pr.add_argument(
        "--masked",
        type=lambda v: [float(r) for r in v.split(",")],
        default=[],
        help="RATIOS, e.g. 0.5,0.8: fit B_frozen from covering masks at these ratios (see cmd_profile)",
    )
    r = sub.add_parser("run")
    r.add_argument("--task", choices=("finetune", "pretrain"), default="finetune")
    r.add_argument("--seeds", default="10,11,12")
    r.add_argument("--split", choices=("tune", "val"), default="tune")
    r.add_argument("--steps", type=int, default=100)
    r.add_argument("--val-sequences", type=int, default=256)
    r.add_argument("--variant", action="append", default=[])
    r.add_argument("--set", action="append", default=[], help="KEY=VALUE: DemoConfig field for every run")
    r.add_argument("--no-none", action="store_true")
    r.add_argument("--profile", default="bench/quality_profile.json")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", required=True)
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    t.add_argument(
        "--pair",
        action="append",
        default=[],
        help="VARIANT=REFERENCE: compare VARIANT with REFERENCE, not none",
    )
    t.add_argument("--png", help="also draw speedup against the loss at equal time (one panel per study)")
    args = p.parse_args(argv)
    {"profile": cmd_profile, "run": cmd_run, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
