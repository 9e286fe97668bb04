"""Learning algorithms, one file each, registered by name (``--algorithm``)."""

from cloud.algorithms import hg_dagger  # noqa: F401  (registers "hg_dagger")
from cloud.algorithms.base import ALGORITHMS, Algorithm, register_algorithm

__all__ = ["ALGORITHMS", "Algorithm", "register_algorithm"]
