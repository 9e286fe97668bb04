"""A policy transfer encoded whole, in this thread, by the gateway's own planner (``iter_transfer``).

The gateway streams a transfer while one encoder thread fills it (``PolicyFeed.transfer``); tests that
look at its messages, or feed them to an edge, want all of them at once.
"""

from __future__ import annotations

from cloud.gateway.policy_feed import PIECE_BYTES, Transfer, iter_transfer
from cloud.policy_store import PolicyStore


def encode_transfer(store: PolicyStore, version: int, base_version: int = 0,
                    piece_bytes: int = PIECE_BYTES) -> Transfer:
    """The whole transfer ``base_version`` -> ``version`` (a full one if the base is 0 or unknown)."""
    transfer = Transfer(version, base_version)
    transfer.fill(iter_transfer(store, transfer, piece_bytes))
    return transfer


def messages(transfer: Transfer) -> list[bytes]:
    """Every serialized ``PolicyUpdate`` of an encoded transfer, in order (what ``Transfer.stream`` yields)."""
    return [m for part in transfer.parts for m in ([part] if isinstance(part, bytes) else part.messages())]
