"""Weight sync benchmark: how fast a new policy version reaches edges, and how many bytes a delta takes.

Measured in one run, on the same bytes:

* ``raw_copy``: a plain TCP loopback copy of the state dict's bytes between two processes (the limit);
* ``full_push``: publish into the policy store (Redis pointer) -> gateway process (plans once, hands out a
  ticket on WatchPolicy, ``sendfile``s the stored file over the weight side channel) -> one edge process
  (``recv_into`` its standby memory, every BLAKE3 piece digest checked as it arrives): published -> swap-ready;
  ``publish_to_ready`` adds the store write (hash, safetensors write, fsync, rename, announce), which
  ``publish_profile`` times step by step on the same tensors;
* ``grpc_push``: the same push with the tensors in gRPC messages (the path without a side channel);
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


# --- raw TCP copy ------------------------------------------------------------------

def _raw_sender(port: int, nbytes: int, path: str = "", cpu_s=None) -> None:
    data = b"" if path else bytes(nbytes)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.recv(1)  # go
        if not path:
            s.sendall(data)
            return
        cpu0 = time.process_time()
        with open(path, "rb") as fh:
            offset = 0
            while offset < nbytes:
                offset += os.sendfile(s.fileno(), fh.fileno(), offset, nbytes - offset)
        cpu_s.put(time.process_time() - cpu0)


def raw_copy(nbytes: int, path: str = "", cpu_s=None) -> float:
    """Seconds to move ``nbytes`` from another process over loopback TCP into a preallocated buffer (``path``:
    the sender ``os.sendfile``s them from that file and puts its CPU seconds in the queue ``cpu_s``)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        proc = mp.get_context("spawn").Process(target=_raw_sender,
                                               args=(server.getsockname()[1], nbytes, path, cpu_s))
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


def sendfile_floor(path: str, nbytes: int) -> dict:
    """The kernel's share of a side-channel push: a bare ``os.sendfile`` of the stored file (in the page cache)
    to a process that receives into a preallocated buffer; the sender's CPU seconds per GB. On loopback the
    sender's CPU also carries the TCP receive processing of the other end (softirq in its context), so this,
    not zero, is the floor for the gateway's CPU per GB on one machine."""
    queue = mp.get_context("spawn").Queue()
    seconds = raw_copy(nbytes, path, queue)
    return {"seconds": seconds, "sender_cpu_s_per_gb": queue.get(timeout=60) / (nbytes / GB)}


# --- our path: gateway process, edge processes ------------------------------------------

def _gateway_main(cfg, conn) -> None:
    async def serve() -> None:
        from cloud.gateway.server import start_gateway

        gw = await start_gateway(cfg)
        conn.send(gw.port)
        # Asked for its CPU seconds (exact, unlike /proc's 10 ms ticks: ~0.02 s/GB on a 0.9 GB push) until told
        # to stop.
        while await asyncio.get_running_loop().run_in_executor(None, conn.recv) == "cpu":
            conn.send(time.process_time())
        await gw.stop(0.5)

    logging.basicConfig(level=logging.WARNING, force=True)
    asyncio.run(serve())


def _edge_main(target: str, robot_id: str, after: int, versions: int, results, standby_bytes: int,
               side_channel: bool = True) -> None:
    """Watch for full versions newer than ``after``; report when each of ``versions`` was verified (swap-ready).

    As on a running robot, the bytes go into a standby model's memory, resident already (allocated and
    touched before the watch starts): the tensors are views of it, written in place."""
    from edge.client import FleetClient, PolicyHeaderEvent, PolicyPieceEvent, PolicyTrailerEvent
    from edge.updater import Assembler
    from edge.weight_channel import receive

    standby = memoryview(torch.zeros(standby_bytes, dtype=torch.uint8).numpy())
    client = FleetClient(target)
    held, done = None, 0
    for event in client.watch_policy(robot_id, after, want_full=True, side_channel=side_channel):
        if isinstance(event, PolicyHeaderEvent):
            header_s, header_cpu_s = time.time(), time.process_time()
            assembler, views, offset = Assembler(event, held), {}, 0
            for e in assembler.manifest.tensors:
                views[e.name], offset = standby[offset:offset + e.nbytes], offset + e.nbytes
            assembler.write_into(views, {})
            if event.ticket:
                receive(client.side_channel_address(event.side_channel_address), event.ticket, robot_id, assembler)
        elif isinstance(event, PolicyPieceEvent):
            assembler.add(event)
        elif isinstance(event, PolicyTrailerEvent):
            trailer_s = time.time()
            held, _ = assembler.finish(event)
            results.put({"robot": robot_id, "version": held.manifest.version, "ready_s": time.time(),
                         "header_s": header_s, "trailer_s": trailer_s,
                         "payload_bytes": assembler.payload_bytes, "cpu_s": time.process_time() - header_cpu_s})
            done += 1
            if done == versions:
                break
    client.close()


class Fleet:
    """Redis + a gateway process + a policy store, for the pushes."""

    def __init__(self, workdir: Path, piece_bytes: int):
        import redis

        from cloud.policy_store import PolicyStore
        from fleet.gateway_config import GatewayConfig
        from fleet.redis_server import start_redis

        self.redis_proc = start_redis(workdir / "redis")
        self.redis = redis.Redis.from_url(self.redis_proc.url)
        self.store = PolicyStore(workdir / "policies", self.redis)
        cfg = GatewayConfig(listen="127.0.0.1:0", redis_url=self.redis_proc.url, policy_dir=str(workdir / "policies"),
                            policy_cache_bytes=1 << 30,  # one 0.9 GB version at a time: the machine has 24 GB
                            weights_listen="127.0.0.1:0")
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.gateway = ctx.Process(target=_gateway_main, args=(cfg, child))
        self.gateway.start()
        self.target = f"127.0.0.1:{self._conn.recv()}"
        self.results = ctx.Queue()
        self.ctx = ctx
        del piece_bytes  # the gateway uses its default (1 MiB); kept for the JSON

    def push(self, tensors: dict[str, torch.Tensor], edges: int, tag: str, side_channel: bool = True) -> dict:
        """Start ``edges`` watchers, publish one version, wait until every edge has verified it (tensors over the
        weight side channel, or gRPC)."""
        ids = [f"{tag}-{i}" for i in range(edges)]
        after = self.store.latest_version()
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        procs = [self.ctx.Process(target=_edge_main,
                                  args=(self.target, rid, after, 1, self.results, nbytes, side_channel))
                 for rid in ids]
        for p in procs:
            p.start()
        deadline = time.monotonic() + 300
        while not all(self.redis.hexists(f"fleet:{{r:{rid}}}:status", "policy_delivered_version") for rid in ids):
            if time.monotonic() > deadline:
                raise TimeoutError("edges did not start watching within 300 s")
            time.sleep(0.05)  # polling Redis for the watch to be registered (bench only)
        cpu0 = self.gateway_cpu_s()
        t_publish = time.time()
        manifest = self.store.publish(tensors, {"bench": True}, trainable=set(tensors))
        t_published = time.time()
        reports = [self.results.get(timeout=600) for _ in ids]
        for p in procs:
            p.join()
        gateway_cpu_s = self.gateway_cpu_s() - cpu0
        ready = max(r["ready_s"] for r in reports)
        sent = sum(r["payload_bytes"] for r in reports)
        first = min(reports, key=lambda r: r["ready_s"])
        log.info("push to %d edges: header after %.3f s, trailer after %.3f s, verified after %.3f s (first edge); "
                 "CPU s: gateway %.3f, edges %s", edges, first["header_s"] - t_published,
                 first["trailer_s"] - t_published, first["ready_s"] - t_published, gateway_cpu_s,
                 [round(r["cpu_s"], 3) for r in reports])
        return {"version": manifest.version, "store_publish_s": t_published - t_publish,
                "push_s": ready - t_published, "publish_to_ready_s": ready - t_publish,
                "bytes_per_edge": manifest.total_bytes, "gateway_cpu_s": gateway_cpu_s,
                "gateway_cpu_s_per_gb": gateway_cpu_s / (sent / GB),
                "edge_cpu_s": [round(r["cpu_s"], 2) for r in reports],
                "edge_cpu_s_per_gb": sum(r["cpu_s"] for r in reports) / (sent / GB)}

    def gateway_cpu_s(self) -> float:
        self._conn.send("cpu")
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send("stop")
        self.gateway.join(30)
        self.redis.close()
        self.redis_proc.kill()


def publish_profile(tensors: dict[str, torch.Tensor], workdir: Path) -> dict:
    """Where a store publish goes, step by step, as ``DirectoryBackend.put`` does it (no Redis): the piece
    digests, the safetensors write from memory, the fsyncs, the rename."""
    from fleet.atomic import fsync_path
    from fleet.weights import build_manifest, write_safetensors

    tmp, final = workdir / "profile-tmp", workdir / "profile-final"
    tmp.mkdir()
    t0 = time.perf_counter()
    manifest, _ = build_manifest(1, 0, tensors, {}, None, created_s=0.0)
    t1 = time.perf_counter()
    with open(tmp / "model.safetensors", "wb") as fh:
        write_safetensors(fh, tensors)
    (tmp / "manifest.json").write_text(manifest.to_json())
    t2 = time.perf_counter()
    for f in tmp.iterdir():
        fsync_path(f)
    t3 = time.perf_counter()
    os.rename(tmp, final)
    fsync_path(workdir)
    t4 = time.perf_counter()
    for f in final.iterdir():
        f.unlink()
    final.rmdir()
    return {"digests_s": t1 - t0, "write_s": t2 - t1, "fsync_s": t3 - t2, "rename_s": t4 - t3}


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

SMOLVLM2_500M = {"text_config": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                     num_attention_heads=15, num_key_value_heads=5, head_dim=64, vocab_size=49280,
                                     tie_word_embeddings=False),
                 "vision_config": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, image_size=512, patch_size=16),
                 "scale_factor": 4}
"""SmolVLM2-500M's architecture (the backbone of the 450M SmolVLA), written over the tiny local backbone's
files: no download; weights are random."""


def smolvla_450m(workdir: Path, device: str = "meta"):
    """LeRobot SmolVLA with its default settings (16 VLM layers, frozen VLM, expert 0.75 wide) on the
    SmolVLM2-500M architecture; on the meta device it only counts parameters."""
    import shutil

    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from fleet.policies.smolvla import ensure_tiny_vlm

    vlm = workdir / "smolvlm2-500m-arch"
    if not vlm.exists():
        shutil.copytree(ensure_tiny_vlm(), vlm)
        config = json.loads((vlm / "config.json").read_text())
        for key, value in SMOLVLM2_500M.items():
            config[key] = {**config[key], **value} if isinstance(value, dict) else value
        (vlm / "config.json").write_text(json.dumps(config))
    cfg = SmolVLAConfig(vlm_model_name=str(vlm), load_vlm_weights=False, device="cpu",
                        input_features={"observation.state": PolicyFeature(FeatureType.STATE, (6,)),
                                        "observation.images.top": PolicyFeature(FeatureType.VISUAL, (3, 512, 512))},
                        output_features={"action": PolicyFeature(FeatureType.ACTION, (6,))})
    with torch.device(device):
        return SmolVLAPolicy(cfg)


def _bc_batch(rng, expert: np.ndarray, batch: int, chunk: int, image: bool) -> dict:
    """Operator-labelled samples (HG-DAgger trains on these by behaviour cloning)."""
    states = rng.normal(size=(batch, expert.shape[0])).astype(np.float32)
    actions = np.tanh(states @ expert).astype(np.float32)
    out = {"obs/state": states, "task_index": np.zeros(batch, np.int64),
           "action": np.repeat(actions[:, None], chunk, axis=1), "action_is_pad": np.zeros((batch, chunk), bool)}
    if image:
        out["obs/top"] = rng.integers(0, 255, (batch, 32, 32, 3), dtype=np.uint8)
    return out


def delta_sizes(steps: int, warmup: int, lrs: tuple[float, ...], quick: bool, workdir: Path,
                vla_device: str = "") -> list[dict]:
    """Train ``warmup`` steps, publish, train ``steps`` more, publish: delta bytes / full bytes (bf16).

    ``vla_device`` (e.g. "cuda"): also SmolVLA-450M itself (frozen VLM; ~100 s per step on 2 CPU cores)."""
    from cloud.gateway.policy_feed import Transfer, iter_transfer
    from cloud.policy_store import PolicyStore
    from fleet.policies import PolicyConfig, build_policy
    from fleet.types import FeatureSpec, Schema

    rows = []
    state_dim, action_dim, batch = 39, 4, 16
    setups = [("act", "fp32-master"), ("act", "bf16-weights"), ("smolvla-tiny", "fp32-master")]
    configs = {"act": PolicyConfig(chunk_size=10, n_action_steps=10, dim_model=256 if quick else 512, n_heads=8,
                                   dim_feedforward=1024 if quick else 3200, n_encoder_layers=4, n_decoder_layers=1),
               "smolvla-tiny": PolicyConfig(type="smolvla", chunk_size=10, n_action_steps=10, freeze_backbone=True)}
    if vla_device:
        smolvla_450m(workdir)  # writes the backbone directory
        configs["smolvla-450m"] = PolicyConfig(type="smolvla", chunk_size=10, n_action_steps=10, freeze_backbone=True,
                                               vlm_path=str(workdir / "smolvlm2-500m-arch"), vlm_layers=16,
                                               device=vla_device)
        setups.append(("smolvla-450m", "fp32-master"))
    rng = np.random.default_rng(0)
    expert = rng.normal(size=(state_dim, action_dim)) / np.sqrt(state_dim)
    for name, precision in setups:
        cfg = configs[name]
        image = cfg.type == "smolvla"
        schema = Schema((FeatureSpec("state", "float32", (state_dim,)),
                         *((FeatureSpec("top", "uint8", (32, 32, 3), True),) if image else ())),
                        FeatureSpec("action", "float32", (action_dim,)))
        for lr in lrs:
            policy = build_policy(cfg, schema, ("reach the goal",), seed=0)
            if precision == "bf16-weights":
                policy.model.to(torch.bfloat16)
            opt = torch.optim.AdamW(policy.trainable_parameters(), lr=lr, weight_decay=1e-4)
            store = PolicyStore(workdir / f"delta-{name}-{precision}-{lr}")

            def train(n: int) -> None:
                for _ in range(n):
                    with torch.autocast(policy.device.type, dtype=torch.bfloat16):  # bf16 compute (AMP)
                        loss = policy.sample_losses(policy.train_batch_to_torch(
                            _bc_batch(rng, expert, batch, cfg.chunk_size, image))).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()

            def publish(parent: int) -> int:
                tensors = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in policy.tensors().items()}
                return store.publish(tensors, {}, policy.trainable_names(), parent_version=parent).version

            train(warmup)
            base = publish(0)
            train(steps)
            target = publish(base)
            transfer = Transfer(target, base)
            transfer.fill(iter_transfer(store, transfer))  # the gateway's planner: what a robot at v`base` gets
            manifest = store.manifest(target)
            trainable = sum(t.nbytes for t in manifest.tensors if t.trainable)
            rows.append({"policy": name, "precision": precision, "lr": lr, "steps": steps, "warmup_steps": warmup,
                         "params": sum(t.nbytes for t in manifest.tensors) // 2,
                         "trainable_fraction": round(trainable / manifest.total_bytes, 4),
                         "delta_bytes": transfer.payload_bytes, "full_bytes": transfer.full_bytes,
                         "delta_fraction": round(transfer.payload_bytes / transfer.full_bytes, 4)})
            log.info("delta %s", rows[-1])
    return rows


def smolvla_projection(rows: list[dict], workdir: Path) -> dict:
    """SmolVLA-450M ships only its trainable part (frozen VLM skipped): trainable share x the measured delta
    fraction of a fully trainable policy (ACT, fp32 master weights, bf16 published) at each learning rate."""
    model = smolvla_450m(workdir)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    share = trainable / total
    act = {r["lr"]: r["delta_fraction"] for r in rows if (r["policy"], r["precision"]) == ("act", "fp32-master")}
    return {"params": total, "trainable_params": trainable, "trainable_fraction": round(share, 4),
            "delta_fraction_by_lr": {str(lr): round(share * f, 4) for lr, f in act.items()}}


# --- trainer step time while publishing ---------------------------------------------

def publish_step_times(workdir: Path, steps: int, every: int, quick: bool) -> dict:
    """Optimizer step times of a real LeRobot ACT policy (HG-DAgger-style behaviour cloning) with no publishing,
    with the publish on the training thread (the old path: copy, hash, write, announce) and with the publisher
    thread (a snapshot on the training thread, the rest in the background). Training uses one torch thread,
    so that the publisher has the other core, as a GPU trainer leaves the CPU to it."""
    from cloud.policy_store import PolicyStore
    from cloud.publisher import Publisher
    from fleet.policies import PolicyConfig, build_policy
    from fleet.types import FeatureSpec, Schema

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        schema = Schema((FeatureSpec("state", "float32", (39,)),), FeatureSpec("action", "float32", (4,)))
        cfg = PolicyConfig(chunk_size=10, n_action_steps=10, dim_model=256 if quick else 512, n_heads=8,
                           dim_feedforward=1024 if quick else 3200, n_encoder_layers=4, n_decoder_layers=1)
        rng = np.random.default_rng(0)
        expert = rng.normal(size=(39, 4)) / np.sqrt(39)
        modes = ("none", "on_thread", "publisher_thread")
        policies = {mode: build_policy(cfg, schema, ("reach the goal",), seed=0) for mode in modes}
        opts = {mode: torch.optim.AdamW(policies[mode].trainable_parameters(), lr=1e-4) for mode in modes}
        publishers = {mode: Publisher(PolicyStore(workdir / f"steps-{mode}"), every_steps=every) for mode in modes}
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        rounds = 4  # the modes take turns, so that the load of a shared machine hits them alike
        for block in range(rounds):
            for mode in modes:
                policy, opt, publisher = policies[mode], opts[mode], publishers[mode]
                for step in range(block * steps // rounds + 1, (block + 1) * steps // rounds + 1):
                    t0 = time.perf_counter()
                    batch = policy.train_batch_to_torch(_bc_batch(rng, expert, 16, 10, False))
                    loss = policy.sample_losses(batch).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if mode == "on_thread" and publisher.due(step):
                        publisher.publish(policy, step)
                    elif mode == "publisher_thread":
                        publisher.poll(policy)
                        if publisher.due(step):
                            publisher.publish_async(policy, step)
                    if step > every:  # after the first publish's allocations
                        times[mode].append(time.perf_counter() - t0)
                publisher.wait()
        out = {}
        for mode in modes:
            warm = np.array(times[mode])
            out[mode] = {"p50_s": float(np.percentile(warm, 50)), "p99_s": float(np.percentile(warm, 99)),
                         "max_s": float(warm.max()), "versions": len(publishers[mode].store.versions())}
            log.info("step times, %s: %s", mode, out[mode])
        out["bytes_per_version"] = sum(t.numel() * t.element_size() for t in policy.tensors().values())
        out["p99_ratio_publisher_thread"] = out["publisher_thread"]["p99_s"] / out["none"]["p99_s"]
        out["p99_ratio_on_thread"] = out["on_thread"]["p99_s"] / out["none"]["p99_s"]
        return out
    finally:
        torch.set_num_threads(threads)


# --- main ------------------------------------------------------------------------

def pushed_state_dict(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, torch.Tensor], str]:
    """What the pushes move: SmolVLA-450M's state dict (random bf16 weights) or synthetic matrices."""
    if args.params or args.quick:
        return make_state_dict(args.params or 50_000_000), "synthetic 4096x1024 bf16 matrices"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = smolvla_450m(workdir, device="cpu")
    tensors = {k: (v.bfloat16() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    return tensors, "LeRobot SmolVLA on the SmolVLM2-500M architecture, random weights, bf16"


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="weight_sync-") as tmp:
        workdir = Path(tmp)
        tensors, what = pushed_state_dict(args, workdir)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        out: dict = {"quick": args.quick, "params": sum(t.numel() for t in tensors.values()), "state_dict": what,
                     "tensors": len(tensors), "bytes": nbytes, "dtype": "bfloat16",
                     "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                     "piece_bytes": 1 << 20}
        raw_s = min(raw_copy(nbytes) for _ in range(2))
        out.update(raw_copy_s=raw_s, raw_copy_gbps=nbytes / raw_s / GB)
        out["publish_profile"] = publish_profile(tensors, workdir)
        fleet = Fleet(workdir, out["piece_bytes"])
        try:
            single = [fleet.push(tensors, 1, f"single{i}") for i in range(args.repeats)]
            best = min(single, key=lambda r: r["push_s"])
            out.update(full_push_s=best["push_s"], full_push_gbps=nbytes / best["push_s"] / GB,
                       publish_to_ready_s=best["publish_to_ready_s"], store_publish_s=best["store_publish_s"],
                       single_runs_s=[round(r["push_s"], 3) for r in single],
                       edge_cpu_s_per_gb=best["edge_cpu_s_per_gb"],
                       single_gateway_cpu_s_per_gb=float(np.median([r["gateway_cpu_s_per_gb"] for r in single])),
                       single_gateway_cpu_s_per_gb_runs=[round(r["gateway_cpu_s_per_gb"], 3) for r in single])
            stored = str(fleet.store.payload_file(best["version"])[0])
            floors = [sendfile_floor(stored, nbytes) for _ in range(args.repeats)]
            out["sendfile_floor_cpu_s_per_gb"] = float(np.median([f["sender_cpu_s_per_gb"] for f in floors]))
            out["sendfile_floor_runs"] = [round(f["sender_cpu_s_per_gb"], 3) for f in floors]
            over_grpc = fleet.push(tensors, 1, "grpc", side_channel=False)  # the same push without the side channel
            out.update(grpc_push_s=over_grpc["push_s"], grpc_edge_cpu_s_per_gb=over_grpc["edge_cpu_s_per_gb"],
                       grpc_gateway_cpu_s_per_gb=over_grpc["gateway_cpu_s_per_gb"])
            if args.edges > 1:
                fan = fleet.push(tensors, args.edges, "fan")
                out.update({f"fanout{args.edges}_s": fan["push_s"], "fanout_edges": args.edges,
                            "gateway_cpu_s_per_gb": fan["gateway_cpu_s_per_gb"], "fanout_edge_cpu_s": fan["edge_cpu_s"]})
                out[f"fanout{args.edges}_over_single"] = fan["push_s"] / best["push_s"]
                out["fanout_ratio"] = out[f"fanout{args.edges}_over_single"]
        finally:
            fleet.close()
        if args.step_times:
            out["step_times"] = publish_step_times(workdir, args.step_times, 5, args.quick)
        lerobot = min((lerobot_push(tensors) for _ in range(args.repeats)), key=lambda r: r["push_s"])
        out.update(lerobot_push_s=lerobot["push_s"], lerobot_transport_s=lerobot["push_s"],
                   lerobot_gbps=nbytes / lerobot["push_s"] / GB)
        out["ratio_to_raw"] = out["ratio_vs_raw"] = out["full_push_gbps"] / out["raw_copy_gbps"]
        if not args.skip_delta:
            rows = delta_sizes(args.delta_steps, args.warmup_steps, (1e-5, 1e-4), args.quick, workdir, args.vla_delta)
            out["delta_runs"] = rows
            headline = next(r for r in rows if (r["policy"], r["precision"], r["lr"]) == ("act", "fp32-master", 1e-4))
            out["delta_fraction"] = out["delta_ratio"] = headline["delta_fraction"]
            out["delta_headline"] = ("ACT (every weight trainable), fp32 master weights with bf16 compute, published "
                                     f"as bf16, lr 1e-4, {args.delta_steps} steps between versions")
            out["smolvla_450m_projection"] = smolvla_projection(rows, workdir)
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
            ("  store write, step by step", ", ".join(f"{k.removesuffix('_s')} {v:.3f} s"
                                                      for k, v in out["publish_profile"].items())),
            ("  CPU per GB (1 edge)", f"edge {out['edge_cpu_s_per_gb']:.2f} s, gateway "
                                      f"{out['single_gateway_cpu_s_per_gb']:.2f} s (median of "
                                      f"{out['single_gateway_cpu_s_per_gb_runs']})"),
            ("  bare sendfile, same file", f"sender {out['sendfile_floor_cpu_s_per_gb']:.2f} CPU s/GB (median of "
                                           f"{out['sendfile_floor_runs']}; the loopback floor of the gateway's)"),
            ("  same push over gRPC", f"{out['grpc_push_s']:.3f} s; CPU per GB edge "
                                      f"{out['grpc_edge_cpu_s_per_gb']:.2f} s, gateway "
                                      f"{out['grpc_gateway_cpu_s_per_gb']:.2f} s"),
            ("LeRobot transport", f"{out['lerobot_push_s']:.3f} s  {out['lerobot_gbps']:.2f} GB/s  "
                                  f"(fleet is {out['lerobot_push_s'] / out['full_push_s']:.2f}x faster)")]
    if "fanout_ratio" in out:
        n = out["fanout_edges"]
        rows.append((f"fan-out to {n} edges", f"{out[f'fanout{n}_s']:.3f} s  ({out['fanout_ratio']:.2f}x single); "
                                              f"gateway {out['gateway_cpu_s_per_gb']:.2f} CPU s/GB"))
    if "step_times" in out:
        st = out["step_times"]
        rows.append(("trainer step p99 (ACT, publish/5 steps)",
                     f"none {st['none']['p99_s'] * 1e3:.0f} ms, on the training thread "
                     f"{st['on_thread']['p99_s'] * 1e3:.0f} ms ({st['p99_ratio_on_thread']:.2f}x), publisher thread "
                     f"{st['publisher_thread']['p99_s'] * 1e3:.0f} ms ({st['p99_ratio_publisher_thread']:.2f}x)"))
    for r in out.get("delta_runs", []):
        rows.append((f"delta {r['policy']} {r['precision']} lr {r['lr']:g}",
                     f"{r['delta_fraction'] * 100:.2f}% of full ({r['params'] / 1e6:.1f}M params, {r['steps']} steps, "
                     f"{r['trainable_fraction'] * 100:.0f}% trainable)"))
    if "smolvla_450m_projection" in out:
        proj = out["smolvla_450m_projection"]
        rows.append(("delta SmolVLA-450M (projected)",
                     ", ".join(f"lr {lr}: {f * 100:.2f}%" for lr, f in proj["delta_fraction_by_lr"].items())
                     + f" ({proj['trainable_fraction'] * 100:.0f}% trainable)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="50M synthetic parameters instead of SmolVLA-450M; smaller delta policy")
    p.add_argument("--params", type=int, default=0, help="push this many synthetic bf16 parameters instead")
    p.add_argument("--edges", type=int, default=8, help="edges in the fan-out run (1 = skip it)")
    p.add_argument("--repeats", type=int, default=2, help="single-edge pushes (the best one counts)")
    p.add_argument("--delta-steps", type=int, default=25, help="optimizer steps between two versions")
    p.add_argument("--warmup-steps", type=int, default=20, help="optimizer steps before the first of them")
    p.add_argument("--skip-delta", action="store_true", help="skip the delta-size runs")
    p.add_argument("--step-times", type=int, default=200, metavar="STEPS",
                   help="trainer steps per publishing mode for the step-time run (0 = skip it)")
    p.add_argument("--vla-delta", default="", metavar="DEVICE",
                   help="also train SmolVLA-450M itself on DEVICE (cuda; ~100 s per step on 2 CPU cores)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    out = run(args)
    print(table(out))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
