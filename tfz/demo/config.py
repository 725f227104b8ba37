"""Settings of ``tfz demo``: one typed config; the CLI flags set a few of its fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from tfz._defaults import MAX_FREEZE_RATIO
from tfz._validate import (
    MAX_SEED,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_ratio,
    is_int,
    short_repr,
)
from tfz.schedule import SCHEDULES
from tfz.tokenizer import MAX_VOCAB

__all__ = [
    "MAX_ACTIONS",
    "MAX_RANKS",
    "METHODS",
    "METHOD_KINDS",
    "OUTPUT_LAYERS",
    "TASKS",
    "TIMELYFREEZE_METHODS",
    "DemoConfig",
    "check_ranks",
    "freezes",
]

METHOD_KINDS = {
    "none": "baseline",
    "tfz-none": "baseline",
    "timelyfreeze": "timelyfreeze",
    "apf": "metric",
    "autofreeze": "metric",
    "timelyfreeze+apf": "timelyfreeze",
    "timelyfreeze+autofreeze": "timelyfreeze",
}
"""Methods the demo compares, each with its kind: ``baseline`` freezes nothing (``none`` trains on torch's
own pipelining backward and is the baseline of every gain; ``tfz-none`` trains through tfz's
freeze-aware stage, whose FreezableLinears add every dW into ``.grad`` in place, and shows what the
stage alone changes); ``timelyfreeze`` plans with the LP (with APF's or AutoFreeze's ranking for the
hybrids); ``metric`` freezes by its metric alone."""
METHODS = tuple(METHOD_KINDS)
TIMELYFREEZE_METHODS = tuple(m for m, kind in METHOD_KINDS.items() if kind == "timelyfreeze")


def freezes(method: str) -> bool:
    """Whether ``method`` freezes anything (baselines do not: torch's AdamW steps them)."""
    return METHOD_KINDS[method] != "baseline"


OUTPUT_LAYERS = ("trained", "freezable")
"""Whether the demo's methods may freeze the output layer's rows (``DemoConfig.output_layer``)."""

TASKS = ("finetune", "pretrain")
"""``finetune``: every method starts from the same base model (pretrained without freezing on the
standard library's sources) and fine-tunes on another corpus (torch's own Python sources) at a lower learning
rate, as in the paper's experiments; ``pretrain``: every method trains from scratch."""

MAX_RANKS = 64
"""The demo starts one process per rank (each about 300 MB: torch and the model)."""
MAX_ACTIONS = 100_000
"""Pipeline actions per step the demo accepts (every rank builds the whole schedule and its DAG)."""
_PROCESS_MB = 300


def check_ranks(ranks: int, what: str) -> None:
    """ValueError, naming ``what`` (``--ranks 99``), when the demo cannot start ``ranks`` processes."""
    if ranks > MAX_RANKS:
        gb = ranks * _PROCESS_MB / 1024
        raise ValueError(
            f"{what}: the demo starts one process per rank, about {gb:,.0f} GB of memory; "
            f"the limit is {MAX_RANKS} ranks"
        )


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """A pipelined training run of every method in ``methods`` on the same data and steps, once per seed."""

    task: str = "finetune"
    """``finetune`` or ``pretrain`` (:data:`TASKS`)."""
    schedule: str = "1f1b"
    """Pipeline schedule (``tfz.schedule.SCHEDULES``)."""
    ranks: int = 2
    """Pipeline ranks (processes)."""
    steps: int = 60
    """Optimizer steps per method. 60 keeps the default run near 5 minutes on 2 cores with freezing in
    force for its last 34 steps; bench/RESULTS.md also reports 100."""
    methods: tuple[str, ...] = ("none", "timelyfreeze")
    """Methods to run, in lockstep (one step of each in turn), so machine noise hits all alike."""
    max_freeze_ratio: float = MAX_FREEZE_RATIO
    """TimelyFreeze's cap on each stage's mean freeze ratio."""
    action_cap: float | None = None
    """TimelyFreeze's cap on each (stage, microbatch) ratio (``PlanConfig.action_cap``); default
    ``max_freeze_ratio``. The LP alone may freeze a stage whole for most microbatches (2-stage 1F1B:
    5 of 8), so every row of the stage learns from the same few microbatches; capping each ratio at
    the stage cap spreads the freezing, so every sequence trains part of every stage, for a slightly
    longer planned step (1.2% here). ``1.0`` is the paper's LP."""
    data: str | None = None
    """A text file or folder to train on (finetune: the fine-tuning corpus); default: ``corpus``."""
    corpus: str | None = None
    """Built-in corpus (``tfz.data.CORPORA``) to train on when ``data`` is not given; default
    ``torch-python`` (finetune: the same language as the base's corpus in another style, as instruction
    data is to a language model) or ``python-stdlib`` (pretrain)."""
    base: str | None = None
    """Base model file (``tfz.demo.base``) for ``finetune``; default: the demo's own base, built once
    on first use and cached."""
    out: str = "tfz-demo"
    """Output folder."""
    seeds: tuple[int, ...] = (0,)
    """One comparison per seed (data order, mask draws; pretrain: also the initial weights)."""

    microbatches: int = 8
    microbatch_size: int = 4
    """Sequences per microbatch."""
    seq_len: int = 64
    """Tokens per sequence."""
    vocab_size: int = 4096
    """Vocabulary of the default base and of pretrain runs: byte-pair tokens (``tfz.tokenizer``)
    learned once from the base's corpus, or from the training corpus for pretrain, so the output
    layer gives the last stage ``dim x vocab_size`` weights, as a real vocabulary does; 256 reads
    bytes. With the output layer trained on every microbatch, 4,096 tokens is the setting measured
    ahead of no freezing at equal time (bench/RESULTS.md). A given ``base`` brings its own."""
    dim: int = 384
    n_layers: int | None = None
    """Decoder layers of the model (pretrain, and the default base); default 4, or one per stage when
    the pipeline has more stages. The stages split them as evenly as they can."""
    n_heads: int = 6
    ffn_dim: int = 1536
    lr: float | None = None
    """AdamW peak learning rate (linear warm-up over ``lr_warmup`` steps, then cosine to 10%);
    default 1e-3 (finetune: half the base's pretraining peak, the best of 1e-4, 3e-4 and 1e-3 for no
    freezing on held-out files) or 2e-3 (pretrain)."""
    lr_warmup: int | None = None
    """Learning-rate warm-up steps (nothing freezes before it ends); default a tenth of the steps."""
    weight_decay: float = 0.1
    rescale_grads: bool = True
    """Scale each partly frozen row's gradient by microbatches / active microbatches (``tfz.optim``), so
    it is the mean over the microbatches that trained it (tfz.optim's own default is off)."""
    step_scale: float = 0.5
    """Scale each partly frozen row's AdamW step by (microbatches / active microbatches) ** step_scale
    (``tfz.optim``'s ``step_scale``): 0.5 gives back the progress Adam's normalisation takes from a
    row trained on part of the step's data; 0 is AdamW's own step (tfz.optim's default)."""
    makespan_slack: float = 0.0
    """TimelyFreeze's makespan budget above the minimum (``PlanConfig.makespan_slack``): the plan
    freezes as little as a batch (1 + slack) times the shortest allows."""
    phase_unit: int | None = None
    """TimelyFreeze phase unit (steps): each monitoring half is one unit; its warm-up is the
    learning-rate warm-up. Default: scaled to the run by ``TimelyFreezeConfig.for_run`` (a tenth of
    the steps, at most 50)."""
    check_every: int | None = None
    """Decision interval (steps) of TimelyFreeze and of the APF / AutoFreeze checks; default a third of
    the phase unit (``for_run``)."""
    ramp_steps: int | None = None
    """Steps over which TimelyFreeze ramps its plan in; default one phase unit (``for_run``)."""
    monitoring: str = "partial"
    """TimelyFreeze's second monitoring half: ``partial`` (every action partly frozen, every step
    trains) or ``frozen`` (the paper's all-frozen window) (``TimelyFreezeConfig.monitoring``)."""
    monitor_ratios: tuple[float, ...] | None = None
    """Freeze ratios of TimelyFreeze's partly frozen monitoring half (default:
    ``TimelyFreezeConfig.monitor_levels``, (0, 0.8), which measures both bounds in the same steps;
    without a 0, the unfrozen bound comes from the unfrozen half before it)."""
    block_rows: int = 32
    """Rows per freezing unit of a linear layer."""
    output_layer: str = "trained"
    """``trained``: the output layer stays a plain ``nn.Linear`` that trains on every microbatch, and
    the methods freeze the decoder layers' rows only; ``freezable``: it is a FreezableLinear like the
    others (:data:`OUTPUT_LAYERS`)."""
    mask_layout: str = "arcs"
    """How TimelyFreeze's masks of a stage's microbatches relate (``TimelyFreezeConfig.mask_layout``):
    ``arcs`` (each microbatch trains a contiguous run of every layer's rows, the rows taking turns)
    or ``cover`` (scattered row blocks taking turns). The hybrids with APF or AutoFreeze keep their
    policy's own layout."""
    apf_threshold: float = 0.05
    autofreeze_percentile: float = 80.0
    eval_every: int = 15
    """Validation every this many steps (and before the first and after the last): the points of
    each method's loss-vs-time curve. No freezing's loss at another method's training time is
    measured on its own (``tfz.demo.equal_time``), not read off this curve."""
    val_sequences: int = 256
    """Sequences of the fixed validation set (evenly spaced windows of the validation files; the same
    for every method and seed)."""
    base_steps: int = 150
    """Pretraining steps of the default base."""
    base_seed: int = 0
    """Seed of the default base (its initial weights and data order)."""
    cache_dir: str | None = None
    """Where the default base is cached (default ``tfz.demo.base.cache_dir()``)."""
    threads_per_rank: int = 1
    timeout: float = 3600.0
    """Seconds before one seed's run is stopped."""
    trace_steps: tuple[int, ...] = field(default=())
    """Steps whose measured timelines are drawn; default: one before freezing starts, the last step."""

    def __post_init__(self):
        check_choice("task", self.task, TASKS)
        check_choice("output_layer", self.output_layer, OUTPUT_LAYERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(
                f"unknown method(s) {unknown or self.methods!r}; choose from {', '.join(METHODS)}"
            )
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods repeat: {self.methods!r}")
        for name in (
            "ranks",
            "steps",
            "microbatches",
            "microbatch_size",
            "seq_len",
            "dim",
            "n_heads",
            "ffn_dim",
            "block_rows",
            "eval_every",
            "val_sequences",
            "base_steps",
            "threads_per_rank",
        ):
            check_int(name, getattr(self, name), 1)
        check_int("base_seed", self.base_seed, 0, maximum=MAX_SEED)
        check_int("vocab_size", self.vocab_size, 256, maximum=MAX_VOCAB)
        check_int("n_layers", self.n_layers, 1, optional=True)
        check_int("phase_unit", self.phase_unit, 1, optional=True)
        check_int("check_every", self.check_every, 1, optional=True)
        check_int("ramp_steps", self.ramp_steps, 0, optional=True)
        check_int("lr_warmup", self.lr_warmup, 1, optional=True)
        check_number("lr", self.lr, low=0.0, low_open=True, optional=True)
        check_number("weight_decay", self.weight_decay, low=0.0)
        check_number("step_scale", self.step_scale, low=-4.0, high=4.0)
        check_ratio("makespan_slack", self.makespan_slack)
        check_bool("rescale_grads", self.rescale_grads)
        check_number("timeout", self.timeout, low=0.0, low_open=True, unit="seconds")
        check_ratio("max_freeze_ratio", self.max_freeze_ratio)
        check_ratio("action_cap", self.action_cap, optional=True)
        if not self.seeds or not all(is_int(s) and 0 <= s <= MAX_SEED for s in self.seeds):
            raise ValueError(f"seeds must be integers in [0, {MAX_SEED}], got {short_repr(self.seeds)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds!r}")
        from tfz.data import CORPORA

        if self.corpus is not None:
            check_choice("corpus", self.corpus, CORPORA)
        if self.base is not None and self.task != "finetune":
            raise ValueError(f"--base {self.base} applies to --task finetune, not {self.task}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        self._check_size()
        self.model_layers(self.build_schedule().num_stages)  # before any rank starts
        if any(m in TIMELYFREEZE_METHODS for m in self.methods):
            self.timelyfreeze_config(seed=0)  # phases that fit the run, or the minimum --steps

    def _check_size(self) -> None:
        """Refuse sizes the demo cannot run before anything is built (one line, with the estimate)."""
        check_ranks(self.ranks, f"--ranks {self.ranks}")
        from tfz.schedule.limits import check_actions, estimate_size

        most = estimate_size(self.schedule, self.ranks, self.microbatches, stages_per_rank=2).actions
        what = f"{self.schedule} with --ranks {self.ranks} and --microbatches {self.microbatches}"
        check_actions(most, what, MAX_ACTIONS, limit_name="tfz demo's")

    # ------------------------------------------------------------------ derived settings

    @property
    def peak_lr(self) -> float:
        """The learning rate in use (``lr`` or the task's default)."""
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.task == "finetune" else 2e-3

    @property
    def freeze_action_cap(self) -> float:
        """TimelyFreeze's cap on each action's ratio in use (``action_cap`` or ``max_freeze_ratio``)."""
        return self.max_freeze_ratio if self.action_cap is None else self.action_cap

    @property
    def warmup_steps(self) -> int:
        """Learning-rate warm-up in use (``lr_warmup`` or the task's default)."""
        return self._warmup_for(self.steps)

    def _warmup_for(self, steps: int) -> int:
        return self.lr_warmup if self.lr_warmup is not None else max(1, steps // 10)

    @property
    def decision_interval(self) -> int:
        """Steps between the decisions of every freezing method (``check_every`` or TimelyFreeze's)."""
        if self.check_every is not None:
            return self.check_every
        try:
            return self.timelyfreeze_config(seed=0).check_every
        except ValueError:  # too short for TimelyFreeze (only the baselines run): a tenth of the steps / 3
            return max(1, min(10, self.steps // 30))

    @property
    def train_corpus(self) -> str:
        """The built-in corpus trained on when ``data`` is not given."""
        if self.corpus is not None:
            return self.corpus
        return "torch-python" if self.task == "finetune" else "python-stdlib"

    @property
    def cache_folder(self) -> Path | None:
        """``cache_dir`` as a path (None: ``tfz.demo.base.cache_dir()``)."""
        return None if self.cache_dir is None else Path(self.cache_dir)

    @property
    def tokens_per_step(self) -> int:
        return self.microbatches * self.microbatch_size * self.seq_len

    @property
    def eval_steps(self) -> frozenset[int]:
        """Steps after which every method is evaluated: 0, every ``eval_every``-th and the last."""
        return frozenset(range(0, self.steps, self.eval_every)) | {self.steps}

    def build_schedule(self):
        """The pipeline schedule (ValueError for impossible ranks / microbatches)."""
        from tfz.schedule import build_schedule

        return build_schedule(self.schedule, self.ranks, self.microbatches)

    def model_layers(self, num_stages: int) -> int:
        """Decoder layers of a ``num_stages``-stage pipeline's model (ValueError: fewer than stages)."""
        layers = max(4, num_stages) if self.n_layers is None else self.n_layers
        if layers < num_stages:
            raise ValueError(f"n_layers {layers} is fewer than the {num_stages} pipeline stages")
        return layers

    def base_spec(self, num_stages: int):
        """The default base's :class:`tfz.demo.base.BaseSpec` for a ``num_stages``-stage pipeline."""
        from tfz.demo.base import BaseSpec

        return BaseSpec(
            vocab_size=self.vocab_size,
            dim=self.dim,
            n_layers=self.model_layers(num_stages),
            n_heads=self.n_heads,
            ffn_dim=self.ffn_dim,
            seq_len=self.seq_len,
            steps=self.base_steps,
            seed=self.base_seed,
        )

    def timelyfreeze_config(self, seed: int):
        """The controller config the TimelyFreeze methods run with: phases scaled to ``steps`` by
        ``TimelyFreezeConfig.for_run`` unless given (ValueError naming the minimum ``--steps`` when
        the plan could not be fully applied by the middle of the run, or a bad setting)."""
        try:
            return self._timelyfreeze_for(self.steps, seed)
        except ValueError as exc:
            text, marker, _ = str(exc).partition("; for_run needs")
            need = self._shortest_run() if marker else None
            if need is not None:
                text += f"; the demo needs --steps >= {need}"  # its warm-up grows with the run
            raise ValueError(f"TimelyFreeze settings: {text if need is not None else exc}") from None

    def _timelyfreeze_for(self, steps: int, seed: int = 0):
        from tfz.controller import TimelyFreezeConfig
        from tfz.plan import PlanConfig

        given = {
            "phase_unit": self.phase_unit,
            "check_every": self.check_every,
            "ramp_steps": self.ramp_steps,
            "warmup_steps": self._warmup_for(steps),
            "monitor_ratios": self.monitor_ratios,
        }
        return TimelyFreezeConfig.for_run(
            steps,
            plan=PlanConfig(
                max_freeze_ratio=self.max_freeze_ratio,
                action_cap=self.freeze_action_cap,
                makespan_slack=self.makespan_slack,
            ),
            block_rows=self.block_rows,
            seed=seed,
            monitoring=self.monitoring,
            mask_layout=self.mask_layout,
            **{k: v for k, v in given.items() if v is not None},
        )

    def _shortest_run(self) -> int | None:
        """The fewest steps, more than ``steps``, whose TimelyFreeze config applies the plan by the middle
        of the run (None if none up to 2**40): doubling, then bisection between a failing and a working
        length."""

        def fits(steps: int) -> bool:
            try:
                self._timelyfreeze_for(steps)
            except ValueError:
                return False
            return True

        low, high = self.steps, self.steps + 1
        while not fits(high):
            if high > 2**40:
                return None
            low, high = high, 2 * high
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if fits(mid) else (mid, high)
        return high

    def replace(self, **changes) -> DemoConfig:
        return dataclasses.replace(self, **changes)
