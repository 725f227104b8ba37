"""One rank of ``tfz demo``: every method's stages, trained in lockstep on the same batches.

Each method has its own copy of this rank's stages (same initial weights), its own torch schedule,
optimizer and freezer. Every step runs one training step of each method in turn (the order rotates), so
machine noise reaches all methods alike. A step is timed barrier to barrier; evaluation and the other
methods' steps are not part of a method's wall time.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tfz.demo.config import METHOD_KINDS, DemoConfig, freezes
from tfz.demo.equal_time import ReferenceSnapshots
from tfz.schedule import Schedule, build_schedule

__all__ = ["MethodRun", "run_rank"]

_STEP_MARK = "step"
"""Zero-length action recorded right after the start barrier: aligns the ranks' measured timelines."""


def _loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def _mean_loss(losses: list) -> float:
    return float(torch.stack([torch.as_tensor(v).detach() for v in losses]).mean())


def _lr_lambda(cfg: DemoConfig):
    from tfz.demo.base import lr_factor

    return lambda step: lr_factor(step, cfg.warmup_steps, cfg.steps)


def sequence_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy of each sequence: float64 [batch] (logits [batch, L, V])."""
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="none")
    return per_token.view(target.shape).double().mean(1)


class _NothingFrozen:
    """A mask provider that freezes nothing: the freeze-aware stage still runs tfz's backward."""

    def masks_for(self, stage: int, microbatch: int) -> None:
        return None


def make_provider(
    method: str,
    cfg: DemoConfig,
    schedule: Schedule,
    modules: dict[int, nn.Module],
    seed: int,
    **controller: Any,
):
    """The mask provider of ``method`` for this rank's stage modules (None for ``none``: torch's own
    backward); without an initialised process group, one provider for every stage in ``modules``.
    ``controller``: fields of the TimelyFreeze config to change (e.g. ``async_solve=False``)."""
    if method == "none":
        return None
    if method == "tfz-none":
        return _NothingFrozen()
    from tfz.metrics import APFFreezer, AutoFreezeFreezer, MetricGuidedPolicy

    apf = {
        "threshold": cfg.apf_threshold,
        "check_interval": cfg.decision_interval,
        "block_rows": cfg.block_rows,
    }
    auto = {
        "percentile": cfg.autofreeze_percentile,
        "interval": cfg.decision_interval,
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
    if policy is not None:
        controller.setdefault("mask_layout", "auto")  # the policy's own layout
    group = dist.group.WORLD if dist.is_initialized() else None
    config = dataclasses.replace(cfg.timelyfreeze_config(seed), **controller)
    return TimelyFreeze(config, schedule, modules, group=group, policy=policy)


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


def build_model(cfg: DemoConfig, num_stages: int, stage_ids, seed: int, base=None) -> dict[int, nn.Module]:
    """Stages ``stage_ids`` of the demo's model with FreezableLinear layers (the output layer too
    unless ``cfg.output_layer`` is ``trained``): the ``base``'s weights (a
    :class:`tfz.demo.base.BaseModel`, finetune) or fresh ones from ``seed`` (pretrain)."""
    from tfz.models import build_stages, split_layers
    from tfz.nn import convert_to_freezable

    if base is not None:
        base.check_fits(num_stages, cfg.seq_len)
        model_cfg = base.config
    else:
        model_cfg = cfg.base_spec(num_stages).model_config()  # the shape the default base has
    layers = split_layers(model_cfg.n_layers, num_stages)
    built = build_stages(model_cfg, num_stages, stage_ids=list(stage_ids), layers=layers, seed=seed)
    if base is not None:
        for stage in built.values():
            base.load_into(stage)
    freezable = None
    if cfg.output_layer == "trained":
        freezable = lambda module, fqn: isinstance(module, nn.Linear) and fqn != "output"
    return {s: convert_to_freezable(m, freezable) for s, m in built.items()}


def attach_optimizer(cfg: DemoConfig, modules: dict[int, nn.Module], *, freezing: bool = True):
    """(AdamW, its row-freezing hooks or None without ``freezing``, its learning-rate schedule) for
    ``modules``. torch's fused AdamW steps what the hooks do not (tfz's native pass, where it applies,
    steps the FreezableLinears)."""
    from tfz.optim import attach_row_freezing

    params = nn.ModuleDict({str(s): m for s, m in modules.items()})
    optimizer = torch.optim.AdamW(
        params.parameters(), lr=cfg.peak_lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay, fused=True
    )
    row_freezing = None
    if freezing:
        row_freezing = attach_row_freezing(
            optimizer, params, rescale=cfg.rescale_grads, step_scale=cfg.step_scale
        )
    return optimizer, row_freezing, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))


def observe(provider, method: str, step: int, modules: dict[int, nn.Module], cfg: DemoConfig) -> None:
    """Forward a finished optimizer step to the provider's metric, from the end of the learning-rate
    warm-up on (before it nothing may freeze)."""
    hook = getattr(provider, "observe", None)
    if hook is None or step < cfg.warmup_steps:
        return
    if METHOD_KINDS[method] == "metric":
        hook(step, modules)
    else:
        hook(step)


@dataclass
class MethodRun:
    """One method's copy of this rank's part of the pipeline."""

    method: str
    cfg: DemoConfig
    schedule: Schedule
    rank: int
    seed: int
    base: Any = None
    """:class:`tfz.demo.base.BaseModel` (finetune) or None (pretrain)."""
    records: list[StepRecord] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    equal_time_evals: list[dict] = field(default_factory=list)
    """No freezing: evaluations of its saved weights at the steps around other methods' ends."""
    spans: dict[int, list] = field(default_factory=dict)
    span_ratios: dict[int, list[float]] = field(default_factory=dict)
    """Step -> freeze ratio the controller asked for every action in that step (kept-span steps only)."""

    def __post_init__(self):
        from tfz.pipeline import FreezeAwareStage, build_torch_schedule
        from tfz.timing import ActionTimer

        cfg, sched = self.cfg, self.schedule
        n_stages = sched.num_stages
        self.local = sched.stages_of(self.rank)
        self.modules = build_model(cfg, n_stages, self.local, self.seed, self.base)
        self.provider = make_provider(self.method, cfg, sched, self.modules, self.seed)
        self.timer = ActionTimer(device="cpu")
        cpu = torch.device("cpu")
        self.stages = [
            FreezeAwareStage(self.modules[s], s, n_stages, cpu, provider=self.provider, timer=self.timer)
            for s in self.local
        ]
        self.torch_schedule = build_torch_schedule(sched, self.stages, _loss_fn)
        self.optimizer, self.row_freezing, self.lr_schedule = attach_optimizer(
            cfg, self.modules, freezing=freezes(self.method)
        )
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
        observe(self.provider, self.method, step, self.modules, self.cfg)
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
            step_end(step, timings, batch_ms=(t1 - t0) * 1e3)
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

    def weights(self) -> dict[int, dict[str, torch.Tensor]]:
        """A copy of this rank's stages' weights."""
        return {
            s: {k: v.detach().clone() for k, v in m.state_dict().items()} for s, m in self.modules.items()
        }

    def load_weights(self, weights: dict[int, dict[str, torch.Tensor]]) -> None:
        for s, m in self.modules.items():
            m.load_state_dict(weights[s])

    @torch.no_grad()
    def evaluate(
        self, step: int, x_val: torch.Tensor, y_val: torch.Tensor, chunk: int, into: list | None = None
    ) -> None:
        """Loss of every validation sequence and next-byte accuracy. Each rank runs its stages in model
        order, each over every chunk of ``chunk`` sequences, and hands activations on with
        non-blocking sends, so the ranks overlap like a pipeline (torch's ``schedule.eval`` cannot run
        V schedules, whose ranks hand a backward to their own next stage). The last stage's rank
        records the result in ``into`` (default: ``evals``)."""
        owner = self.schedule.stage_to_rank
        n_stages = self.schedule.num_stages
        chunks = [(lo, min(lo + chunk, len(x_val))) for lo in range(0, len(x_val), chunk)]
        acts: list[torch.Tensor] = [x_val[lo:hi] for lo, hi in chunks]
        sends = []
        for s in range(n_stages):
            if owner[s] != self.rank:
                continue
            for k, (lo, hi) in enumerate(chunks):
                if s > 0 and owner[s - 1] != self.rank:
                    acts[k] = torch.empty((hi - lo, x_val.shape[1], self.modules[s].cfg.dim))
                    dist.recv(acts[k], owner[s - 1])
                acts[k] = self.modules[s](acts[k])
                if s < n_stages - 1 and owner[s + 1] != self.rank:
                    out = acts[k].contiguous()
                    sends.append((dist.isend(out, owner[s + 1]), out))
        for work, _ in sends:
            work.wait()
        if self.last:
            seq = torch.cat([sequence_losses(h, y_val[lo:hi]) for h, (lo, hi) in zip(acts, chunks)])
            correct = sum(int((h.argmax(-1) == y_val[lo:hi]).sum()) for h, (lo, hi) in zip(acts, chunks))
            (self.evals if into is None else into).append(
                {
                    "step": step,
                    "val_loss": float(seq.mean()),
                    "val_acc": correct / y_val.numel(),
                    "seq_loss": seq.tolist(),
                }
            )

    def result(self) -> dict[str, Any]:
        from tfz.nn import linear_flops

        history = getattr(self.provider, "history", None)
        plan = getattr(self.provider, "plan", None)
        out = {
            "records": [r.__dict__ for r in self.records],
            "evals": self.evals,
            "equal_time_evals": self.equal_time_evals,
            "spans": self.spans,
            "span_ratios": self.span_ratios,
            "history": [list(h) for h in history or []],
            "plan": None if plan is None else plan.to_dict(),
        }
        durations = self.provider.timeline_durations() if plan is not None else None
        out["timeline_durations"] = None if durations is None else durations.tolist()
        estimates = self.provider.estimates if plan is not None else None
        out["estimates"] = None if estimates is None else [e.tolist() for e in estimates]
        out["gap_ms"] = self.provider.gap if plan is not None else None
        out["linear_flops"] = [list(linear_flops(m)) for m in self.modules.values()]
        return out


def _batches(cfg: DemoConfig, corpus, rng: np.random.Generator):
    x, y = corpus.batch("train", cfg.microbatches * cfg.microbatch_size, cfg.seq_len, rng)
    return torch.from_numpy(x), torch.from_numpy(y)


def load_data(cfg: DemoConfig):
    """The training corpus of ``cfg.task`` (``cfg.data`` or the task's built-in corpus) as bytes, split
    by file with a fixed seed (the same validation files for every seed)."""
    from tfz.data import load_corpus

    return load_corpus(cfg.data, corpus=cfg.train_corpus, seed=0)


def encode_data(cfg: DemoConfig, corpus, base=None, progress: Callable[[str], None] = print):
    """``corpus`` as the ids the model reads (encoded once and cached): the ``base``'s tokenizer
    (finetune), else a ``cfg.vocab_size``-token one learned from ``corpus`` itself (pretrain)."""
    from tfz.demo.base import encode_cached, ensure_tokenizer

    if base is not None:
        tokenizer = base.tokenizer
    else:
        tokenizer = ensure_tokenizer(corpus, cfg.vocab_size, cfg.cache_folder, progress=progress)
    return encode_cached(corpus, tokenizer, cfg.cache_folder, progress=progress)


def run_rank(rank: int, world: int, cfg: DemoConfig, seed: int) -> dict[str, Any]:
    """Train every method of ``cfg`` with ``seed`` on this rank; returns per-method records (see
    :class:`MethodRun`). Finetune runs start from the base file ``cfg.base``."""
    torch.set_num_threads(cfg.threads_per_rank)
    torch.manual_seed(seed)
    schedule = build_schedule(cfg.schedule, world, cfg.microbatches)
    base = None
    if cfg.task == "finetune":
        from tfz.demo.base import load_base

        base = load_base(cfg.base)
    corpus = encode_data(cfg, load_data(cfg), base)
    runs = {m: MethodRun(m, cfg, schedule, rank, seed, base) for m in cfg.methods}
    train_rng = np.random.default_rng([seed, 1])
    x_val, y_val = (torch.from_numpy(a) for a in corpus.sequences("val", cfg.val_sequences, cfg.seq_len))
    chunk = cfg.microbatches * cfg.microbatch_size
    last_rank = schedule.stage_to_rank[-1]
    trace_steps = set(cfg.trace_steps) | {cfg.steps - 1}
    eval_steps = cfg.eval_steps
    snapshots = None
    if "none" in runs and len(runs) > 1:
        snapshots = ReferenceSnapshots("none", cfg.methods, eval_steps)
    started = time.perf_counter()
    _evaluate_start(list(runs.values()), x_val, y_val, chunk)
    for step in range(cfg.steps):
        x, y = _batches(cfg, corpus, train_rng)
        order = list(cfg.methods)
        k = step % len(order)
        for method in order[k:] + order[:k]:
            runs[method].train_step(
                step, x, y, keep_spans=step in trace_steps or _keep_early(runs[method], step)
            )
        if snapshots is not None:
            snapshots.step_done(_slowest_step_ms(runs), runs["none"].weights)
        if step + 1 in eval_steps:
            for method in cfg.methods:
                runs[method].evaluate(step + 1, x_val, y_val, chunk)
        if rank == last_rank:
            _check_finite(cfg, runs, step)
            _progress(cfg, runs, step, time.perf_counter() - started)
    if snapshots is not None:
        _evaluate_equal_time(runs["none"], snapshots, x_val, y_val, chunk)
    return {m: r.result() for m, r in runs.items()}


def _slowest_step_ms(runs: dict[str, MethodRun]) -> dict[str, float]:
    """Every method's last step time, the slowest rank's (what the report counts), on every rank."""
    times = torch.tensor([run.records[-1].step_ms for run in runs.values()], dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return dict(zip(runs, times.tolist()))


def _evaluate_equal_time(
    none: MethodRun, snapshots: ReferenceSnapshots, x_val: torch.Tensor, y_val: torch.Tensor, chunk: int
) -> None:
    """Evaluate no freezing's saved weights at the steps around the other methods' ends (its training
    is over, so its stages take them in turn)."""
    for step in snapshots.steps_to_evaluate():
        none.load_weights(snapshots.weights(step))
        none.evaluate(step, x_val, y_val, chunk, into=none.equal_time_evals)


def _evaluate_start(runs: list[MethodRun], x_val: torch.Tensor, y_val: torch.Tensor, chunk: int) -> None:
    """Evaluate every method before its first step. A method whose stages hold the same weights as the
    first method's, on every rank, takes the first method's evaluation (every method starts from the
    same base or seed), so the shared starting point is evaluated once."""
    first = runs[0]
    first.evaluate(0, x_val, y_val, chunk)
    for run in runs[1:]:
        if _same_weights_everywhere(first, run):
            run.evals.extend(dict(e) for e in first.evals)
        else:
            run.evaluate(0, x_val, y_val, chunk)


def _same_weights_everywhere(a: MethodRun, b: MethodRun) -> bool:
    """Whether ``a``'s and ``b``'s stages hold bitwise equal parameters and buffers on every rank."""

    def same_stage(s: int) -> bool:
        x, y = a.modules[s].state_dict(), b.modules[s].state_dict()
        return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    same = a.modules.keys() == b.modules.keys() and all(same_stage(s) for s in a.modules)
    flag = torch.tensor([int(same)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _check_finite(cfg: DemoConfig, runs: dict[str, MethodRun], step: int) -> None:
    """Stop at the first step whose training loss is not finite (ValueError naming the learning rate)."""
    for method, run in runs.items():
        loss = run.records[-1].loss
        if loss is not None and not math.isfinite(loss):
            raise ValueError(
                f"{method}'s training loss is {loss} at step {step + 1}: training diverged at learning rate "
                f"{cfg.peak_lr:g}; try a lower --lr"
            )


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
    left = elapsed / (step + 1) * (cfg.steps - step - 1)
    head = f"[{elapsed:6.1f}s] step {step + 1}/{cfg.steps}" + (f" (about {left:.0f} s left)" if left else "")
    print(head + " | " + " | ".join(parts), flush=True)
