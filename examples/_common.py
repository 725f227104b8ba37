"""What every example shares: start the ranks, train with TimelyFreeze, check gradients, report.

- :func:`main` parses the common flags and runs ``run(rank, world, args)`` on 2 spawned ranks
  (:func:`tfz.pipeline.launch`), or on torchrun's processes when ``RANK`` / ``WORLD_SIZE`` are set
  (:func:`tfz.pipeline.run_from_env`): the same script works both ways.
- :func:`train` is the training loop of README's pipeline snippet, plus, with ``--check-grads``, a
  gradient check at every step against plain float64 autograd on the whole model, with each
  (stage, microbatch)'s gradient masked exactly like the freezing TimelyFreeze applied there.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tfz.controller import TimelyFreeze, TimelyFreezeConfig
from tfz.optim import attach_row_freezing
from tfz.pipeline import launch, run_from_env
from tfz.timing import ActionTimer

RTOL = 1e-4
"""Gradient check: max |pipeline - reference| <= RTOL * max |reference| per tensor (float32 vs float64)."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def parser(description: str, steps: int = 60) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=positive_int, default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument("--no-freeze", action="store_true", help="train without TimelyFreeze")
    p.add_argument("--check-grads", action="store_true", help="check every step's gradients (float64)")
    p.add_argument("--json", help="write the per-step record and the summary to this file")
    return p


def parse(p: argparse.ArgumentParser, only_world: int | None = None) -> argparse.Namespace:
    """``p.parse_args()``, refusing in one line what would fail only after the ranks started: too few
    --steps for TimelyFreeze's phases, a --json path that cannot be written, and under torchrun a number
    of ranks other than ``only_world`` (None: any)."""
    args = p.parse_args()
    if not args.no_freeze and _too_short(args.steps):
        need = next(n for n in range(args.steps + 1, 10**6) if not _too_short(n))
        p.error(f"--steps {args.steps} is too short for TimelyFreeze's phases: use >= {need} or --no-freeze")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json):
            p.error(f"--json {args.json} is a folder: name a file")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            p.error(f"--json {args.json}: folder {folder} does not exist or is not writable")
    world = os.environ.get("WORLD_SIZE")
    if only_world is not None and "RANK" in os.environ and world != str(only_world):
        p.error(
            f"{p.prog} runs on exactly {only_world} ranks, got WORLD_SIZE={world} (torchrun --nproc-per-node)"
        )
    return args


def _too_short(steps: int) -> bool:
    try:
        TimelyFreezeConfig.for_run(total_steps=steps)
    except ValueError:
        return True
    return False


def main(run: Callable, args: argparse.Namespace, world: int = 2) -> dict:
    """Run ``run(rank, world, args)`` on every rank; rank 0 prints the summary (and writes --json)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        result = run_from_env(run, args, backend="gloo", init_timeout=600)
        if int(os.environ["RANK"]) != 0:
            return result
    else:
        result = launch(run, world, args, timeout=1800, init_timeout=600)[0]
    print(summary_text(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def timelyfreeze(args, schedule, modules: dict[int, nn.Module], **overrides) -> TimelyFreeze | None:
    """README's one line for a short run (rows frozen in blocks of 16 unless ``overrides`` say
    otherwise), None with ``--no-freeze``."""
    if args.no_freeze:
        return None
    config = TimelyFreezeConfig.for_run(total_steps=args.steps, **{"block_rows": 16, **overrides})
    return TimelyFreeze(config, schedule, modules, group=dist.group.WORLD)


# ---------------------------------------------------------------- masked float64 reference


def _multiplier(masks, name: str, like: torch.Tensor) -> torch.Tensor | None:
    """How freezing scales the gradient of parameter ``name`` (None: the whole tensor is frozen)."""
    if masks is None:
        return torch.ones_like(like)
    if name in masks.frozen_tensors:
        return None
    layer, _, kind = name.rpartition(".")
    rows = masks.active_rows.get(layer)
    if rows is None:
        return torch.ones_like(like)
    if not rows.any():
        return None
    keep = torch.from_numpy(rows.astype(np.float64))
    return keep[:, None].expand_as(like) if kind == "weight" else keep


@dataclass
class Reference:
    """Plain float64 copies of every stage module, run one after another: the whole model.

    ``modules``: stage -> module with the same parameter names as the pipeline's stage module.
    """

    modules: dict[int, nn.Module]
    loss_fn: Callable

    def load(self, states: dict[int, dict]) -> None:
        for s, state in states.items():
            self.modules[s].load_state_dict({k: v.double() for k, v in state.items()})

    def grads(self, xs, ys, masks: dict, stages) -> dict[int, dict[str, torch.Tensor | None]]:
        """Per local stage, the pipeline's expected gradients: the sum over microbatches of
        d loss_mb / d param masked like ``masks[(stage, mb)]`` (a StageMasks, or absent / None for no
        freezing), divided by the number of microbatches."""
        sums = {s: dict.fromkeys(n for n, _ in self.modules[s].named_parameters()) for s in stages}
        for mb, (x, y) in enumerate(zip(xs, ys)):
            h = x if not torch.is_floating_point(x) else x.double()
            for s in sorted(self.modules):
                h = self.modules[s](h)
            loss = self.loss_fn(h, y)
            for s in stages:
                named = list(self.modules[s].named_parameters())
                grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
                for (name, _), g in zip(named, grads):
                    keep = None if g is None else _multiplier(masks.get((s, mb)), name, g)
                    if keep is not None:
                        sums[s][name] = g * keep if sums[s][name] is None else sums[s][name] + g * keep
        return {s: {n: (None if g is None else g / len(xs)) for n, g in d.items()} for s, d in sums.items()}


def compare(modules: dict[int, nn.Module], expected: dict) -> float:
    """Max over tensors of |pipeline grad - reference| / max |reference|; raises when a gradient is
    missing, present where every microbatch froze the tensor, or off by more than RTOL."""
    worst = 0.0
    for s, ref in expected.items():
        for name, p in modules[s].named_parameters():
            where = f"stage {s} {name}"
            if ref[name] is None:
                if p.grad is not None and p.grad.abs().max() > 0:
                    raise AssertionError(f"{where}: frozen in every microbatch but has a gradient")
                continue
            if p.grad is None:
                raise AssertionError(f"{where}: gradient missing")
            scale = float(ref[name].abs().max()) or 1.0
            err = float((p.grad.double() - ref[name]).abs().max()) / scale
            if err > RTOL:
                raise AssertionError(f"{where}: gradient off by {err:.2e} of its largest entry")
            worst = max(worst, err)
    return worst


def gather_states(modules: dict[int, nn.Module]) -> dict[int, dict]:
    """Every rank's stage state dicts, on every rank."""
    local = {s: {k: v.detach().clone() for k, v in m.state_dict().items()} for s, m in modules.items()}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {s: state for part in parts for s, state in part.items()}


# ---------------------------------------------------------------- training loop


@dataclass
class Pipeline:
    """One rank's part of a pipeline, ready to train."""

    schedule: object
    """The tfz schedule (:class:`tfz.schedule.Schedule`)."""
    torch_schedule: object
    """The torch schedule object that runs this rank's stages."""
    stages: list
    """This rank's freeze-aware torch stages."""
    modules: dict[int, nn.Module]
    """This rank's stage modules, by stage index."""
    controller: TimelyFreeze | None
    timer: ActionTimer
    lr: float = 3e-3
    loss_scale: float = 1.0
    """The torch schedule's per-microbatch losses times this are the model's loss (torchtitan's loss
    divides by the microbatch count, since its schedule sums the microbatches)."""
    records: list = field(default_factory=list)


def train(pipe: Pipeline, args, batch: Callable[[int], tuple], microbatches: int, reference=None) -> dict:
    """README's training loop; returns this rank's record (rank 0: everyone's, with the summary)."""
    rank = dist.get_rank()
    sched = pipe.schedule
    first, last = 0 in pipe.modules, sched.num_stages - 1 in pipe.modules
    params = nn.ModuleDict({str(s): m for s, m in pipe.modules.items()})
    optimizer = torch.optim.AdamW(params.parameters(), lr=pipe.lr, weight_decay=0.01)
    attach_row_freezing(optimizer, params)
    controller = pipe.controller
    for step in range(args.steps):
        x, y = batch(step)
        had_plan = controller is not None and controller.plan is not None
        phase = "no freezing" if controller is None else controller.phase.value
        masks = {}
        if controller is not None:
            masks = {(s, mb): controller.masks_for(s, mb) for s in pipe.modules for mb in range(microbatches)}
        losses: list = []
        start = time.perf_counter()
        pipe.torch_schedule.step(
            *((x,) if first else ()), **({"target": y, "losses": losses} if last else {})
        )
        step_ms = (time.perf_counter() - start) * 1e3
        record = {"step": step, "phase": phase, "plan": had_plan, "step_ms": step_ms}
        record["frozen"] = {
            st.stage_index: float(
                np.mean([st.tfz.stats.microbatch(m).frozen_fraction for m in range(microbatches)])
            )
            for st in pipe.stages
        }
        if losses:
            mean = torch.stack([torch.as_tensor(v).detach() for v in losses]).mean()
            record["loss"] = float(mean) * pipe.loss_scale
        if reference is not None:
            reference.load(gather_states(pipe.modules))
            xs, ys = x.chunk(microbatches), y.chunk(microbatches)
            expected = reference.grads(xs, ys, masks, list(pipe.modules))
            record["grad_err"] = compare(pipe.modules, expected)
        optimizer.step()
        if controller is not None:
            controller.observe(step)
        optimizer.zero_grad(set_to_none=True)
        if controller is not None:
            controller.step_end(step, pipe.timer.collect(), batch_ms=step_ms)
        else:
            pipe.timer.collect()
        pipe.records.append(record)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(progress_line(record), flush=True)
    if controller is not None:
        controller.wait_for_solve(timeout=60)  # a re-plan may be in flight: let its thread finish
    gathered = [None] * dist.get_world_size()
    dist.gather_object(pipe.records, gathered if rank == 0 else None, dst=0)
    if rank != 0:
        return {}
    return merge(gathered, controller, args)


def progress_line(r: dict) -> str:
    frozen = " ".join(f"{v:.2f}" for v in r["frozen"].values())
    text = f"step {r['step']:3d} [{r['phase']}] frozen (rank 0's stages) {frozen}"
    if "grad_err" in r:
        text += f", grads match float64 (max rel err {r['grad_err']:.1e})"
    return text


def merge(per_rank: list[list[dict]], controller, args) -> dict:
    """One record per step (stages of every rank) and the summary numbers."""
    steps = []
    for k, rank0 in enumerate(per_rank[0]):
        merged = dict(rank0)
        merged["frozen"] = {}
        merged["grad_err"] = 0.0 if "grad_err" in rank0 else None
        for records in per_rank:
            r = records[k]
            merged["frozen"].update({int(s): v for s, v in r["frozen"].items()})
            merged.setdefault("loss", r.get("loss"))
            if r.get("loss") is not None:
                merged["loss"] = r["loss"]
            if merged["grad_err"] is not None:
                merged["grad_err"] = max(merged["grad_err"], r["grad_err"])
        steps.append(merged)
    plan_steps = [r["step"] for r in steps if r["plan"]]
    frozen_steps = [r["step"] for r in steps if any(v > 0 for v in r["frozen"].values())]
    checked = [r for r in steps if r["grad_err"] is not None]
    return {
        "steps": steps,
        "plan_step": plan_steps[0] if plan_steps else None,
        "frozen_steps": frozen_steps,
        "checked_steps": len(checked),
        "checked_frozen_steps": sum(1 for r in checked if any(v > 0 for v in r["frozen"].values())),
        "max_grad_err": max((r["grad_err"] for r in checked), default=None),
        "plan": None if controller is None or controller.plan is None else controller.plan.to_dict(),
        "freezing": not args.no_freeze,
    }


def summary_text(result: dict) -> str:
    steps = result["steps"]
    lines = []
    if result["freezing"]:
        if result["plan_step"] is None:
            lines.append(f"plan NOT applied within {len(steps)} steps (last phase: {steps[-1]['phase']})")
        else:
            tail = steps[result["plan_step"] :]
            mean = {s: np.mean([r["frozen"][s] for r in tail]) for s in sorted(tail[0]["frozen"])}
            ratios = ", ".join(f"stage {s} {v:.2f}" for s, v in mean.items())
            lines.append(
                f"plan applied from step {result['plan_step']}; mean frozen fraction since: {ratios}"
            )
    losses = [r["loss"] for r in steps if r.get("loss") is not None]
    if losses:
        lines.append(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(steps)} steps")
    if result["checked_steps"]:
        lines.append(
            f"gradients matched the masked float64 reference at all {result['checked_steps']} steps "
            f"({result['checked_frozen_steps']} with freezing on), max rel err {result['max_grad_err']:.1e}"
        )
    return "\n".join(lines)
