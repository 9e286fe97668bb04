"""Learning algorithms, one file each, registered by name (``--algorithm.type``)."""

from cloud.algorithms import hg_dagger, recap  # noqa: F401  (register "hg_dagger" and "recap")
from cloud.algorithms.base import ALGORITHMS, Algorithm, AlgorithmConfig, Update, algorithm_class, register_algorithm

__all__ = ["ALGORITHMS", "Algorithm", "AlgorithmConfig", "Update", "algorithm_class", "register_algorithm"]
