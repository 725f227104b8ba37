"""Defaults that configs in different layers share, kept where any of them can import it cheaply."""

MAX_FREEZE_RATIO = 0.8
"""Cap on each stage's mean freeze ratio (the paper's experiments): ``tfz.plan.PlanConfig``, ``tfz
plan --max-freeze-ratio`` and ``tfz.demo.DemoConfig`` default to it."""
