"""Shared core of the fleet learning system: config, wire codec, metrics, policy adapters."""

PROTOCOL_VERSION = "fleet.v1/2"
"""Protocol 2: columnar chunks (StreamColumns); protocol 1 (per-step StreamExperience) is refused."""
__version__ = "0.1.0"
