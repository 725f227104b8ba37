"""One rank of ``tfz demo``: every method's stages, trained in lockstep on the same batches.

Each method has its own copy of this rank's stages (same initial weights), its own torch schedule,
optimizer and freezer. Every step runs one training step of each method in turn (the order rotates), so
machine noise reaches all methods alike. A step is timed barrier to barrier; evaluation and the other
methods' steps are not part of a method's wall time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tfz.demo.config import DemoConfig
from tfz.schedule import Schedule, build_schedule

__all__ = ["MethodRun", "run_rank"]

_STEP_MARK = "step"
"""Zero-length action recorded right after the start barrier: aligns the ranks' measured timelines."""


def _loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def _mean_loss(losses: list) -> float:
    return float(torch.stack([torch.as_tensor(v).detach() for v in losses]).mean())


def _lr_lambda(cfg: DemoConfig):
    def factor(step: int) -> float:
        if step < cfg.lr_warmup:
            return (step + 1) / cfg.lr_warmup
        progress = min(1.0, (step - cfg.lr_warmup) / max(1, cfg.steps - cfg.lr_warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_provider(method: str, cfg: DemoConfig, schedule: Schedule, modules: dict[int, nn.Module]):
    """The mask provider of ``method`` for this rank's stage modules (None for ``none``)."""
    if method == "none":
        return None
    from tfz.metrics import APFFreezer, AutoFreezeFreezer, MetricGuidedPolicy

    apf = {"threshold": cfg.apf_threshold, "check_interval": cfg.check_every, "block_rows": cfg.block_rows}
    auto = {
        "percentile": cfg.autofreeze_percentile,
        "interval": cfg.check_every,
        "block_rows": cfg.block_rows,
    }
    if method == "apf":
        return APFFreezer(**apf)
    if method == "autofreeze":
        return AutoFreezeFreezer(**auto)
    from tfz.controller import TimelyFreeze

    policy = None
    if method == "timelyfreeze+apf":
        policy = MetricGuidedPolicy.apf(include_tensors=False, **apf)
    elif method == "timelyfreeze+autofreeze":
        policy = MetricGuidedPolicy.autofreeze(include_tensors=False, **auto)
    group = dist.group.WORLD if dist.is_initialized() else None
    return TimelyFreeze(cfg.timelyfreeze_config(), schedule, modules, group=group, policy=policy)


@dataclass
class StepRecord:
    step: int
    step_ms: float
    """Barrier to barrier: pipeline step, optimizer step and the freezer's bookkeeping."""
    pipeline_ms: float
    """This rank's ``schedule.step`` (the pipelined batch)."""
    loss: float | None
    """Mean training loss of the microbatches (last stage's rank only)."""
    phase: str
    frozen_fraction: dict[int, float]
    """Local stage -> mean realised frozen fraction of W FLOPs over the microbatches."""
    w_skipped: dict[int, float]
    """Local stage -> fraction of weight-gradient FLOPs skipped (counted)."""
    predicted_ms: float | None = None


@dataclass
class MethodRun:
    """One method's copy of this rank's part of the pipeline."""

    method: str
    cfg: DemoConfig
    schedule: Schedule
    rank: int
    records: list[StepRecord] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    spans: dict[int, list] = field(default_factory=dict)
    span_ratios: dict[int, list[float]] = field(default_factory=dict)
    """Step -> freeze ratio the controller asked for every action in that step (kept-span steps only)."""
    history: list = field(default_factory=list)

    def __post_init__(self):
        from tfz.models import LlamaConfig, build_stages
        from tfz.nn import convert_to_freezable
        from tfz.optim import attach_row_freezing
        from tfz.pipeline import FreezeAwareStage, build_torch_schedule
        from tfz.timing import ActionTimer

        cfg, sched = self.cfg, self.schedule
        n_stages = sched.num_stages
        model_cfg = LlamaConfig(
            dim=cfg.dim,
            n_layers=cfg.layers_per_stage * n_stages,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_heads,
            ffn_dim=cfg.ffn_dim,
            max_seq_len=cfg.seq_len,
        )
        self.local = sched.stages_of(self.rank)
        built = build_stages(model_cfg, n_stages, stage_ids=list(self.local), seed=cfg.seed)
        self.modules = {s: convert_to_freezable(m) for s, m in built.items()}
        self.provider = make_provider(self.method, cfg, sched, self.modules)
        self.timer = ActionTimer(device="cpu")
        cpu = torch.device("cpu")
        self.stages = [
            FreezeAwareStage(self.modules[s], s, n_stages, cpu, provider=self.provider, timer=self.timer)
            for s in self.local
        ]
        self.torch_schedule = build_torch_schedule(sched, self.stages, _loss_fn)
        params = nn.ModuleDict({str(s): m for s, m in self.modules.items()})
        self.optimizer = torch.optim.AdamW(
            params.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
        )
        self.row_freezing = attach_row_freezing(self.optimizer, params, rescale=cfg.rescale_grads)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg))
        self.first = 0 in self.local
        self.last = n_stages - 1 in self.local

    # ------------------------------------------------------------------ training

    def _call(self, x: torch.Tensor, y: torch.Tensor, losses: list):
        args = (x,) if self.first else ()
        kwargs = {"target": y, "losses": losses} if self.last else {}
        return self.torch_schedule.step(*args, **kwargs)

    def train_step(self, step: int, x: torch.Tensor, y: torch.Tensor, keep_spans: bool) -> StepRecord:
        losses: list = []
        dist.barrier()
        t0 = time.perf_counter()
        with self.timer.action(_STEP_MARK):
            pass
        self._call(x, y, losses)
        t1 = time.perf_counter()
        self.optimizer.step()
        self.lr_schedule.step()
        observe = getattr(self.provider, "observe", None)
        if observe is not None:
            if self.method in ("apf", "autofreeze"):
                observe(step, self.modules)
            else:
                observe(step)
        self.optimizer.zero_grad(set_to_none=True)
        spans = self.timer.collect_spans()
        timings: dict[str, float] = {}
        for span in spans:
            if span.name != _STEP_MARK:
                timings[span.name] = timings.get(span.name, 0.0) + span.duration_ms
        phase, predicted = "-", None
        asked = getattr(self.provider, "requested_ratios", None)
        requested = asked().tolist() if keep_spans and asked is not None else None
        step_end = getattr(self.provider, "step_end", None)
        if step_end is not None:
            phase = self.provider.phase.value  # the phase this step ran in
            predicted = self.provider.predicted_batch_time()
            step_end(step, timings)
        elif self.provider is not None:
            phase = "metric"
        dist.barrier()
        t2 = time.perf_counter()
        if keep_spans:
            self.spans[step] = [(s.name, s.start_ms, s.end_ms) for s in spans]
            if requested is not None:
                self.span_ratios[step] = requested
        frozen, skipped = {}, {}
        for st in self.stages:
            stats = st.tfz.stats
            mbs = [stats.microbatch(m).frozen_fraction for m in range(self.schedule.num_microbatches)]
            frozen[st.stage_index] = float(np.mean(mbs))
            skipped[st.stage_index] = stats.skipped_fraction
        loss = _mean_loss(losses) if self.last else None
        record = StepRecord(
            step=step,
            step_ms=(t2 - t0) * 1e3,
            pipeline_ms=(t1 - t0) * 1e3,
            loss=loss,
            phase=phase,
            frozen_fraction=frozen,
            w_skipped=skipped,
            predicted_ms=predicted,
        )
        self.records.append(record)
        return record

    @torch.no_grad()
    def evaluate(self, step: int, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Validation loss and next-byte accuracy: the stages run one after another over the whole batch,
        activations sent point to point between ranks (torch's ``schedule.eval`` cannot run V schedules,
        whose ranks hand a backward to their own next stage)."""
        total_loss, correct, count = 0.0, 0, 0
        owner = self.schedule.stage_to_rank
        n_stages = self.schedule.num_stages
        for x, y in batches:
            h = x
            for s in range(n_stages):
                if owner[s] != self.rank:
                    continue
                if s > 0 and owner[s - 1] != self.rank:
                    h = torch.empty(x.shape + (self.cfg.dim,))
                    dist.recv(h, owner[s - 1])
                h = self.modules[s](h)
                if s < n_stages - 1 and owner[s + 1] != self.rank:
                    dist.send(h.contiguous(), owner[s + 1])
            if self.last:
                total_loss += float(_loss_fn(h, y)) * y.numel()
                correct += int((h.argmax(-1) == y).sum())
                count += y.numel()
        if self.last:
            self.evals.append({"step": step, "val_loss": total_loss / count, "val_acc": correct / count})

    def result(self) -> dict[str, Any]:
        history = getattr(self.provider, "history", None)
        plan = getattr(self.provider, "plan", None)
        out = {
            "records": [r.__dict__ for r in self.records],
            "evals": self.evals,
            "spans": self.spans,
            "span_ratios": self.span_ratios,
            "history": [list(h) for h in history or []],
            "plan": None if plan is None else plan.to_dict(),
        }
        durations = self.provider.timeline_durations() if plan is not None else None
        out["timeline_durations"] = None if durations is None else durations.tolist()
        return out


def _batches(cfg: DemoConfig, corpus, split: str, rng: np.random.Generator):
    x, y = corpus.batch(split, cfg.microbatches * cfg.microbatch_size, cfg.seq_len, rng)
    return torch.from_numpy(x), torch.from_numpy(y)


def run_rank(rank: int, world: int, cfg: DemoConfig) -> dict[str, Any]:
    """Train every method of ``cfg`` on this rank; returns per-method records (see :class:`MethodRun`)."""
    from tfz.data import load_corpus

    torch.set_num_threads(cfg.threads_per_rank)
    torch.manual_seed(cfg.seed)
    schedule = build_schedule(cfg.schedule, world, cfg.microbatches)
    corpus = load_corpus(cfg.data, seed=cfg.seed)
    runs = {m: MethodRun(m, cfg, schedule, rank) for m in cfg.methods}
    train_rng = np.random.default_rng([cfg.seed, 1])
    val = [
        _batches(cfg, corpus, "val", np.random.default_rng([cfg.seed, 2, i])) for i in range(cfg.eval_batches)
    ]
    last_rank = schedule.stage_to_rank[-1]
    trace_steps = set(cfg.trace_steps) | {cfg.steps - 1}
    started = time.perf_counter()
    for step in range(cfg.steps):
        x, y = _batches(cfg, corpus, "train", train_rng)
        order = list(cfg.methods)
        k = step % len(order)
        for method in order[k:] + order[:k]:
            runs[method].train_step(
                step, x, y, keep_spans=step in trace_steps or _keep_early(runs[method], step)
            )
        if (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1:
            for method in cfg.methods:
                runs[method].evaluate(step + 1, val)
        if rank == last_rank:
            _progress(cfg, runs, step, time.perf_counter() - started)
    return {m: r.result() for m, r in runs.items()}


def _keep_early(run: MethodRun, step: int) -> bool:
    """Keep the spans of the last step before a TimelyFreeze controller starts freezing (monitoring)."""
    records = run.records
    return bool(records) and records[-1].phase == "monitor_upper"


def _progress(cfg: DemoConfig, runs: dict[str, MethodRun], step: int, elapsed: float) -> None:
    if step % max(1, cfg.steps // 20) and step != cfg.steps - 1:
        return
    parts = []
    for method, run in runs.items():
        recent = run.records[-10:]
        tok_s = cfg.tokens_per_step * len(recent) / (sum(r.step_ms for r in recent) / 1e3)
        rec = recent[-1]
        loss = f"{rec.loss:.3f}" if rec.loss is not None else "-"
        phase = f" {rec.phase}" if rec.phase not in ("-", "metric") else ""
        parts.append(f"{method}{phase}: loss {loss}, {tok_s:,.0f} tok/s")
    print(f"[{elapsed:6.1f}s] step {step + 1}/{cfg.steps} | " + " | ".join(parts), flush=True)
