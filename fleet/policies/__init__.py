"""Policies the fleet trains and acts with.

The LeRobot adapter is imported on first use of one of its names, so that
``fleet.policies.base`` stays cheap to import (LeRobot takes seconds to load).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fleet.policies.base import ActingPolicy

if TYPE_CHECKING:
    from fleet.policies.lerobot_adapter import (
        SUPPORTED_POLICY_TYPES,
        FleetPolicy,
        NormStats,
        PolicyConfig,
        build_policy,
        set_torch_threads,
    )

_ADAPTER_NAMES = ("SUPPORTED_POLICY_TYPES", "FleetPolicy", "NormStats", "PolicyConfig", "build_policy",
                  "set_torch_threads")

__all__ = ["ActingPolicy", *_ADAPTER_NAMES]


def __getattr__(name: str) -> Any:
    if name in _ADAPTER_NAMES:
        return getattr(importlib.import_module("fleet.policies.lerobot_adapter"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
