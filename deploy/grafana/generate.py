"""Generate the fleet's Grafana dashboards (JSON, schema 39) from one description in code.

    python deploy/grafana/generate.py          # rewrites deploy/grafana/dashboards/*.json

Three dashboards: fleet overview, per-robot drill-down (variable ``robot``), learner (trainer,
buffer, Redis, gateways). Every panel is a PromQL query over series that exist (the live test in
tests/test_observability.py evaluates each one against a simulated fleet); panels select on metric
names and ``robot``, never on job or instance. No dependency beyond the standard library.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
OUT_DIR = Path(__file__).resolve().parent / "dashboards"


@dataclass
class Panel:
    title: str
    queries: list[tuple[str, str]]
    """(PromQL, legend) pairs."""
    unit: str = "short"
    kind: str = "timeseries"
    """timeseries, stat or table."""
    width: int = 8
    height: int = 8
    description: str = ""
    extra: dict = field(default_factory=dict)


def _panel(p: Panel, pid: int, x: int, y: int) -> dict:
    targets = []
    for i, (expr, legend) in enumerate(p.queries):
        target = {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
        if p.kind in ("stat", "table"):
            target.update(instant=True, range=False)
        if p.kind == "table":
            target["format"] = "table"
        targets.append(target)
    panel = {
        "id": pid, "type": p.kind, "title": p.title, "description": p.description, "datasource": DATASOURCE,
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y}, "targets": targets,
        "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []}, "options": {},
    }
    if p.kind == "timeseries":
        panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    if p.kind == "stat":
        panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                            "colorMode": "value", "graphMode": "none"}
    if p.kind == "table":
        panel["transformations"] = [{"id": "merge", "options": {}},
                                    {"id": "organize", "options": {"excludeByName": {"Time": True}}}]
    panel.update(p.extra)
    return panel


def dashboard(uid: str, title: str, description: str, rows: list[tuple[str, list[Panel]]],
              variables: list[dict] | None = None) -> dict:
    """Lay out rows of panels on Grafana's 24-column grid."""
    panels, pid, y = [], 1, 0
    for row_title, row in rows:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y, x, row_h = pid + 1, y + 1, 0, 0
        for p in row:
            if x + p.width > 24:
                x, y, row_h = 0, y + row_h, 0
            panels.append(_panel(p, pid, x, y))
            pid, x, row_h = pid + 1, x + p.width, max(row_h, p.height)
        y += row_h
    templating = [{"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
                   "current": {}, "hide": 0, "refresh": 1}]
    templating += variables or []
    return {
        "uid": uid, "title": title, "description": description, "tags": ["fleet"], "editable": True,
        "schemaVersion": 39, "version": 1, "timezone": "browser", "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"}, "graphTooltip": 1, "panels": panels,
        "templating": {"list": templating}, "annotations": {"list": []},
        "links": [{"title": "Fleet", "type": "dashboards", "tags": ["fleet"], "asDropdown": True}],
    }


def fleet_overview() -> dict:
    return dashboard("fleet-overview", "Fleet overview",
                     "Is the fleet working and getting better: robots, policy versions, success, human effort.", [
        ("Now", [
            Panel("Robots connected", [("sum(fleet_robot_connected)", "connected")], kind="stat", width=4,
                  height=4),
            Panel("Latest policy version", [("max(fleet_policy_latest_version)", "version")], kind="stat",
                  width=4, height=4),
            Panel("Steps ingested", [(f"sum(rate(fleet_gateway_steps_ingested_total[{RATE}]))", "steps/s")],
                  kind="stat", unit="short", width=4, height=4),
            Panel("Autonomous success (window)",
                  [('sum(fleet_window_successes{mode="autonomous"}) / sum(fleet_window_episodes{mode="autonomous"})',
                    "success")], kind="stat", unit="percentunit", width=4, height=4),
            Panel("Intervention ratio (window)",
                  [("sum(fleet_window_intervention_steps) / sum(fleet_window_steps)", "interventions")],
                  kind="stat", unit="percentunit", width=4, height=4),
            Panel("Return on Human Effort (window)",
                  [("sum(fleet_window_successes) / (1 + sum(fleet_window_intervention_steps))", "ROHE")],
                  kind="stat", width=4, height=4,
                  description="Successes per operator-driven step over the window (Fleet-DAgger)."),
        ]),
        ("Learning, per task", [
            Panel("Autonomous success ratio", [('fleet_window_success_ratio{mode="autonomous"}', "{{task}}")],
                  unit="percentunit", description="Evaluation episodes (no operator) over the window."),
            Panel("Intervention ratio", [("fleet_window_intervention_ratio", "{{task}}")], unit="percentunit",
                  description="Operator-driven share of the steps of supervised episodes."),
            Panel("Return on Human Effort", [("fleet_window_return_on_human_effort", "{{task}}")],
                  description="Successes / (1 + intervention steps) over the window."),
            Panel("Human effort (intervention steps in window)", [("fleet_window_intervention_steps", "{{task}}")]),
            Panel("Episodes in window", [("fleet_window_episodes", "{{task}} {{mode}}")]),
            Panel("Steps stored per second by task",
                  [(f"sum by (task) (rate(fleet_gateway_steps_ingested_total[{RATE}]))", "{{task}}")]),
        ]),
        ("Robots", [
            Panel("Robots", [
                ("max by (robot) (fleet_robot_connected)", "connected"),
                ("max by (robot) (fleet_robot_policy_version)", "version"),
                ("max by (robot) (fleet_robot_policy_version_lag)", "lag"),
                (f"sum by (robot) (rate(fleet_robot_steps_stored_total[{RATE}]))", "steps/s"),
                ("max by (robot) (fleet_robot_spool_steps)", "spool steps"),
            ], kind="table", width=24, height=8),
            Panel("Policy version lag", [("fleet_robot_policy_version_lag", "{{robot}}")]),
            Panel("Steps ingested per second",
                  [(f"sum by (robot) (rate(fleet_gateway_steps_ingested_total[{RATE}]))", "{{robot}}")]),
            Panel("Spool backlog", [("fleet_robot_spool_bytes", "{{robot}}")], unit="bytes"),
            Panel("Rejected requests by code",
                  [(f"sum by (code) (rate(fleet_gateway_rejected_total[{RATE}]))", "{{code}}")], unit="reqps"),
            Panel("Seconds since last heartbeat", [("time() - fleet_robot_last_seen_timestamp_seconds", "{{robot}}")],
                  unit="s"),
            Panel("Intervention share by robot",
                  [(f"sum by (robot) (rate(fleet_edge_intervention_steps_total[{RATE}])) / "
                    f"sum by (robot) (rate(fleet_edge_steps_total[{RATE}]))", "{{robot}}")], unit="percentunit"),
        ]),
    ])


def robot_drilldown() -> dict:
    r = 'robot="$robot"'
    variable = {"name": "robot", "label": "Robot", "type": "query", "datasource": DATASOURCE,
                "query": {"query": 'label_values(fleet_robot_info{source="online"}, robot)', "refId": "robot"},
                "definition": 'label_values(fleet_robot_info{source="online"}, robot)', "refresh": 2,
                "sort": 1, "current": {}, "hide": 0, "includeAll": False, "multi": False}
    return dashboard("fleet-robot", "Fleet robot",
                     "One robot: control loop, inference, spool, connection, interventions, episodes.", [
        ("Now", [
            Panel("Connected", [(f"max(fleet_robot_connected{{{r}}})", "heartbeat"),
                                (f"max(fleet_edge_connected{{{r}}})", "stream")], kind="stat", width=6, height=4),
            Panel("Policy version", [(f"max(fleet_robot_policy_version{{{r}}})", "version"),
                                     (f"max(fleet_robot_policy_version_lag{{{r}}})", "lag")], kind="stat",
                  width=6, height=4),
            Panel("Seconds since last ack", [(f"time() - max(fleet_edge_last_ack_timestamp_seconds{{{r}}})", "age")],
                  kind="stat", unit="s", width=6, height=4),
            Panel("Spool backlog", [(f"max(fleet_edge_spool_bytes{{{r}}})", "bytes")], kind="stat", unit="bytes",
                  width=6, height=4),
        ]),
        ("Control loop", [
            Panel("Control rate", [(f"sum(rate(fleet_edge_steps_total{{{r}}}[{RATE}]))", "actual"),
                                   (f"max(fleet_edge_control_target_hertz{{{r}}})", "target")], unit="hertz"),
            Panel("Tick jitter", [
                (f"histogram_quantile(0.5, sum by (le) (rate(fleet_edge_tick_jitter_seconds_bucket{{{r}}}[{RATE}])))",
                 "p50"),
                (f"histogram_quantile(0.99, sum by (le) (rate(fleet_edge_tick_jitter_seconds_bucket{{{r}}}[{RATE}])))",
                 "p99")], unit="s"),
            Panel("Inference latency", [
                (f"histogram_quantile(0.5, sum by (le) (rate(fleet_edge_inference_seconds_bucket{{{r}}}[{RATE}])))",
                 "p50"),
                (f"histogram_quantile(0.99, sum by (le) (rate(fleet_edge_inference_seconds_bucket{{{r}}}[{RATE}])))",
                 "p99")], unit="s"),
            Panel("Overruns and bad actions", [
                (f"sum(rate(fleet_edge_tick_overruns_total{{{r}}}[{RATE}]))", "overruns/s"),
                (f"sum(rate(fleet_edge_bad_actions_total{{{r}}}[{RATE}]))", "bad actions/s")]),
        ]),
        ("Data and policy", [
            Panel("Spool backlog", [(f"max(fleet_edge_spool_steps{{{r}}})", "steps (edge)"),
                                    (f"max(fleet_robot_spool_steps{{{r}}})", "steps (heartbeat)")]),
            Panel("Dropped steps", [(f"sum(increase(fleet_edge_spool_dropped_steps_total{{{r}}}[{RATE}]))",
                                     "dropped")]),
            Panel("Steps stored per second (Redis)",
                  [(f"sum(rate(fleet_robot_steps_stored_total{{{r}}}[{RATE}]))", "stored"),
                   (f"sum(rate(fleet_gateway_steps_ingested_total{{{r}}}[{RATE}]))", "ingested by gateways")]),
            Panel("Experience stream up", [(f"max(fleet_edge_connected{{{r}}})", "connected")]),
            Panel("Policy version in use", [(f"max(fleet_edge_policy_version{{{r}}})", "robot"),
                                            ("max(fleet_policy_latest_version)", "latest published")]),
            Panel("Policy bytes received",
                  [(f"sum by (kind) (increase(fleet_edge_policy_bytes_received_total{{{r}}}[1h]))", "{{kind}}")],
                  unit="bytes"),
        ]),
        ("Operator and episodes", [
            Panel("Intervention ratio by task",
                  [(f"sum by (task) (rate(fleet_edge_intervention_steps_total{{{r}}}[{RATE}])) / "
                    f"sum by (task) (rate(fleet_edge_steps_total{{{r}}}[{RATE}]))", "{{task}}")], unit="percentunit"),
            Panel("Take-overs per minute",
                  [(f"60 * sum by (task) (rate(fleet_edge_interventions_total{{{r}}}[{RATE}]))", "{{task}}")]),
            Panel("Episodes by outcome (last 15 min)",
                  [(f"sum by (outcome) (increase(fleet_edge_episodes_total{{{r}}}[15m]))", "{{outcome}}")]),
        ]),
    ], variables=[variable])


def learner() -> dict:
    return dashboard("fleet-learner", "Fleet learner",
                     "The cloud side: trainer, buffer, Redis and gateways.", [
        ("Trainer", [
            Panel("Optimizer steps per second",
                  [(f"sum(rate(fleet_trainer_optimizer_steps_total[{RATE}]))", "steps/s")]),
            Panel("Samples per second by task and source",
                  [(f"sum by (task, source) (rate(fleet_trainer_samples_total[{RATE}]))", "{{task}} {{source}}")]),
            Panel("Online share of samples by task",
                  [(f'sum by (task) (rate(fleet_trainer_samples_total{{source="online"}}[{RATE}])) / '
                    f"sum by (task) (rate(fleet_trainer_samples_total[{RATE}]))", "{{task}} drawn"),
                   ("fleet_trainer_online_share", "{{task}} target")], unit="percentunit",
                  description="Realised online share of the samples, and the sampler's target (SOP's adaptive "
                  "share when enabled)."),
            Panel("Loss by term", [("fleet_trainer_loss", "{{term}}")]),
            Panel("Loss by task and source", [("fleet_trainer_task_loss", "{{task}} {{source}} {{term}}")]),
            Panel("Update-to-data ratio",
                  [(f"sum(rate(fleet_trainer_optimizer_steps_total[{RATE}])) / "
                    f"sum(rate(fleet_gateway_steps_ingested_total[{RATE}]))", "optimizer steps per ingested step"),
                   (f"sum(rate(fleet_trainer_samples_total[{RATE}])) / "
                    f"sum(rate(fleet_gateway_steps_ingested_total[{RATE}]))", "samples per ingested step")]),
            Panel("Optimizer step duration", [
                (f"histogram_quantile(0.5, sum by (le) (rate(fleet_trainer_update_duration_seconds_bucket[{RATE}])))",
                 "p50"),
                (f"histogram_quantile(0.99, sum by (le) (rate(fleet_trainer_update_duration_seconds_bucket[{RATE}])))",
                 "p99")], unit="s"),
        ]),
        ("Versions and checkpoints", [
            Panel("Published versions", [("max(fleet_policy_latest_version)", "latest"),
                                         (f"60 * sum(rate(fleet_trainer_published_versions_total[{RATE}]))",
                                          "per minute")]),
            Panel("Publish duration", [
                (f"histogram_quantile(0.99, sum by (le) (rate(fleet_trainer_publish_duration_seconds_bucket[{RATE}])))",
                 "p99"),
                ("sum(fleet_trainer_publish_duration_seconds_sum) / sum(fleet_trainer_publish_duration_seconds_count)",
                 "mean")], unit="s"),
            Panel("Checkpoint age and duration", [
                ("time() - max(fleet_trainer_last_checkpoint_timestamp_seconds > 0)", "age"),
                ("sum(fleet_trainer_checkpoint_duration_seconds_sum) / "
                 "sum(fleet_trainer_checkpoint_duration_seconds_count)", "mean duration")], unit="s"),
        ]),
        ("Buffer and Redis", [
            Panel("Buffer steps by task and source", [("fleet_buffer_steps", "{{task}} {{source}}")]),
            Panel("Buffer bytes by task and source", [("fleet_buffer_bytes", "{{task}} {{source}}")], unit="bytes"),
            Panel("Steps the sampler can draw", [("fleet_trainer_trainable_steps", "{{task}} {{source}}")],
                  description="Labels (operator-driven steps, demonstrations); whole episodes for episode-based "
                  "algorithms."),
            Panel("Redis memory", [("fleet_redis_used_memory_bytes", "used {{node}}"),
                                   ("fleet_redis_maxmemory_bytes > 0", "maxmemory {{node}}")], unit="bytes"),
            Panel("Redis reachable from the trainer", [("min(fleet_redis_up)", "up")], kind="stat", width=4),
            Panel("Fleet read from Redis", [("max(fleet_exporter_collect_duration_seconds)", "duration")],
                  kind="stat", unit="s", width=4),
            Panel("Buffer bytes by retention tier", [("max by (kind, mode) (fleet_retention_buffer_bytes)",
                                                      "{{kind}} {{mode}}")], unit="bytes",
                  description="After the last retention pass (docs/storage.md); only while a gateway has budgets."),
            Panel("Evictions", [(f"sum by (reason, kind) (rate(fleet_retention_evictions_total[{RATE}]))",
                                 "{{reason}} {{kind}}")], unit="ops",
                  description="Episodes evicted per second by budget and tier; intervention/offline ones raise "
                  "FleetRetentionEvictingProtectedData."),
            Panel("Blob store calls", [(f"sum by (mode, kind, outcome) (rate(fleet_blob_store_operations_total[{RATE}]))",
                                        "{{mode}} {{kind}} {{outcome}}")], unit="ops"),
        ]),
        ("Gateways", [
            Panel("Connected robots and open streams", [("sum(fleet_gateway_connected_robots)", "robots"),
                                                        ("sum(fleet_gateway_experience_streams)", "experience"),
                                                        ("sum(fleet_gateway_policy_streams)", "policy")]),
            Panel("Ingest", [(f"sum(rate(fleet_gateway_bytes_ingested_total[{RATE}]))", "bytes/s")], unit="Bps"),
            Panel("Ingest latency (validate + Redis write)", [
                (f"histogram_quantile(0.99, sum by (le) (rate(fleet_gateway_ingest_duration_seconds_bucket[{RATE}])))",
                 "p99")], unit="s"),
            Panel("In-flight bytes", [("sum(fleet_gateway_inflight_bytes)", "in flight")], unit="bytes"),
            Panel("Policy bytes sent by kind",
                  [(f"sum by (kind) (rate(fleet_gateway_policy_bytes_sent_total[{RATE}]))", "{{kind}}")], unit="Bps"),
            Panel("Stream errors",
                  [(f"sum by (rpc, reason) (rate(fleet_gateway_stream_errors_total[{RATE}]))", "{{rpc}} {{reason}}")]),
            Panel("Backpressure",
                  [(f"sum by (reason, outcome) (rate(fleet_gateway_backpressure_total[{RATE}]))",
                    "{{reason}} {{outcome}}")]),
            Panel("Duplicate steps (resends)",
                  [(f"sum(rate(fleet_gateway_duplicate_steps_total[{RATE}]))", "duplicates/s")]),
            Panel("Rejected requests by code",
                  [(f"sum by (code) (rate(fleet_gateway_rejected_total[{RATE}]))", "{{code}}")], unit="reqps"),
        ]),
    ])


DASHBOARDS = {"fleet-overview.json": fleet_overview, "fleet-robot.json": robot_drilldown, "fleet-learner.json": learner}


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {name: json.dumps(build(), indent=2, sort_keys=True) + "\n" for name, build in DASHBOARDS.items()}


def main(out_dir: Path = OUT_DIR) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (out_dir / name).write_text(text)
        print(f"wrote {out_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR))
