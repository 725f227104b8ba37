"""One pipeline action: (stage, kind, microbatch), written as torch's ``_Action`` string (``2F0``)."""

from __future__ import annotations

import re
from typing import NamedTuple

from tfz._validate import short_repr

KINDS = ("F", "B", "I", "W")
"""F forward, B full backward (dX and dW), I backward for inputs (dX), W backward for weights (dW)."""

FREEZABLE_KINDS = ("B", "W")
"""Kinds whose duration shrinks when parameters are frozen."""

_ACTION_RE = re.compile(r"^\s*([0-9]+)([FBIW])([0-9]+)\s*$")  # ASCII digits only: int() takes others


class Action(NamedTuple):
    """A compute action of one stage on one microbatch. ``str(Action(2, "F", 0)) == "2F0"``."""

    stage: int
    kind: str
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse ``"<stage><F|B|I|W><microbatch>"`` (numbers of at most 18 digits); raises ValueError
        naming the bad text."""
        m = _ACTION_RE.match(text) if isinstance(text, str) else None
        if m is None or len(m.group(1)) > 18 or len(m.group(3)) > 18:
            raise ValueError(
                f"malformed action {short_repr(text)}: expected <stage><F|B|I|W><microbatch> with numbers "
                "of at most 18 digits, e.g. '2F0' or '3W1'"
            )
        return cls(int(m.group(1)), m.group(2), int(m.group(3)))
