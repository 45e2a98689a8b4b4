"""`dlopt optimize`: candidate recipes (candidates), their evaluation through the stage cache and the
executor (evaluation), the Pareto front (pareto), the HTML report (report) and the search (driver)."""

from dlopt.search.driver import OptimizeConfig, OptimizeResult, optimize
from dlopt.search.pareto import Point, choose, pareto_front

__all__ = ["OptimizeConfig", "OptimizeResult", "Point", "choose", "optimize", "pareto_front"]
