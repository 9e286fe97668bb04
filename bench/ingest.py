"""Ingest throughput with durable acks, beside the limit measured in the same run.

    path     16 simulated edge streams (one process: a real Spool + Streamer per robot, spools
             filled beforehand: Spool.record, which folds each 500-step episode into one chunk row;
             its cost per step is printed, it is not in the timed window) -> one `fleet gateway` process (grpc.aio, validation incl. JPEG
             decode, atomic Lua write) -> a private redis-server (AOF, appendfsync everysec by
             default); a step counts once its ack came back (acks follow Redis' reply). Before the
             clock, as in a fleet that has been streaming for a while (and as the limit's client
             connects before its clock): 16 other robots stream one episode each through the same
             gateway (its Redis connection pool, lazy imports, Lua script warm) and each timed
             robot's channel is connected; its Register and stream setup run inside the clock
    limit    the same bytes the buffer stores (one columnar element per chunk, cut as the streamer cuts
             them: at episode ends and at its chunk size; frames inline, as the gateway runs here without
             a blob store)
             written by raw redis-py from one process: one RPUSH per chunk, 16 chunks per pipeline
    floor    the same stored bytes through a bare gRPC relay, what any gateway between the robots and Redis
             costs at least: one process with a sync gRPC channel and stream per robot (the streamer's window
             and message size) -> a grpc.aio server that only RPUSHes each message's elements in one pipeline
             and acks after Redis' reply -> the same Redis (no spool, protobuf, validation, Lua, compression)
    record   per-step cost of Spool.record on the edge (encode + SQLite WAL insert) while a streamer
             sends and acks concurrently: p50/p99/max

Two step kinds: low-dim (MetaWorld-like: 39 float32 state, 4 float32 actions) and the same plus one
128x128 JPEG camera frame.

    python bench/ingest.py --quick --json bench/results/ingest.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_json  # noqa: E402

from edge.client import FleetClient  # noqa: E402
from edge.spool import Spool  # noqa: E402
from edge.streamer import Backoff, Streamer, StreamerConfig  # noqa: E402
from fleet import PROTOCOL_VERSION  # noqa: E402
from fleet.codec import encode_image  # noqa: E402
from fleet.columns import encode_element, from_steps  # noqa: E402
from fleet.redis_server import free_port, start_redis  # noqa: E402
from fleet.types import EncodedImage, EpisodeSummary, FeatureSpec, RobotInfo, Schema, Step  # noqa: E402

TASK = "reach the goal"
EPISODE_STEPS = 500
CHUNK_STEPS = StreamerConfig.max_chunk_steps
LOWDIM = Schema((FeatureSpec("state", "float32", (39,)),), FeatureSpec("action", "float32", (4,)))
JPEG = Schema((FeatureSpec("state", "float32", (39,)), FeatureSpec("cam", "uint8", (128, 128, 3), is_image=True)),
              FeatureSpec("action", "float32", (4,)))
SCHEMAS = {"lowdim": LOWDIM, "jpeg": JPEG}


def frame(t: int, rng: np.random.Generator) -> EncodedImage:
    """A synthetic 128x128 camera frame (gradient, a moving square, sensor noise) as JPEG q90."""
    y, x = np.mgrid[0:128, 0:128]
    img = np.stack([x * 2, y * 2, np.full_like(x, 90)], axis=-1).astype(np.float64)
    cy, cx = 64 + int(30 * np.sin(t / 20)), 64 + int(30 * np.cos(t / 25))
    img[cy - 12:cy + 12, cx - 12:cx + 12] = (220, 60, 40)
    img += rng.normal(0, 4, img.shape)
    return encode_image(np.clip(img, 0, 255).astype(np.uint8), "jpeg", quality=90)


def make_step(kind: str, t: int, rng: np.random.Generator, frames: list[EncodedImage]) -> Step:
    return Step(seq=0, index=t % EPISODE_STEPS, observation={"state": rng.standard_normal(39).astype(np.float32)},
                policy_action=rng.uniform(-1, 1, 4).astype(np.float32),
                action=rng.uniform(-1, 1, 4).astype(np.float32), is_intervention=t % 5 == 0, reward=0.0,
                success=False, done=t % EPISODE_STEPS == EPISODE_STEPS - 1, policy_version=1, timestamp_s=time.time(),
                images={"cam": frames[t % len(frames)]} if kind == "jpeg" else {})


def fill(spool: Spool, kind: str, n: int, seed: int, frames: list[EncodedImage]) -> None:
    rng = np.random.default_rng(seed)
    for t in range(n):
        step = make_step(kind, t, rng, frames)
        end = EpisodeSummary(False, EPISODE_STEPS, 0, 0, False, 1) if step.done else None
        spool.record(f"ep{seed}-{t // EPISODE_STEPS}", TASK, False, step, end)


# --- the edge side (a child process) ---------------------------------------------------------


def warm_up(args, frames: list[EncodedImage], state: Path) -> None:
    """Before the clock: as many other robots stream one episode each, to the end, so the timed run meets a
    gateway that has been running (its Redis connection pool grown, lazy imports and the Lua script loaded)
    and an edge process whose gRPC machinery is up, as in a fleet that streams for days. The baseline's
    client likewise connects (PING) before its clock starts."""
    warm = []
    for i in range(args.robots):
        rid = f"warm-up-{args.kind}-{i}"
        spool = Spool(state / f"{rid}.db", SCHEMAS[args.kind])
        fill(spool, args.kind, EPISODE_STEPS, 1000 + i, frames)
        client = FleetClient(args.target, rpc_timeout_s=30.0)
        streamer = Streamer(RobotInfo(rid, "bench-arm", SCHEMAS[args.kind], (TASK,), PROTOCOL_VERSION), spool, client,
                            max_chunk_steps=CHUNK_STEPS, backoff=Backoff(0.05, 1.0))
        warm.append((spool, client, streamer))
    for _, _, streamer in warm:
        streamer.start()
    for _, _, streamer in warm:
        assert streamer.wait_acked(EPISODE_STEPS, timeout_s=120), f"warm-up not acked: {streamer.acked_seq}"
    for spool, client, streamer in warm:
        streamer.stop()
        client.close()
        spool.close()


def edge_worker(args) -> None:
    """Fill one spool per robot, say READY, wait for GO, stream them all, print the result as JSON."""
    kind, state = args.kind, Path(args.state_dir)
    frames = [frame(t, np.random.default_rng(t)) for t in range(32)] if kind == "jpeg" else []
    robots = []
    fill_cpu_s = 0.0
    for i in range(args.robots):
        rid = f"{kind}-{i}"
        spool = Spool(state / f"{rid}.db", SCHEMAS[kind])
        c0 = time.process_time()
        fill(spool, kind, args.steps, i, frames)
        fill_cpu_s += time.process_time() - c0
        client = FleetClient(args.target, rpc_timeout_s=30.0)
        info = RobotInfo(rid, "bench-arm", SCHEMAS[kind], (TASK,), PROTOCOL_VERSION)
        robots.append((spool, client, Streamer(info, spool, client, max_chunk_steps=CHUNK_STEPS,
                                               backoff=Backoff(0.05, 1.0))))
    total_bytes = sum(r[0].backlog()[1] for r in robots)
    warm_up(args, frames, state / "warm-up")
    for _, client, streamer in robots:  # each robot's channel connected (TCP + HTTP/2) before the clock
        client.register(streamer.info)
    print("READY", flush=True)
    sys.stdin.readline()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _, _, streamer in robots:
        streamer.start()
    for _, _, streamer in robots:
        assert streamer.wait_acked(args.steps, timeout_s=600), f"not all acked: {streamer.acked_seq}"
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    for spool, client, streamer in robots:
        streamer.stop()
        client.close()
        spool.close()
    print(json.dumps({"steps": args.robots * args.steps, "bytes": total_bytes, "elapsed_s": elapsed,
                      "edge_cpu_s": cpu, "fill_cpu_s": fill_cpu_s}), flush=True)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def run_path(kind: str, target: str, robots: int, steps: int, state_dir: Path, pids: dict[str, int]) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--edge-worker", "--kind", kind, "--target", target,
                             "--robots", str(robots), "--steps", str(steps), "--state_dir", str(state_dir)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return timed(proc, pids, "edge worker failed while filling its spools")


def timed(proc: subprocess.Popen, pids: dict[str, int], failed: str) -> dict:
    """Wait for a worker's READY, say GO, and return its JSON result with the CPU seconds each of ``pids``
    spent meanwhile (``<name>_cpu_s``)."""
    assert proc.stdout.readline().strip() == "READY", failed
    before = {name: cpu_s(pid) for name, pid in pids.items()}
    proc.stdin.write("GO\n")
    proc.stdin.flush()
    result = json.loads(proc.stdout.readline())
    result.update({f"{name}_cpu_s": cpu_s(pid) - before[name] for name, pid in pids.items()})
    proc.wait(60)
    return result


# --- the limit: raw redis-py from one process ---------------------------------------------


def elements_for(kind: str, n: int) -> list[tuple[int, bytes]]:
    """(steps, element) per chunk: the bytes the buffer keeps for ``n`` steps (fleet.columns format)."""
    rng = np.random.default_rng(123)
    frames = [frame(t, np.random.default_rng(t)) for t in range(32)] if kind == "jpeg" else []
    schema = SCHEMAS[kind]
    steps = []
    for t in range(n):
        step = make_step(kind, t, rng, frames)
        step.seq = t + 1
        steps.append(step)
    parts = [steps[e + i:min(e + i + CHUNK_STEPS, e + EPISODE_STEPS, n)]
             for e in range(0, n, EPISODE_STEPS) for i in range(0, EPISODE_STEPS, CHUNK_STEPS) if e + i < n]
    return [(len(part), encode_element(from_steps(part, schema), schema)) for part in parts]


def raw_limit(redis_url: str, elements: list[tuple[int, bytes]], robots: int, redis_pid: int) -> dict:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.ping()
    t0, cpu0, redis0 = time.perf_counter(), time.process_time(), cpu_s(redis_pid)
    sent = 0
    for r in range(robots):
        key = f"bench:raw:{r}"
        pipe = client.pipeline(transaction=False)
        queued = 0
        for n, element in elements:
            pipe.rpush(key, element)
            queued += 1
            if queued >= robots:
                pipe.execute()
                queued = 0
            sent += n
        if queued:
            pipe.execute()
    elapsed, cpu, redis_cpu = time.perf_counter() - t0, time.process_time() - cpu0, cpu_s(redis_pid) - redis0
    client.delete(*[f"bench:raw:{r}" for r in range(robots)])
    client.close()
    nbytes = sum(len(e) for _, e in elements) * robots
    return {"steps": sent, "bytes": nbytes, "elapsed_s": elapsed, "client_cpu_s": cpu, "redis_cpu_s": redis_cpu}


# --- the floor: a bare gRPC relay of the same bytes ------------------------------------------


RELAY_METHOD = "/bench.Relay/Push"
RELAY_WINDOW_MESSAGES = max(1, StreamerConfig.window_chunks // StreamerConfig.chunks_per_message)


def relay_messages(elements: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """(steps, message) per gRPC message: the elements in groups of the streamer's chunks per message, each
    prefixed by its length (4 bytes), so a message is the size of the path's."""
    per = StreamerConfig.chunks_per_message
    return [(sum(n for n, _ in group), b"".join(len(e).to_bytes(4, "little") + e for _, e in group))
            for group in (elements[i:i + per] for i in range(0, len(elements), per))]


def relay_server(args) -> None:
    """A gRPC relay that does only what every gateway must: every message's elements go to Redis in one RPUSH
    pipeline, and the (empty) ack goes back once Redis replied. No protobuf, validation, Lua, compression,
    interceptors or metrics: what grpc.aio + redis.asyncio alone cost. Prints its port, serves until killed."""
    import asyncio

    import grpc
    import redis.asyncio as aioredis

    async def serve() -> None:
        client = aioredis.Redis.from_url(args.target)
        await client.ping()

        async def push(requests, context):
            key = f"bench:relay:{context.peer()}"  # one channel, one connection, one stream per robot
            async for message in requests:
                view, pipe, at = memoryview(message), client.pipeline(transaction=False), 0
                while at < len(view):
                    size = int.from_bytes(view[at:at + 4], "little")
                    pipe.rpush(key, bytes(view[at + 4:at + 4 + size]))
                    at += 4 + size
                await pipe.execute()
                yield b""

        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "bench.Relay", {"Push": grpc.stream_stream_rpc_method_handler(push)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()

    asyncio.run(serve())


def relay_client(args) -> None:
    """One channel and one bidirectional stream per robot, as the edge streams (the sync gRPC client, at most
    the streamer's window of chunks unacked); READY, wait for GO, stream, print the result as JSON."""
    import threading

    import grpc

    from edge.client import CHANNEL_OPTIONS

    messages = relay_messages(elements_for(args.kind, args.steps))
    channels = [grpc.insecure_channel(args.target, options=CHANNEL_OPTIONS) for _ in range(args.robots)]

    def stream(channel: grpc.Channel, messages: list[tuple[int, bytes]]) -> None:
        window = threading.Semaphore(RELAY_WINDOW_MESSAGES)

        def requests():
            for _, message in messages:
                window.acquire()
                yield message

        acked = 0
        for acked, _ in enumerate(channel.stream_stream(RELAY_METHOD)(requests()), 1):
            window.release()
        assert acked == len(messages), f"{acked} of {len(messages)} messages acked"

    def all_robots(messages: list[tuple[int, bytes]]) -> None:
        threads = [threading.Thread(target=stream, args=(c, messages)) for c in channels]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    all_robots(messages[:1])  # warm, as the path's gateway is: channels connected, the relay's Redis pool grown
    print("READY", flush=True)
    sys.stdin.readline()
    t0, cpu0 = time.perf_counter(), time.process_time()
    all_robots(messages)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    for channel in channels:
        channel.close()
    print(json.dumps({"steps": args.robots * sum(n for n, _ in messages), "elapsed_s": elapsed,
                      "bytes": args.robots * sum(len(m) for _, m in messages), "client_cpu_s": cpu}), flush=True)


def relay_floor(kind: str, redis_url: str, robots: int, steps: int, redis_pid: int) -> dict:
    """The bare relay's throughput and CPU, edge-like client -> relay -> the same Redis."""
    import redis

    server = subprocess.Popen([sys.executable, __file__, "--relay-server", "--target", redis_url],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        target = f"127.0.0.1:{int(server.stdout.readline())}"
        client = subprocess.Popen([sys.executable, __file__, "--relay-client", "--kind", kind, "--target", target,
                                   "--robots", str(robots), "--steps", str(steps)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return timed(client, {"relay": server.pid, "redis": redis_pid}, "relay client failed to connect")
    finally:
        server.kill()
        server.wait(30)
        with redis.Redis.from_url(redis_url) as r:
            for key in r.scan_iter("bench:relay:*"):
                r.delete(key)


# --- edge record cost ----------------------------------------------------------------------


def record_cost(kind: str, target: str, n: int, state_dir: Path) -> dict:
    """Spool.record latency at ~1 kHz while a streamer sends and acks the same spool."""
    frames = [frame(t, np.random.default_rng(t)) for t in range(32)] if kind == "jpeg" else []
    spool = Spool(state_dir / f"record-{kind}.db", SCHEMAS[kind])
    client = FleetClient(target)
    streamer = Streamer(RobotInfo(f"record-{kind}", "bench-arm", SCHEMAS[kind], (TASK,), PROTOCOL_VERSION), spool,
                        client)
    streamer.start()
    rng = np.random.default_rng(0)
    times = []
    for t in range(n):
        step = make_step(kind, t, rng, frames)
        end = EpisodeSummary(False, EPISODE_STEPS, 0, 0, False, 1) if step.done else None
        t0 = time.perf_counter()
        spool.record(f"rec-{t // EPISODE_STEPS}", TASK, False, step, end)
        times.append(time.perf_counter() - t0)
        time.sleep(0.001)
    acked = streamer.wait_acked(n, timeout_s=60)
    streamer.stop()
    client.close()
    spool.close()
    ms = np.array(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()), "steps": n, "all_acked": bool(acked)}


# --- the run -----------------------------------------------------------------------------


def start_gateway(redis_url: str, policy_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    import grpc

    port = free_port()
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "gateway", "--listen", f"127.0.0.1:{port}",
                             "--redis_url", redis_url, "--policy_dir", str(policy_dir)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=str(Path(__file__).resolve().parents[1]))
    log.close()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=180)
    channel.close()
    return proc, f"127.0.0.1:{port}"


def rates(result: dict) -> tuple[float, float]:
    return result["steps"] / result["elapsed_s"], result["bytes"] / result["elapsed_s"] / 1e6


def _path_cpu(r: dict) -> float:
    return r["edge_cpu_us_per_step"] + r["gateway_cpu_us_per_step"] + r["redis_cpu_us_per_step"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps (about a minute)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--robots", type=int, default=16, help="concurrent edge streams")
    parser.add_argument("--appendfsync", default="everysec", choices=["everysec", "always"],
                        help="Redis AOF fsync policy")
    parser.add_argument("--edge-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--relay-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--relay-client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--state_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.edge_worker or args.relay_server or args.relay_client:
        (edge_worker if args.edge_worker else relay_server if args.relay_server else relay_client)(args)
        return 0

    steps = {"lowdim": 5000 if args.quick else 20000, "jpeg": 400 if args.quick else 1500}
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    redis_proc = start_redis(tmp / "redis", appendfsync=args.appendfsync)
    gateway, target = start_gateway(redis_proc.url, tmp / "policies", tmp / "gateway.log")
    results: dict = {"robots": args.robots, "appendfsync": args.appendfsync, "cpus": os.cpu_count(),
                     "machine": platform.processor() or platform.machine(), "kinds": {}}
    try:
        for kind, n in steps.items():
            path = run_path(kind, target, args.robots, n, tmp / f"edge-{kind}",
                            {"gateway": gateway.pid, "redis": redis_proc.proc.pid})
            limit = raw_limit(redis_proc.url, elements_for(kind, n), args.robots, redis_proc.proc.pid)
            floor = relay_floor(kind, redis_proc.url, args.robots, n, redis_proc.proc.pid)
            record = record_cost(kind, target, 3000 if kind == "lowdim" else 600, tmp / "record")
            (p_steps, p_mb), (l_steps, l_mb), (f_steps, _) = rates(path), rates(limit), rates(floor)
            results["kinds"][kind] = {
                "steps_per_s": p_steps, "mb_per_s": p_mb, "limit_steps_per_s": l_steps, "limit_mb_per_s": l_mb,
                "ratio": p_steps / l_steps, "bytes_per_step": path["bytes"] / path["steps"],
                "floor_steps_per_s": f_steps, "floor_ratio": f_steps / l_steps, "path_vs_floor": p_steps / f_steps,
                **{f"floor_{k}_cpu_us_per_step": floor[f"{k}_cpu_s"] / floor["steps"] * 1e6
                   for k in ("client", "relay", "redis")},
                "stored_bytes_per_step": limit["bytes"] / limit["steps"],
                "steps": path["steps"], "elapsed_s": path["elapsed_s"],
                **{f"{k}_cpu_us_per_step": path[f"{k}_cpu_s"] / path["steps"] * 1e6
                   for k in ("edge", "gateway", "redis")},
                "limit_cpu_s": limit["client_cpu_s"],
                "fill_cpu_us_per_step": path["fill_cpu_s"] / path["steps"] * 1e6,
                "limit_cpu_us_per_step": (limit["client_cpu_s"] + limit["redis_cpu_s"]) / limit["steps"] * 1e6,
                "edge_record_p50_ms": record["p50_ms"],
                "edge_record_p99_ms": record["p99_ms"], "edge_record_max_ms": record["max_ms"]}
    finally:
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(30)
        except subprocess.TimeoutExpired:
            gateway.kill()
        redis_proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    low = results["kinds"]["lowdim"]
    results.update({k: low[k] for k in ("steps_per_s", "limit_steps_per_s", "ratio", "floor_ratio", "mb_per_s",
                                        "edge_record_p50_ms", "edge_record_p99_ms")})
    print(f"\ningest with durable acks: {args.robots} edge streams -> gateway -> redis (appendfsync "
          f"{args.appendfsync}), {os.cpu_count()} CPUs")
    print(f"{'kind':8} {'spool B/step':>12} {'Redis B/step':>12} {'steps/s':>9} {'limit steps/s':>14} "
          f"{'ratio':>6} {'target':>7} {'record p50':>10} {'p99 ms':>7}")
    for kind, r in results["kinds"].items():
        print(f"{kind:8} {r['bytes_per_step']:12.0f} {r['stored_bytes_per_step']:12.0f} {r['steps_per_s']:9.0f} "
              f"{r['limit_steps_per_s']:14.0f} {r['ratio']:6.2f} {'>= 0.5' if kind == 'lowdim' else '':>7} "
              f"{r['edge_record_p50_ms']:10.3f} {r['edge_record_p99_ms']:7.3f}")
    print("floor: the same bytes through a bare gRPC relay (sync gRPC client, one stream per robot, the "
          "streamer's window and message size -> grpc.aio server -> RPUSH pipeline, ack after Redis' reply; no "
          "spool, protobuf, validation, Lua, compression or metrics): "
          + "; ".join(f"{kind}: {r['floor_steps_per_s']:.0f} steps/s = {r['floor_ratio']:.2f}x the limit (the path "
                      f"{r['path_vs_floor']:.2f}x the floor), CPU per step client {r['floor_client_cpu_us_per_step']:.1f}"
                      f", relay {r['floor_relay_cpu_us_per_step']:.1f}, redis {r['floor_redis_cpu_us_per_step']:.1f} us"
                      for kind, r in results["kinds"].items()))
    print(f"\nCPU per step, us (all on the same {os.cpu_count()} cores): "
          + "; ".join(f"{kind}: edge {r['edge_cpu_us_per_step']:.1f}, gateway {r['gateway_cpu_us_per_step']:.1f}, "
                      f"redis {r['redis_cpu_us_per_step']:.1f}" for kind, r in results["kinds"].items()))
    print("CPU per step, path (edge + gateway + redis) vs limit (redis-py client + redis), us: "
          + "; ".join(f"{kind}: {_path_cpu(r):.1f} vs {r['limit_cpu_us_per_step']:.2f} (CPU-bound ratio "
                      f"{r['limit_cpu_us_per_step'] / _path_cpu(r):.2f})" for kind, r in results["kinds"].items()))
    print("edge spool fill before the clock (make_step + Spool.record incl. folding chunk rows), CPU us per step: "
          + "; ".join(f"{kind}: {r['fill_cpu_us_per_step']:.1f}" for kind, r in results["kinds"].items()))
    print("targets (issue 14): ratio >= 0.5 for low-dim (filed at 0.13-0.17x; before the ingest-fast changes "
          "0.08-0.16x, 15.9 us of CPU per step on the path)")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
