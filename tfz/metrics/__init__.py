"""Freezing metrics (APF, AutoFreeze), their standalone freezers and TimelyFreeze hybrids (``tfz.metrics``).

- Metrics (:class:`APFMetric`, :class:`AutoFreezeMetric`) judge the units of ``tfz.masks`` and flag
  frozen candidates; the protocol is in :mod:`tfz.metrics.base`.
- Standalone baselines (:class:`APFFreezer`, :class:`AutoFreezeFreezer`) are mask providers that
  freeze exactly the candidates in every microbatch.
- :class:`MetricGuidedPolicy` is a selection policy: TimelyFreeze's ratio decides how much, the metric
  which units.
"""

from tfz.metrics.apf import APFConfig, APFMetric, APFStats
from tfz.metrics.autofreeze import AutoFreezeConfig, AutoFreezeMetric, AutoFreezeStats
from tfz.metrics.base import FreezeMetric, FreezePolicy, MetricBase, unit_positions
from tfz.metrics.freezers import APFFreezer, AutoFreezeFreezer, MetricFreezer
from tfz.metrics.hybrid import MetricGuidedPolicy

__all__ = [
    "APFConfig",
    "APFFreezer",
    "APFMetric",
    "APFStats",
    "AutoFreezeConfig",
    "AutoFreezeFreezer",
    "AutoFreezeMetric",
    "AutoFreezeStats",
    "FreezeMetric",
    "FreezePolicy",
    "MetricBase",
    "MetricFreezer",
    "MetricGuidedPolicy",
    "unit_positions",
]
