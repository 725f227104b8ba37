"""Settings of ``tfz demo``: one typed config; the CLI flags set a few of its fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from tfz.schedule import SCHEDULES

__all__ = ["METHODS", "DemoConfig"]

METHODS = ("none", "timelyfreeze", "apf", "autofreeze", "timelyfreeze+apf", "timelyfreeze+autofreeze")
"""Methods the demo compares; ``none`` trains without freezing."""


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """A pipelined training run of every method in ``methods`` on the same data, steps and seed."""

    schedule: str = "1f1b"
    """Pipeline schedule (``tfz.schedule.SCHEDULES``)."""
    ranks: int = 2
    """Pipeline ranks (processes)."""
    steps: int = 100
    """Optimizer steps per method."""
    methods: tuple[str, ...] = ("none", "timelyfreeze")
    """Methods to run, in lockstep (one step of each in turn), so machine noise hits all alike."""
    max_freeze_ratio: float = 0.8
    """TimelyFreeze's cap on each stage's mean freeze ratio."""
    data: str | None = None
    """A text file or folder; default: the running interpreter's standard library sources."""
    out: str = "tfz-demo"
    """Output folder."""
    seed: int = 0
    """Model initialisation, data order and mask draws."""

    microbatches: int = 8
    microbatch_size: int = 4
    """Sequences per microbatch."""
    seq_len: int = 64
    dim: int = 384
    layers_per_stage: int = 2
    n_heads: int = 6
    ffn_dim: int = 1536
    lr: float = 2e-3
    """AdamW peak learning rate (linear warm-up over ``lr_warmup`` steps, then cosine to 10%)."""
    lr_warmup: int = 20
    weight_decay: float = 0.1
    rescale_grads: bool = True
    """Scale each partly frozen row's gradient by microbatches / active microbatches (``tfz.optim``), so
    it is the mean over the microbatches that trained it; measured to halve the loss cost of freezing
    here (tfz.optim's own default is off)."""
    phase_unit: int = 8
    """TimelyFreeze phase unit (steps): warm-up, each monitoring half = 1 unit, ramp = 3 units."""
    check_every: int = 5
    """Decision interval (steps) of TimelyFreeze and of the APF / AutoFreeze checks."""
    block_rows: int = 32
    """Rows per freezing unit of a linear layer."""
    apf_threshold: float = 0.05
    autofreeze_percentile: float = 80.0
    eval_every: int = 25
    """Validation every this many steps (and after the last)."""
    eval_batches: int = 2
    """Validation batches (each ``microbatches * microbatch_size`` sequences)."""
    threads_per_rank: int = 1
    timeout: float = 3600.0
    """Seconds before the whole run is stopped."""
    trace_steps: tuple[int, ...] = field(default=())
    """Steps whose measured timelines are drawn; default: one before freezing starts, the last step."""

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
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
            "layers_per_stage",
            "n_heads",
            "ffn_dim",
            "phase_unit",
            "check_every",
            "block_rows",
            "eval_every",
            "eval_batches",
            "threads_per_rank",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= self.max_freeze_ratio <= 1.0:
            raise ValueError(f"max_freeze_ratio must be in [0, 1], got {self.max_freeze_ratio}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if any(m.startswith("timelyfreeze") for m in self.methods):
            try:
                self.timelyfreeze_config()
            except ValueError as exc:
                raise ValueError(f"TimelyFreeze settings (phase_unit {self.phase_unit}): {exc}") from None
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")

    def timelyfreeze_config(self):
        """The controller config the TimelyFreeze methods run with (validated by its own checks)."""
        from tfz.controller import TimelyFreezeConfig
        from tfz.plan import PlanConfig

        return TimelyFreezeConfig(
            plan=PlanConfig(max_freeze_ratio=self.max_freeze_ratio),
            phase_unit=self.phase_unit,
            check_every=self.check_every,
            block_rows=self.block_rows,
            seed=self.seed,
        )

    @property
    def tokens_per_step(self) -> int:
        return self.microbatches * self.microbatch_size * self.seq_len
