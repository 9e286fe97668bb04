"""Shared core of the fleet learning system: config, wire codec, metrics, policy adapters."""

PROTOCOL_VERSION = "fleet.v1/1"
__version__ = "0.1.0"
