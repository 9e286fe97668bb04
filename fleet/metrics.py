"""Prometheus metrics, declared once, ``fleet_`` prefix, base units, bounded labels.

Labels are robot id, task, status code, outcome or kind: never episode ids.
Each process serves its registry with ``serve(port)``.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# --- gateway -------------------------------------------------------------------
GATEWAY_STEPS = Counter("fleet_gateway_steps_ingested_total", "Steps durably written to Redis",
                        ["robot", "task"])
GATEWAY_BYTES = Counter("fleet_gateway_bytes_ingested_total", "Step payload bytes received", ["robot"])
GATEWAY_REJECTED = Counter("fleet_gateway_rejected_total", "RPCs or chunks refused, by gRPC status code", ["code"])
GATEWAY_STREAMS = Gauge("fleet_gateway_experience_streams", "Open experience streams (connected robots)")
GATEWAY_POLICY_BYTES = Counter("fleet_gateway_policy_bytes_sent_total", "Policy bytes sent to edges", ["kind"])

# --- edge ----------------------------------------------------------------------
EDGE_STEPS = Counter("fleet_edge_steps_total", "Control steps executed", ["robot", "task"])
EDGE_INTERVENTION_STEPS = Counter("fleet_edge_intervention_steps_total", "Steps driven by the operator",
                                  ["robot", "task"])
EDGE_INTERVENTIONS = Counter("fleet_edge_interventions_total", "Operator take-overs", ["robot", "task"])
EDGE_EPISODES = Counter("fleet_edge_episodes_total", "Finished episodes", ["robot", "task", "outcome"])
EDGE_TICK_JITTER = Histogram("fleet_edge_tick_jitter_seconds", "Lateness of control ticks", ["robot"],
                             buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1))
EDGE_INFERENCE = Histogram("fleet_edge_inference_seconds", "Policy inference latency", ["robot"],
                           buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25))
EDGE_SPOOL_STEPS = Gauge("fleet_edge_spool_steps", "Steps in the spool not yet acked", ["robot"])
EDGE_SPOOL_BYTES = Gauge("fleet_edge_spool_bytes", "Bytes in the spool not yet acked", ["robot"])
EDGE_SPOOL_DROPPED = Counter("fleet_edge_spool_dropped_steps_total", "Steps dropped by the spool's full policy",
                             ["robot"])
EDGE_POLICY_VERSION = Gauge("fleet_edge_policy_version", "Policy version in use", ["robot"])
EDGE_CONNECTED = Gauge("fleet_edge_connected", "1 while the experience stream is up", ["robot"])
EDGE_LAST_ACK = Gauge("fleet_edge_last_ack_timestamp_seconds", "Unix time of the last ack", ["robot"])

# --- trainer -------------------------------------------------------------------
TRAINER_STEPS = Counter("fleet_trainer_optimizer_steps_total", "Optimizer steps")
TRAINER_SAMPLES = Counter("fleet_trainer_samples_total", "Samples consumed")
TRAINER_LOSS = Gauge("fleet_trainer_loss", "Latest loss by term", ["term"])
TRAINER_VERSIONS = Counter("fleet_trainer_published_versions_total", "Policy versions published")
TRAINER_PUBLISH = Histogram("fleet_trainer_publish_duration_seconds", "Time to publish a version",
                            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
TRAINER_LATEST_VERSION = Gauge("fleet_trainer_latest_version", "Newest published policy version")
TRAINER_BUFFER_LABELED = Gauge("fleet_trainer_buffer_labeled_steps", "Labeled steps visible to the sampler",
                               ["source"])


def serve(port: int) -> None:
    """Serve this process's metrics on ``port`` (0 = do nothing)."""
    if port:
        start_http_server(port)
        log.info("metrics on :%d/metrics", port)
