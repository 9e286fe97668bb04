"""Weight sync benchmark: how fast a new policy version reaches edges, and how many bytes a delta takes.

Measured in one run, on the same bytes:

* ``raw_copy``: a plain TCP loopback copy of the state dict's bytes between two processes (the limit);
* ``full_push``: publish into the policy store (Redis pointer) -> gateway process (encodes once) -> one edge
  process (assembles, verifies every sha256): publish -> swap-ready;
* ``lerobot``: LeRobot's transport on the same tensors: ``torch.save`` + 2 MB chunks over its gRPC
  ``LearnerService.StreamParameters`` -> ``torch.load`` on the receiving process;
* ``fanout8``: the full push to 8 edge processes at once; the gateway's CPU seconds per GB sent;
* ``delta``: a real LeRobot policy (ACT) trained K HG-DAgger-style steps (behaviour cloning on operator
  labels) at fine-tuning learning rates, published as bf16: delta bytes / full bytes, and the same for
  SmolVLA (tiny local backbone, VLM frozen).

    python bench/weight_sync.py --quick --json weight_sync.json   # ~50M params, a few minutes on 2 cores
    python bench/weight_sync.py --json weight_sync.json           # 450M params bf16 (~0.9 GB)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger("weight_sync")
GB = 1e9


def make_state_dict(params: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Transformer-like bf16 tensors (4096 x 1024 matrices, then the remainder) totalling ``params``."""
    gen = torch.Generator().manual_seed(seed)
    out, left, i = {}, params, 0
    while left > 0:
        n = min(left, 4096 * 1024)
        shape = (n // 1024, 1024) if n % 1024 == 0 else (n,)
        out[f"layers.{i:03d}.weight"] = (torch.randn(shape, generator=gen) * 0.02).bfloat16()
        left, i = left - n, i + 1
    return out


def _cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (default: this one)."""
    fields = Path(f"/proc/{pid or os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- raw TCP copy ------------------------------------------------------------------

def _raw_sender(port: int, nbytes: int) -> None:
    data = bytes(nbytes)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.recv(1)  # go
        s.sendall(data)


def raw_copy(nbytes: int) -> float:
    """Seconds to move ``nbytes`` from another process over loopback TCP into a preallocated buffer."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        proc = mp.get_context("spawn").Process(target=_raw_sender, args=(server.getsockname()[1], nbytes))
        proc.start()
        conn, _ = server.accept()
        buf = bytearray(nbytes)
        view = memoryview(buf)
        with conn:
            t0 = time.perf_counter()
            conn.sendall(b"g")
            got = 0
            while got < nbytes:
                got += conn.recv_into(view[got:], min(nbytes - got, 1 << 22))
            seconds = time.perf_counter() - t0
        proc.join()
    return seconds


# --- our path: gateway process, edge processes ------------------------------------------

def _gateway_main(cfg, conn) -> None:
    async def serve() -> None:
        from cloud.gateway.server import start_gateway

        gw = await start_gateway(cfg)
        conn.send(gw.port)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
        await gw.stop(0.5)

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve())


def _edge_main(target: str, robot_id: str, after: int, versions: int, results) -> None:
    """Watch for full versions newer than ``after``; report when each of ``versions`` was verified (swap-ready)."""
    from edge.client import FleetClient, PolicyHeaderEvent, PolicyPieceEvent, PolicyTrailerEvent
    from edge.updater import Assembler

    client = FleetClient(target)
    held, done = None, 0
    for msg in client.watch_policy(robot_id, after, want_full=True):
        event = FleetClient.policy_event(msg)
        if isinstance(event, PolicyHeaderEvent):
            assembler = Assembler(event, held)
        elif isinstance(event, PolicyPieceEvent):
            assembler.add(event)
        elif isinstance(event, PolicyTrailerEvent):
            held, _ = assembler.finish(event)
            results.put({"robot": robot_id, "version": held.manifest.version, "ready_s": time.time(),
                         "payload_bytes": assembler.payload_bytes, "cpu_s": _cpu_s()})
            done += 1
            if done == versions:
                break
    client.close()


class Fleet:
    """Redis + a gateway process + a policy store, for the pushes."""

    def __init__(self, workdir: Path, piece_bytes: int):
        import redis

        from cloud.policy_store import PolicyStore
        from fleet.config import GatewayConfig
        from fleet.redis_server import start_redis

        self.redis_proc = start_redis(workdir / "redis")
        self.redis = redis.Redis.from_url(self.redis_proc.url)
        self.store = PolicyStore(workdir / "policies", self.redis)
        cfg = GatewayConfig(listen="127.0.0.1:0", redis_url=self.redis_proc.url, policy_dir=str(workdir / "policies"))
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.gateway = ctx.Process(target=_gateway_main, args=(cfg, child))
        self.gateway.start()
        self.target = f"127.0.0.1:{self._conn.recv()}"
        self.results = ctx.Queue()
        self.ctx = ctx
        del piece_bytes  # the gateway uses its default (1 MiB); kept for the JSON

    def push(self, tensors: dict[str, torch.Tensor], edges: int, tag: str) -> dict:
        """Start ``edges`` watchers, publish one version, wait until every edge has verified it."""
        ids = [f"{tag}-{i}" for i in range(edges)]
        after = self.store.latest_version()
        procs = [self.ctx.Process(target=_edge_main, args=(self.target, rid, after, 1, self.results)) for rid in ids]
        for p in procs:
            p.start()
        deadline = time.monotonic() + 300
        while not all(self.redis.hexists(f"fleet:{{r:{rid}}}:status", "policy_delivered_version") for rid in ids):
            if time.monotonic() > deadline:
                raise TimeoutError("edges did not start watching within 300 s")
            time.sleep(0.05)  # polling Redis for the watch to be registered (bench only)
        cpu0 = _cpu_s(self.gateway.pid)
        t_publish = time.time()
        manifest = self.store.publish(tensors, {"bench": True}, trainable=set(tensors))
        t_published = time.time()
        reports = [self.results.get(timeout=600) for _ in ids]
        for p in procs:
            p.join()
        gateway_cpu_s = _cpu_s(self.gateway.pid) - cpu0
        ready = max(r["ready_s"] for r in reports)
        sent = sum(r["payload_bytes"] for r in reports)
        return {"version": manifest.version, "store_publish_s": t_published - t_publish,
                "push_s": ready - t_published, "publish_to_ready_s": ready - t_publish,
                "bytes_per_edge": manifest.total_bytes, "gateway_cpu_s": gateway_cpu_s,
                "gateway_cpu_s_per_gb": gateway_cpu_s / (sent / GB),
                "edge_cpu_s": [round(r["cpu_s"], 2) for r in reports]}

    def close(self) -> None:
        self._conn.send("stop")
        self.gateway.join(30)
        self.redis.close()
        self.redis_proc.kill()


# --- LeRobot's transport ---------------------------------------------------------

def _lerobot_receiver(target: str, results) -> None:
    import grpc
    from lerobot.transport import services_pb2, services_pb2_grpc
    from lerobot.transport.utils import bytes_to_state_dict, grpc_channel_options, receive_bytes_in_chunks

    channel = grpc.insecure_channel(target, grpc_channel_options())
    stub = services_pb2_grpc.LearnerServiceStub(channel)
    t0 = time.time()
    data = receive_bytes_in_chunks(stub.StreamParameters(services_pb2.Empty()), None, mp.Event())
    state = bytes_to_state_dict(data)
    results.put({"requested_s": t0, "ready_s": time.time(), "tensors": len(state), "bytes": len(data)})
    channel.close()


def lerobot_push(tensors: dict[str, torch.Tensor]) -> dict:
    """LeRobot's learner side (torch.save + send_bytes_in_chunks) in this process, its actor side in another."""
    from concurrent import futures

    import grpc
    from lerobot.transport import services_pb2, services_pb2_grpc
    from lerobot.transport.utils import grpc_channel_options, send_bytes_in_chunks, state_to_bytes

    started: list[float] = []

    class Learner(services_pb2_grpc.LearnerServiceServicer):
        def StreamParameters(self, request, context):  # noqa: N802 - gRPC method name
            started.append(time.time())
            yield from send_bytes_in_chunks(state_to_bytes(tensors), services_pb2.Parameters)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=3), options=grpc_channel_options())
    services_pb2_grpc.add_LearnerServiceServicer_to_server(Learner(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_lerobot_receiver, args=(f"127.0.0.1:{port}", results))
    proc.start()
    report = results.get(timeout=600)
    proc.join()
    server.stop(0)
    return {"push_s": report["ready_s"] - started[0], "wire_bytes": report["bytes"]}


# --- delta size of realistic updates ----------------------------------------------------

def delta_sizes(steps: int, lrs: tuple[float, ...], quick: bool, workdir: Path) -> list[dict]:
    """Train K BC steps between two published versions; delta bytes / full bytes of the bf16 version."""
    from cloud.gateway.policy_feed import encode_transfer
    from cloud.policy_store import PolicyStore
    from fleet.policies import PolicyConfig, build_policy
    from fleet.types import FeatureSpec, Schema

    rows = []
    state_dim, action_dim, batch = 39, 4, 16
    setups = [("act", PolicyConfig(chunk_size=10, n_action_steps=10, dim_model=256 if quick else 512, n_heads=8,
                                   dim_feedforward=1024 if quick else 3200, n_encoder_layers=4, n_decoder_layers=1)),
              ("smolvla-tiny", PolicyConfig(type="smolvla", chunk_size=10, n_action_steps=10, freeze_backbone=True))]
    rng = np.random.default_rng(0)
    expert = rng.normal(size=(state_dim, action_dim)) / np.sqrt(state_dim)
    for name, cfg in setups:
        images = cfg.type == "smolvla"
        schema = Schema((FeatureSpec("state", "float32", (state_dim,)),
                         *((FeatureSpec("top", "uint8", (32, 32, 3), True),) if images else ())),
                        FeatureSpec("action", "float32", (action_dim,)))
        for precision in ("bf16-weights", "fp32-master"):
            for lr in lrs:
                policy = build_policy(cfg, schema, ("reach the goal",), seed=0)
                if precision == "bf16-weights":
                    policy.model.to(torch.bfloat16)
                opt = torch.optim.AdamW(policy.trainable_parameters(), lr=lr, weight_decay=1e-4)
                store = PolicyStore(workdir / f"delta-{name}-{precision}-{lr}")

                def publish(version_of) -> int:
                    tensors = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in policy.tensors().items()}
                    return store.publish(tensors, {}, policy.trainable_names(), parent_version=version_of).version

                base = publish(0)
                for _ in range(steps):
                    states = rng.normal(size=(batch, state_dim)).astype(np.float32)
                    actions = np.tanh(states @ expert).astype(np.float32)
                    sample = {"obs/state": states, "task_index": np.zeros(batch, np.int64),
                              "action": np.repeat(actions[:, None], cfg.chunk_size, axis=1),
                              "action_is_pad": np.zeros((batch, cfg.chunk_size), bool)}
                    if images:
                        sample["obs/top"] = rng.integers(0, 255, (batch, 32, 32, 3), dtype=np.uint8)
                    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 compute, as on a GPU learner
                        loss, _ = policy.compute_loss(policy.train_batch_to_torch(sample))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                target = publish(base)
                transfer = encode_transfer(store, target, base)
                manifest = store.manifest(target)
                trainable = sum(t.nbytes for t in manifest.tensors if t.trainable)
                rows.append({"policy": name, "precision": precision, "lr": lr, "steps": steps,
                             "params": sum(t.nbytes for t in manifest.tensors) // 2,
                             "trainable_fraction": round(trainable / manifest.total_bytes, 4),
                             "delta_bytes": transfer.payload_bytes, "full_bytes": transfer.full_bytes,
                             "delta_fraction": round(transfer.payload_bytes / transfer.full_bytes, 4)})
                log.info("delta %s", rows[-1])
    return rows


# --- main ------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    params = args.params or (50_000_000 if args.quick else 450_000_000)
    tensors = make_state_dict(params)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    out: dict = {"quick": args.quick, "params": params, "bytes": nbytes, "dtype": "bfloat16",
                 "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                 "piece_bytes": 1 << 20}
    with tempfile.TemporaryDirectory(prefix="weight_sync-") as tmp:
        workdir = Path(tmp)
        raw_s = min(raw_copy(nbytes) for _ in range(2))
        out.update(raw_copy_s=raw_s, raw_copy_gbps=nbytes / raw_s / GB)
        fleet = Fleet(workdir, out["piece_bytes"])
        try:
            single = [fleet.push(tensors, 1, f"single{i}") for i in range(args.repeats)]
            best = min(single, key=lambda r: r["push_s"])
            out.update(full_push_s=best["push_s"], full_push_gbps=nbytes / best["push_s"] / GB,
                       publish_to_ready_s=best["publish_to_ready_s"], store_publish_s=best["store_publish_s"],
                       single_runs_s=[round(r["push_s"], 3) for r in single])
            if args.edges > 1:
                fan = fleet.push(tensors, args.edges, "fan")
                out.update({f"fanout{args.edges}_s": fan["push_s"], "fanout_edges": args.edges,
                            "gateway_cpu_s_per_gb": fan["gateway_cpu_s_per_gb"], "fanout_edge_cpu_s": fan["edge_cpu_s"]})
                out[f"fanout{args.edges}_over_single"] = fan["push_s"] / best["push_s"]
                out["fanout_ratio"] = out[f"fanout{args.edges}_over_single"]
        finally:
            fleet.close()
        lerobot = min((lerobot_push(tensors) for _ in range(args.repeats)), key=lambda r: r["push_s"])
        out.update(lerobot_push_s=lerobot["push_s"], lerobot_transport_s=lerobot["push_s"],
                   lerobot_gbps=nbytes / lerobot["push_s"] / GB)
        out["ratio_to_raw"] = out["ratio_vs_raw"] = out["full_push_gbps"] / out["raw_copy_gbps"]
        if not args.skip_delta:
            rows = delta_sizes(args.delta_steps, (1e-5, 1e-4), args.quick, workdir)
            out["delta_runs"] = rows
            headline = next(r for r in rows if (r["policy"], r["precision"], r["lr"]) == ("act", "fp32-master", 1e-4))
            out["delta_fraction"] = out["delta_ratio"] = headline["delta_fraction"]
            out["delta_headline"] = "ACT, all weights trainable, fp32 master weights published as bf16, lr 1e-4"
    out["targets"] = {"full_push_under_1s": out["full_push_s"] < 1.0, "ratio_to_raw_ge_0_5": out["ratio_to_raw"] >= 0.5,
                      "fanout_le_1_5x": out.get("fanout_ratio", 0) <= 1.5 if "fanout_ratio" in out else None,
                      "delta_le_5pct": out["delta_fraction"] <= 0.05 if "delta_fraction" in out else None}
    return out


def table(out: dict) -> str:
    rows = [("params (bf16)", f"{out['params'] / 1e6:.0f}M = {out['bytes'] / GB:.2f} GB"),
            ("raw TCP copy", f"{out['raw_copy_s']:.3f} s  {out['raw_copy_gbps']:.2f} GB/s"),
            ("fleet full push (1 edge)", f"{out['full_push_s']:.3f} s  {out['full_push_gbps']:.2f} GB/s  "
                                         f"({out['ratio_to_raw']:.2f}x raw)"),
            ("  store write (publish)", f"{out['store_publish_s']:.3f} s"),
            ("  publish start -> ready", f"{out['publish_to_ready_s']:.3f} s"),
            ("LeRobot transport", f"{out['lerobot_push_s']:.3f} s  {out['lerobot_gbps']:.2f} GB/s  "
                                  f"(fleet is {out['lerobot_push_s'] / out['full_push_s']:.2f}x faster)")]
    if "fanout_ratio" in out:
        n = out["fanout_edges"]
        rows.append((f"fan-out to {n} edges", f"{out[f'fanout{n}_s']:.3f} s  ({out['fanout_ratio']:.2f}x single); "
                                              f"gateway {out['gateway_cpu_s_per_gb']:.2f} CPU s/GB"))
    for r in out.get("delta_runs", []):
        rows.append((f"delta {r['policy']} {r['precision']} lr {r['lr']:g}",
                     f"{r['delta_fraction'] * 100:.2f}% of full ({r['steps']} steps, "
                     f"{r['trainable_fraction'] * 100:.0f}% trainable)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="50M parameters instead of 450M; smaller delta policy")
    p.add_argument("--params", type=int, default=0, help="override the number of bf16 parameters")
    p.add_argument("--edges", type=int, default=8, help="edges in the fan-out run (1 = skip it)")
    p.add_argument("--repeats", type=int, default=2, help="single-edge pushes (the best one counts)")
    p.add_argument("--delta-steps", type=int, default=25, help="optimizer steps between two versions")
    p.add_argument("--skip-delta", action="store_true", help="skip the delta-size runs")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = run(args)
    print(table(out))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
