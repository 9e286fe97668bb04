"""Prometheus metrics of every process, declared once: ``fleet_`` prefix, base units, bounded labels.

Labels are robot id, operator id (one of the configured M), task, source (online/offline), gRPC status code,
outcome, rpc, reason, term, kind or mode: never episode ids or sequence numbers (tests/test_observability.py
checks it). Each process serves its metrics with ``serve(port)``;
the fleet-level series computed from Redis (``fleet_robot_*``, ``fleet_window_*``, ``fleet_buffer_*``,
``fleet_redis_*``) come from ``cloud/fleet_metrics.py``, served by the trainer.
docs/observability.md lists every series.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# --- edge ----------------------------------------------------------------------
EPISODE_OUTCOMES = ("success", "failure", "eval_success", "eval_failure")

EDGE_STEPS = Counter("fleet_edge_steps_total", "Control steps executed", ["robot", "task"])
EDGE_INTERVENTION_STEPS = Counter("fleet_edge_intervention_steps_total", "Steps driven by the operator",
                                  ["robot", "task"])
EDGE_INTERVENTIONS = Counter("fleet_edge_interventions_total", "Operator take-overs", ["robot", "task"])
EDGE_EPISODES = Counter("fleet_edge_episodes_total", "Finished episodes by outcome (eval_*: without operator)",
                        ["robot", "task", "outcome"])
EDGE_CONTROL_TARGET = Gauge("fleet_edge_control_target_hertz", "Control rate the loop holds", ["robot"])
EDGE_TICK_JITTER = Histogram("fleet_edge_tick_jitter_seconds", "How late each control tick started", ["robot"],
                             buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25))
EDGE_TICK_OVERRUNS = Counter("fleet_edge_tick_overruns_total", "Ticks whose work ran past the next deadline",
                             ["robot"])
EDGE_INFERENCE = Histogram("fleet_edge_inference_seconds", "Policy select_action latency", ["robot"],
                           buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25))
EDGE_BAD_ACTIONS = Counter("fleet_edge_bad_actions_total", "Policy actions with NaN/Inf, a wrong shape or an error",
                           ["robot"])
SAFETY_VIOLATION_KINDS = ("nonfinite", "position", "effort", "rate")
SAFETY_SOURCES = ("policy", "operator")
EDGE_SAFETY_VIOLATIONS = Counter("fleet_edge_safety_violations_total",
                                 "Actions outside the robot's safety limits (clipped or held before reaching it), by "
                                 "kind (nonfinite, position, effort, rate) and source (policy, operator)",
                                 ["robot", "kind", "source"])
EDGE_SPOOL_STEPS = Gauge("fleet_edge_spool_steps", "Steps in the spool not yet acked", ["robot"])
EDGE_SPOOL_BYTES = Gauge("fleet_edge_spool_bytes", "Bytes in the spool not yet acked", ["robot"])
EDGE_SPOOL_DROPPED = Counter("fleet_edge_spool_dropped_steps_total", "Steps dropped by the full spool", ["robot"])
RECORDER_DROP_REASONS = ("queue_full", "unencodable", "shutdown")
EDGE_RECORDER_DROPPED = Counter("fleet_edge_recorder_dropped_steps_total",
                                "Steps dropped before the spool (a declared gap): queue_full (encoding/spool fell "
                                "behind the control loop), unencodable (bad frames), shutdown (not drained in time)",
                                ["robot", "reason"])
EDGE_RECORDER_QUEUE = Gauge("fleet_edge_recorder_queue_steps", "Steps handed over by the control loop, not yet "
                            "encoded and spooled", ["robot"])
EDGE_POLICY_VERSION = Gauge("fleet_edge_policy_version", "Policy version in use", ["robot"])
EDGE_POLICY_REJECTED = Counter("fleet_edge_policy_rejected_total",
                               "Policy transfers refused (corrupt: checksum/decode/malformed manifest, retried; "
                               "unusable: load failure or NaN actions; too_large: over policy_max_bytes; "
                               "architecture: not the pinned one; signature: not signed by a pinned publisher key; "
                               "downgrade: not newer than the held version; the last five not asked again)", ["robot", "reason"])
EDGE_POLICY_BYTES = Counter("fleet_edge_policy_bytes_received_total", "Policy tensor bytes received, by transfer kind",
                            ["robot", "kind"])
EDGE_CONNECTED = Gauge("fleet_edge_connected", "1 while the experience stream is up", ["robot"])
EDGE_LAST_ACK = Gauge("fleet_edge_last_ack_timestamp_seconds", "Unix time of the last ack (age: time() - this)",
                      ["robot"])
EDGE_SPOOL_QUARANTINED = Counter("fleet_edge_spool_quarantined_steps_total",
                                 "Steps the gateway refused as invalid, moved aside instead of resent", ["robot"])
EDGE_STREAM_ERRORS = Counter("fleet_edge_stream_errors_total", "Experience stream failures by gRPC status code",
                             ["robot", "code"])
EDGE_ROS2_HOLDS = Counter("fleet_edge_ros2_holds_total", "Times a ROS 2 robot stopped commanding: sensor data "
                          "stale (older than max_sensor_age_s) or missing, or the reset service gone", ["node"])
EDGE_ROS2_HOLDING = Gauge("fleet_edge_ros2_holding", "1 while a ROS 2 robot holds (sends no commands)", ["node"])

# --- gateway -------------------------------------------------------------------
REJECTION_CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "DATA_LOSS",
                   "UNAUTHENTICATED", "PERMISSION_DENIED", "INTERNAL")
STREAM_RPCS = ("StreamExperience", "WatchPolicy")
STREAM_ERROR_REASONS = ("cancelled", "redis", "internal")
POLICY_TRANSFER_KINDS = ("full", "delta")
BACKPRESSURE_REASONS = ("robot_bytes", "global_bytes", "streams", "redis_full")

GATEWAY_STEPS = Counter("fleet_gateway_steps_ingested_total", "Steps durably written to Redis", ["robot", "task"])
GATEWAY_DUPLICATE_STEPS = Counter("fleet_gateway_duplicate_steps_total",
                                  "Steps received again after a reconnect (acked, not stored twice)", ["robot"])
GATEWAY_BYTES = Counter("fleet_gateway_bytes_ingested_total", "Step payload bytes received", ["robot", "task"])
GATEWAY_REJECTED = Counter("fleet_gateway_rejected_total", "RPCs or chunks refused, by gRPC status code", ["code"])
GATEWAY_INFLIGHT_BYTES = Gauge("fleet_gateway_inflight_bytes", "Bytes of chunks received and not yet acked")
GATEWAY_BACKPRESSURE = Counter("fleet_gateway_backpressure_total",
                               "Chunks held (waited) or refused to bound gateway memory and protect Redis, by reason "
                               "(robot_bytes, global_bytes, streams, redis_full)", ["reason", "outcome"])
GATEWAY_INGEST = Histogram("fleet_gateway_ingest_duration_seconds", "Validate + atomic Redis write of one chunk",
                           buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
GATEWAY_STREAMS = Gauge("fleet_gateway_experience_streams", "Open experience streams")
GATEWAY_CONNECTED_ROBOTS = Gauge("fleet_gateway_connected_robots", "Robots with an open experience stream")
GATEWAY_POLICY_STREAMS = Gauge("fleet_gateway_policy_streams", "Open WatchPolicy streams")
GATEWAY_POLICY_BYTES = Counter("fleet_gateway_policy_bytes_sent_total", "Policy bytes sent to edges, by transfer kind",
                               ["kind"])
GATEWAY_STREAM_ERRORS = Counter("fleet_gateway_stream_errors_total",
                                "Streams that ended abnormally (cancelled: the client went away)", ["rpc", "reason"])
GATEWAY_POLICY_ENCODE = Histogram("fleet_gateway_policy_encode_seconds",
                                  "Time to encode one policy transfer (once per target and base version)", ["kind"],
                                  buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
GATEWAY_POLICY_LAG = Gauge("fleet_gateway_policy_lag_versions",
                           "Versions between the newest policy and the one each watching robot holds", ["robot"])
GATEWAY_POLICY_REFUSED = Counter("fleet_gateway_policy_refused_versions_total",
                                 "Versions a robot reported it refused (load failure, NaN actions)", ["robot"])
GATEWAY_BAD_ASSIGNMENTS = Counter("fleet_gateway_bad_assignments_total",
                                  "Malformed fleet:ops:assignments entries a heartbeat met (answered: no operator)")


def count_gateway_rejection(code) -> None:
    """Count a call the gateway refused, under its gRPC status name (``code``: a ``grpc.StatusCode``)."""
    GATEWAY_REJECTED.labels(code=code.name).inc()


_OWNED = {"registry": None}
"""Constructor argument of series that only the process owning them exports (registered by ``_register_owned``)."""
_registered_groups: set[str] = set()
_registering = threading.Lock()


def _register_owned(group: str, series) -> None:
    """Register ``series`` (built with ``**_OWNED``) with the default registry, once per process."""
    from prometheus_client import REGISTRY

    with _registering:
        if group not in _registered_groups:
            _registered_groups.add(group)
            for metric in series:
                REGISTRY.register(metric)


# --- trainer -------------------------------------------------------------------
SOURCES = ("online", "offline")
# The unlabelled trainer series marked **_OWNED are registered only in the trainer's process (``init_trainer``):
# every other process (gateway, edge, operators) would export them at 0, and the alerts over them (trainer not
# stepping, trainer's Redis down, checkpoint too old) would fire for each of those targets.
TRAINER_STEPS = Counter("fleet_trainer_optimizer_steps_total", "Optimizer steps", **_OWNED)
TRAINER_SAMPLES = Counter("fleet_trainer_samples_total", "Samples consumed, by task and source", ["task", "source"])
TRAINER_UPDATE = Histogram("fleet_trainer_update_duration_seconds", "One optimizer step (forward, backward, step)",
                           buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), **_OWNED)
TRAINER_LOSS = Gauge("fleet_trainer_loss", "Loss of the latest batch, by term", ["term"])
TRAINER_TASK_LOSS = Gauge("fleet_trainer_task_loss", "Mean per-sample loss of the latest batch, by task and source",
                          ["task", "source", "term"])
TRAINER_ONLINE_SHARE = Gauge("fleet_trainer_online_share", "Share of a task's samples the sampler draws online",
                             ["task"])
TRAINER_VERSIONS = Counter("fleet_trainer_published_versions_total", "Policy versions published", **_OWNED)
TRAINER_PUBLISH = Histogram("fleet_trainer_publish_duration_seconds", "Time to publish a version",
                            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), **_OWNED)
TRAINER_LATEST_VERSION = Gauge("fleet_trainer_latest_version", "Newest policy version this trainer published", **_OWNED)
TRAINER_TRAINABLE_STEPS = Gauge("fleet_trainer_trainable_steps",
                                "Steps the sampler can draw (labels; whole episodes for episode-based algorithms)",
                                ["task", "source"])
TRAINER_CHECKPOINT = Histogram("fleet_trainer_checkpoint_duration_seconds", "Time to write one checkpoint",
                               buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), **_OWNED)
TRAINER_LAST_CHECKPOINT = Gauge("fleet_trainer_last_checkpoint_timestamp_seconds",
                                "Unix time of the last complete checkpoint (0 = none yet; age: time() - this)",
                                **_OWNED)
TRAINER_REDIS_UP = Gauge("fleet_trainer_redis_up",
                         "1 while the trainer's own Redis connection works; 0 while it waits out an outage "
                         "(sampling and publishing paused)", **_OWNED)
TRAINER_SKIPPED_RECORDS = Counter("fleet_trainer_skipped_records_total",
                                  "Buffer records the trainer could not use and skipped, by reason", ["reason"])
SKIPPED_RECORD_REASONS = ("corrupt_registration", "other_schema", "schema_changed", "corrupt_labeled",
                          "corrupt_event", "corrupt_catalog", "unknown_task", "corrupt_step", "corrupt_image",
                          "schema_mismatch", "length_mismatch", "missing_episode")
"""Every ``reason`` of TRAINER_SKIPPED_RECORDS (docs/learner-recovery.md): the label stays bounded."""
TRAINER_EVICTED_EPISODES = Counter("fleet_trainer_evicted_episodes_total",
                                   "Episodes retention deleted from the buffer that the trainer's index dropped",
                                   **_OWNED)
TRAINER_PUBLISH_FAILURES = Counter("fleet_trainer_publish_failures_total",
                                   "Publishes postponed because the policy store refused the write (OSError)", **_OWNED)

_TRAINER_SERIES = (TRAINER_STEPS, TRAINER_UPDATE, TRAINER_VERSIONS, TRAINER_PUBLISH, TRAINER_LATEST_VERSION,
                   TRAINER_CHECKPOINT, TRAINER_LAST_CHECKPOINT, TRAINER_REDIS_UP, TRAINER_EVICTED_EPISODES,
                   TRAINER_PUBLISH_FAILURES)

# --- operators (cloud/operators/service.py: `fleet operators`) ---------------------
# Registered only in the operators process (``init_operators``): every other process would export these
# unlabelled series at 0, and the rules over them (a utilisation average, the wait alert) would see those too.
OPERATOR_MODES = ("automatic", "manual")
_OPS = _OWNED
OPERATORS = Gauge("fleet_operators", "Operators the allocator shares among the robots (M)", **_OPS)
OPERATORS_ASSIGNED = Gauge("fleet_operators_assigned", "Operators holding a robot now", **_OPS)
OPERATORS_UTILISATION = Gauge("fleet_operators_utilisation_ratio", "Share of the operators holding a robot now",
                              **_OPS)
OPERATOR_BUSY = Counter("fleet_operator_busy_seconds", "Seconds each operator held a robot", ["operator"], **_OPS)
OPERATORS_QUEUE = Gauge("fleet_operators_queue_robots", "Robots that want help and have no operator (the queue)",
                        **_OPS)
OPERATORS_WANTING = Gauge("fleet_operators_wanting_robots", "Robots that want help, with or without an operator",
                          **_OPS)
OPERATORS_HOLDING = Gauge("fleet_operators_holding_robots",
                          "Robots stopped (or on their fallback) because they want help and have no operator", **_OPS)
OPERATORS_LONGEST_WAIT = Gauge("fleet_operators_longest_wait_seconds",
                               "Longest time a robot in the queue has wanted help (0: queue empty)", **_OPS)
OPERATORS_WAIT_ALERT = Gauge("fleet_operators_wait_alert_seconds",
                             "The service's --wait_alert_s: FleetRobotWaitingForOperator fires above it", **_OPS)
OPERATORS_TIME_TO_HELP = Histogram("fleet_operators_time_to_help_seconds",
                                   "From wanting help to getting an operator (the robot's wanted_for_s then)",
                                   buckets=(0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600), **_OPS)
OPERATORS_ASSIGNMENTS = Counter("fleet_operators_assignments", "Operators put on a robot, by mode (automatic: the "
                                "allocator; manual: a take-over in the console)", ["mode"], **_OPS)
OPERATORS_REDIS_UP = Gauge("fleet_operators_redis_up", "1 while the operators service reaches Redis; 0 while it "
                           "waits out an outage (assignments keep their last state in Redis)", **_OPS)
_OPERATOR_SERIES = (OPERATORS, OPERATORS_ASSIGNED, OPERATORS_UTILISATION, OPERATOR_BUSY, OPERATORS_QUEUE,
                    OPERATORS_WANTING, OPERATORS_HOLDING, OPERATORS_LONGEST_WAIT, OPERATORS_WAIT_ALERT,
                    OPERATORS_TIME_TO_HELP, OPERATORS_ASSIGNMENTS, OPERATORS_REDIS_UP)


def init_operators() -> None:
    """Register the operator series with the default registry (once per process: the operators service)."""
    _register_owned("operators", _OPERATOR_SERIES)


# --- blob store (cloud/blobstore.py; gateway, trainer, retention) --------------
BLOB_STORE_KINDS = ("put", "get", "delete", "list")
BLOB_STORE_OUTCOMES = ("ok", "not_found", "unavailable", "invalid", "error")
BLOB_STORE_OPERATIONS = Counter("fleet_blob_store_operations", "Blob store calls, by backend (mode: local, s3), "
                                "operation (kind) and outcome (ok, not_found, unavailable, invalid, error)",
                                ["mode", "kind", "outcome"])
BLOB_STORE_BYTES = Counter("fleet_blob_store_bytes", "Object bytes written (put) and read (get)", ["mode", "kind"])
BLOB_STORE_DURATION = Histogram("fleet_blob_store_operation_duration_seconds", "Duration of successful blob store calls",
                                ["mode", "kind"],
                                buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))

# --- retention (cloud/retention.py) ----------------------------------------------
RETENTION_BUFFER_BYTES = Gauge("fleet_retention_buffer_bytes", "Buffer bytes by tier (kind: online, intervention, "
                               "offline) and where they are (mode: redis, blob), after the last retention pass",
                               ["kind", "mode"])
RETENTION_BUDGET_USED = Gauge("fleet_retention_budget_used_ratio",
                              "Buffer bytes / retention max_bytes after the last pass (0: no byte budget)")
RETENTION_EVICTIONS = Counter("fleet_retention_evictions", "Episodes evicted, by budget (reason: age, buffer_bytes, "
                              "robot_bytes, task_bytes, redis_bytes) and tier (kind)", ["reason", "kind"])
RETENTION_EVICTED_BYTES = Counter("fleet_retention_evicted_bytes", "Bytes freed by evictions (mode: redis, blob)",
                                  ["mode"])
RETENTION_ARCHIVED = Counter("fleet_retention_archived_episodes", "Evicted episodes archived to a LeRobotDataset first")
RETENTION_FAILURES = Counter("fleet_retention_failures",
                             "Retention passes cut short (reason: backend, archive) or unable to meet redis_max_bytes "
                             "(redis_overhead: Redis memory no episode accounts for fills the budget)",
                             ["reason"])
RETENTION_LAST_PASS = Gauge("fleet_retention_last_pass_timestamp_seconds", "Unix time of the last retention pass")


# --- helpers -------------------------------------------------------------------

class EdgeSeries:
    """One robot's control-loop series, label children bound once (the loop calls these every tick)."""

    def __init__(self, robot_id: str, tasks: Sequence[str] = ()):
        self.robot_id = robot_id
        self._jitter = EDGE_TICK_JITTER.labels(robot=robot_id)
        self._inference = EDGE_INFERENCE.labels(robot=robot_id)
        self._overruns = EDGE_TICK_OVERRUNS.labels(robot=robot_id)
        self._bad_actions = EDGE_BAD_ACTIONS.labels(robot=robot_id)
        self._per_task: dict[str, tuple[Counter, Counter, Counter]] = {}
        EDGE_SPOOL_DROPPED.labels(robot=robot_id)
        EDGE_CONNECTED.labels(robot=robot_id)
        for task in tasks:
            self._task(task)
            for outcome in EPISODE_OUTCOMES:
                EDGE_EPISODES.labels(robot=robot_id, task=task, outcome=outcome)

    def _task(self, task: str) -> tuple[Counter, Counter, Counter]:
        children = self._per_task.get(task)
        if children is None:
            labels = {"robot": self.robot_id, "task": task}
            children = (EDGE_STEPS.labels(**labels), EDGE_INTERVENTION_STEPS.labels(**labels),
                        EDGE_INTERVENTIONS.labels(**labels))
            self._per_task[task] = children
        return children

    def step(self, task: str, intervening: bool, took_over: bool, jitter_s: float | None) -> None:
        steps, intervention_steps, interventions = self._task(task)
        steps.inc()
        if intervening:
            intervention_steps.inc()
        if took_over:
            interventions.inc()
        if jitter_s is not None:
            self._jitter.observe(max(jitter_s, 0.0))

    def inference(self, seconds: float) -> None:
        self._inference.observe(seconds)

    def overrun(self) -> None:
        self._overruns.inc()

    def bad_action(self) -> None:
        self._bad_actions.inc()


def init_trainer(tasks: Sequence[str]) -> None:
    """Register the trainer's own series (once per process) and create its per-task series at 0 (a task without
    online data yet shows 0, not nothing)."""
    _register_owned("trainer", _TRAINER_SERIES)
    for task in tasks:
        for source in SOURCES:
            TRAINER_SAMPLES.labels(task=task, source=source)
    for reason in SKIPPED_RECORD_REASONS:
        TRAINER_SKIPPED_RECORDS.labels(reason=reason)


def record_update(batch: dict, tasks: Sequence[str], stats: dict[str, float], sample_losses, duration_s: float,
                  loss_term: str = "policy") -> None:
    """One optimizer step: steps, duration, samples and per-sample loss by (task, source), losses by term."""
    TRAINER_STEPS.inc()
    TRAINER_UPDATE.observe(duration_s)
    for key, value in stats.items():
        if key.startswith("loss/"):
            TRAINER_LOSS.labels(term=key[5:]).set(value)
    task_index = np.asarray(batch["task_index"])
    online = np.asarray(batch.get("is_online", np.zeros(len(task_index), dtype=bool)), dtype=bool)
    losses = None if sample_losses is None else np.asarray(sample_losses, dtype=np.float64).reshape(-1)
    for ti in np.unique(task_index):
        task = tasks[ti] if 0 <= ti < len(tasks) else "unknown"
        for source, mask in (("online", online), ("offline", ~online)):
            sel = (task_index == ti) & mask
            n = int(sel.sum())
            if not n:
                continue
            TRAINER_SAMPLES.labels(task=task, source=source).inc(n)
            if losses is not None and losses.shape == task_index.shape:
                TRAINER_TASK_LOSS.labels(task=task, source=source, term=loss_term).set(float(losses[sel].mean()))


def record_sampler(trainable_steps: dict[tuple[str, str], int], online_share: dict[str, float]) -> None:
    """What the sampler can draw, by (task, source), and the online share it draws per task."""
    for (task, source), n in trainable_steps.items():
        TRAINER_TRAINABLE_STEPS.labels(task=task, source=source).set(n)
    for task, share in online_share.items():
        TRAINER_ONLINE_SHARE.labels(task=task).set(share)


MAX_TASK_LABELS = 256
"""Distinct ``task`` label values one process exports; later tasks are counted under "other"."""
_task_labels: set[str] = set()
_task_labels_lock = threading.Lock()


def task_label(task: str) -> str:
    """``task`` as a metric label value, keeping the label bounded: every robot may register up to 64 tasks,
    and 1,000 tasks used to grow a gateway's /metrics from 18 KB to 1.1 MB."""
    if task in _task_labels:
        return task
    with _task_labels_lock:
        if len(_task_labels) < MAX_TASK_LABELS:
            _task_labels.add(task)
            return task
    return "other"


def init_gateway() -> None:
    """Create the gateway's labelled error series at 0, so dashboards and alerts see them before any error."""
    for code in REJECTION_CODES:
        GATEWAY_REJECTED.labels(code=code)
    for rpc in STREAM_RPCS:
        for reason in STREAM_ERROR_REASONS:
            GATEWAY_STREAM_ERRORS.labels(rpc=rpc, reason=reason)
    for kind in POLICY_TRANSFER_KINDS:
        GATEWAY_POLICY_BYTES.labels(kind=kind)
    for reason in BACKPRESSURE_REASONS:
        for outcome in ("waited", "refused"):
            GATEWAY_BACKPRESSURE.labels(reason=reason, outcome=outcome)


class RobotStreams:
    """Distinct robots with an open experience stream in this process (``fleet_gateway_connected_robots``)."""

    def __init__(self) -> None:
        self._open: collections.Counter[str] = collections.Counter()

    def opened(self, robot_id: str) -> None:
        self._open[robot_id] += 1
        GATEWAY_CONNECTED_ROBOTS.set(len(self._open))

    def closed(self, robot_id: str) -> None:
        self._open[robot_id] -= 1
        if self._open[robot_id] <= 0:
            del self._open[robot_id]
        GATEWAY_CONNECTED_ROBOTS.set(len(self._open))


GATEWAY_ROBOT_STREAMS = RobotStreams()
"""Process-wide, like the gauge it sets (several servicers in one process share it)."""


def _stream_error_reason(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled"
    if type(exc).__module__.startswith("redis") or isinstance(exc, (ConnectionError, TimeoutError)):
        return "redis"
    return "internal"


@contextlib.contextmanager
def stream_scope(rpc: str, gauge: Gauge, passthrough: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Count an open stream in ``gauge``; count its abnormal end in ``fleet_gateway_stream_errors_total``.

    Exceptions of a ``passthrough`` type (errors already counted as rejections) are not counted."""
    gauge.inc()
    try:
        yield
    except passthrough:
        raise
    except (Exception, asyncio.CancelledError, GeneratorExit) as exc:
        GATEWAY_STREAM_ERRORS.labels(rpc=rpc, reason=_stream_error_reason(exc)).inc()
        raise
    finally:
        gauge.dec()


def serve(port: int, addr: str = "0.0.0.0"):
    """Serve this process's metrics on ``port`` (0 = do nothing); returns the server (``shutdown()`` stops it)."""
    if not port:
        return None
    server, _ = start_http_server(port, addr=addr)
    log.info("metrics on %s:%d/metrics", addr, port)
    return server
