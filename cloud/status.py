"""Fleet status from Redis: one row per robot (what ``fleet status`` prints)."""

from __future__ import annotations

import json
import time

from cloud.buffer import POLICY_LATEST_KEY, ROBOTS_KEY, SOURCE_ONLINE, RobotKeys

CONNECTED_WITHIN_S = 10.0


def _dec(d: dict) -> dict:
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in d.items()}


def fleet_status(redis) -> dict:
    """{"latest_policy_version", "trainer", "robots": [...]} from Redis alone."""
    latest = int(redis.get(POLICY_LATEST_KEY) or 0)
    robots = []
    now = time.time()
    registrations = {(k.decode() if isinstance(k, bytes) else k): json.loads(v)
                     for k, v in redis.hgetall(ROBOTS_KEY).items()}
    pipe = redis.pipeline(transaction=False)
    ids = sorted(registrations)
    for rid in ids:
        pipe.hgetall(RobotKeys(rid).status)
        pipe.hgetall(RobotKeys(rid).stats)
        pipe.get(RobotKeys(rid).seq)
    replies = pipe.execute()
    for i, rid in enumerate(ids):
        reg = registrations[rid]
        status, stats, seq = _dec(replies[3 * i]), _dec(replies[3 * i + 1]), replies[3 * i + 2]
        last_seen = float(status.get("last_seen_s", 0) or 0)
        version = int(float(status.get("policy_version", 0) or 0))
        steps = int(stats.get("steps", 0))
        robots.append({
            "robot_id": rid,
            "source": reg.get("source", SOURCE_ONLINE),
            "embodiment": reg.get("embodiment", ""),
            "task": status.get("task", ""),
            "connected": bool(last_seen) and now - last_seen < CONNECTED_WITHIN_S,
            "last_seen_s": last_seen,
            "policy_version": version,
            "version_lag": max(latest - version, 0) if last_seen else None,
            "steps_per_s": float(status.get("steps_per_s", 0) or 0),
            "intervention_rate": float(status.get("intervention_rate", 0) or 0),
            "spool_steps": int(float(status.get("spool_steps", 0) or 0)),
            "spool_bytes": int(float(status.get("spool_bytes", 0) or 0)),
            "steps_stored": steps,
            "intervention_steps_stored": int(stats.get("intervention_steps", 0)),
            "episodes": int(stats.get("episodes", 0)),
            "successes": int(stats.get("successes", 0)),
            "last_acked_seq": int(seq or 0),
        })
    trainer = _dec(redis.hgetall("fleet:trainer:status"))
    return {"latest_policy_version": latest, "trainer": trainer, "robots": robots}


def format_table(status: dict) -> str:
    cols = [("robot", "robot_id", "{}"), ("embodiment", "embodiment", "{}"), ("task", "task", "{}"),
            ("conn", "connected", "{}"), ("ver", "policy_version", "{}"), ("lag", "version_lag", "{}"),
            ("steps/s", "steps_per_s", "{:.1f}"), ("interv", "intervention_rate", "{:.2f}"),
            ("spool", "spool_steps", "{}"), ("stored", "steps_stored", "{}"), ("eps", "episodes", "{}")]
    rows = [[h for h, _, _ in cols]]
    for r in status["robots"]:
        if r["source"] != SOURCE_ONLINE:
            continue
        rows.append([("-" if r[k] is None else f.format(r[k])) for _, k, f in cols])
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    t = status.get("trainer") or {}
    head = f"latest policy v{status['latest_policy_version']}"
    if t:
        head += f" | trainer step {t.get('step', '?')} loss {float(t.get('loss', 'nan')):.4f}"
    return "\n".join([head, *lines])
