"""FreezableLinear and its row-masked, optionally deferred weight gradient (``tfz.nn``).

Entry points: :class:`FreezableLinear` / :func:`convert_to_freezable` (model surgery),
:func:`use_row_masks` (which rows get dW), :class:`WeightGradStore` (B/W split).
"""

from tfz.nn.context import RowMask, RowUsage, prepare_row_masks, reset_row_usage, use_row_masks
from tfz.nn.freezable_linear import ConversionReport, FreezableLinear, convert_to_freezable, linear_flops
from tfz.nn.function import FreezableLinearFunction, freezable_linear
from tfz.nn.store import WeightGradStore

__all__ = [
    "ConversionReport",
    "FreezableLinear",
    "FreezableLinearFunction",
    "RowMask",
    "RowUsage",
    "WeightGradStore",
    "convert_to_freezable",
    "freezable_linear",
    "linear_flops",
    "prepare_row_masks",
    "reset_row_usage",
    "use_row_masks",
]
