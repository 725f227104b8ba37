"""The freeze-ratio LP (``tfz.plan``): how much to freeze each B/W action so the step is shortest.

``solve(dag, unfrozen, frozen, PlanConfig(...))`` returns a :class:`Plan`: the lexicographic optimum
of two exact LP stages, first the minimal makespan, then the minimal total ratio at that makespan,
under a cap on each stage's mean ratio (and optionally on each ratio). ``solve_generic`` solves the
plain formulation and serves as the reference. See :mod:`tfz.plan.problem` for the LP,
:mod:`tfz.plan.solver` for how it is solved (a network simplex with one side column per stage cap,
:mod:`tfz.plan.flow`, native in ``tfz.plan._sidesimplex``; HiGHS when that is not built:
:data:`NATIVE`) and ``solve(..., warm_start=plan)`` for re-planning after durations drift.
"""

from tfz.plan._highs import PlanSolveError
from tfz.plan.flow import NATIVE
from tfz.plan.generic import solve_generic
from tfz.plan.problem import PlanConfig, PlanProblem
from tfz.plan.result import Plan
from tfz.plan.solver import solve

__all__ = ["NATIVE", "Plan", "PlanConfig", "PlanProblem", "PlanSolveError", "solve", "solve_generic"]
