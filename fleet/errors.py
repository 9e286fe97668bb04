"""One exception hierarchy for the whole system.

Every error that can cross a process boundary derives from :class:`FleetError`
and names the gRPC status it maps to; ``cloud/gateway/interceptors.py`` is the
one place that turns them into status codes.
"""

from __future__ import annotations


class FleetError(Exception):
    """Base class. ``grpc_code`` is the name of a ``grpc.StatusCode`` member."""

    grpc_code = "INTERNAL"


class InvalidInput(FleetError):
    """Malformed or inconsistent data from a peer (bad dtype/shape, NaN, truncated image...)."""

    grpc_code = "INVALID_ARGUMENT"
    step_seq: int | None = None
    """Sequence number of the one step to blame, when there is one (sent as trailing metadata)."""


class SchemaMismatch(InvalidInput):
    """A chunk does not match the schema its robot registered."""


class UnknownRobot(FleetError):
    """A robot id that has not registered."""

    grpc_code = "NOT_FOUND"


class SequenceGap(FleetError):
    """Steps are missing between the last acked sequence number and this chunk."""

    grpc_code = "FAILED_PRECONDITION"

    def __init__(self, message: str, last_acked_seq: int):
        super().__init__(message)
        self.last_acked_seq = last_acked_seq


class IncompatiblePeer(FleetError):
    """The peer speaks another protocol version or has an incompatible config."""

    grpc_code = "FAILED_PRECONDITION"


class Overloaded(FleetError):
    """Too much in flight; retry after ``retry_after_s``."""

    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendUnavailable(FleetError):
    """A backend the gateway needs (Redis, the blob store) did not answer; nothing was acked, retry after ``retry_after_s``."""

    grpc_code = "UNAVAILABLE"

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BlobNotFound(FleetError):
    """An object-store key with no object (evicted, or never written)."""

    grpc_code = "NOT_FOUND"


class IntegrityError(FleetError):
    """A transfer whose checksum does not match (corrupt or truncated)."""

    grpc_code = "DATA_LOSS"


class PolicyUnusable(FleetError):
    """A verified policy version that fails to load or acts with NaN/Inf: the edge refuses that version."""

    grpc_code = "FAILED_PRECONDITION"

    def __init__(self, message: str, version: int):
        super().__init__(message)
        self.version = version


class PolicyRefused(PolicyUnusable):
    """A version this robot refuses from its manifest alone, before allocating anything: too large for the
    local memory bound, or another architecture than the pinned one. ``reason`` is a bounded label."""

    def __init__(self, message: str, version: int, reason: str):
        super().__init__(message, version)
        self.reason = reason


class ConfigError(FleetError, ValueError):
    """A configuration value that cannot work; the message names the field and value."""

    grpc_code = "INVALID_ARGUMENT"


class Unauthenticated(FleetError):
    """No credentials, or credentials that do not verify (bad/expired/revoked token)."""

    grpc_code = "UNAUTHENTICATED"


class PermissionDenied(FleetError):
    """Valid credentials that do not allow this call (e.g. a robot acting as another robot)."""

    grpc_code = "PERMISSION_DENIED"
