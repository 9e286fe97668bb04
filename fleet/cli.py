"""``fleet``: one command, one subcommand per process.

    fleet demo      the whole system on this machine (private Redis, learner, simulated fleet)
    fleet learner   the cloud side: gateway + trainer (two processes)
    fleet gateway   the gRPC gateway alone (run several replicas behind a load balancer)
    fleet trainer   the trainer alone
    fleet edge      one robot's edge agent
    fleet status    the fleet as seen from Redis
    fleet seed      write scripted MetaWorld demonstrations into the buffer as offline data
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time

from fleet.errors import ConfigError


def _stop_on_signals() -> threading.Event:
    """First SIGINT/SIGTERM: graceful stop (set the event). Second: exit at once."""
    stop = threading.Event()

    def handler(signum, frame):
        if stop.is_set():
            logging.getLogger("fleet").warning("second signal: exiting now")
            sys.exit(130)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _cmd_gateway(args, values) -> int:
    import asyncio

    from cloud.gateway.server import serve_forever
    from fleet import metrics
    from fleet.config import GatewayConfig, build_config

    cfg = build_config(GatewayConfig, values)
    metrics.serve(cfg.metrics_port)
    asyncio.run(serve_forever(cfg))
    return 0


def _cmd_trainer(args, values) -> int:
    from cloud.trainer import Trainer
    from fleet import metrics
    from fleet.config import TrainerConfig, build_config

    cfg = build_config(TrainerConfig, values)
    metrics.serve(cfg.metrics_port)
    stop = _stop_on_signals()
    try:
        Trainer(cfg, stop).run()
    except InterruptedError:
        pass
    return 0


def _cmd_learner(args, values) -> int:
    from pathlib import Path

    from cloud.app import run_learner

    stop = _stop_on_signals()
    passthrough = [a for a in args.trainer_args if a != "--"]
    return run_learner(args.listen, args.redis_url, args.policy_dir, passthrough, Path(args.log_dir), stop,
                       args.gateway_metrics_port)


def _cmd_edge(args, values) -> int:
    from edge.agent import EdgeAgent, EdgeConfig
    from fleet import metrics
    from fleet.config import build_config

    if args.config:
        with open(args.config) as fh:
            from_file = json.load(fh)
        values = {**_flatten(from_file), **values}
    cfg = build_config(EdgeConfig, values)
    metrics.serve(cfg.metrics_port)
    stop = _stop_on_signals()
    EdgeAgent(cfg).run(stop)
    return 0


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k.replace('-', '_')}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


def _cmd_status(args, values) -> int:
    import redis

    from cloud.status import fleet_status, format_table

    client = redis.Redis.from_url(args.redis_url, socket_connect_timeout=5)
    while True:
        status = fleet_status(client)
        if args.json:
            print(json.dumps(status["robots"]))
        else:
            if args.watch:
                print("\033[2J\033[H", end="")
            print(format_table(status))
        if not args.watch:
            return 0
        time.sleep(args.interval)


def _cmd_seed(args, values) -> int:
    from cloud.offline import seed_scripted_demos

    result = seed_scripted_demos(args.redis_url, args.tasks.split(","), args.episodes_per_task,
                                 args.max_episode_steps, args.seed)
    print(json.dumps(result))
    return 0


def _cmd_demo(args, values) -> int:
    from cloud.demo import DemoConfig, run_demo
    from fleet.config import build_config

    cfg = build_config(DemoConfig, values)
    stop = _stop_on_signals()
    summary = run_demo(cfg, stop)
    print()
    print("                      start    end")
    print(f"autonomous success    {summary['success_rate_start']:.2f}     {summary['success_rate_end']:.2f}")
    print(f"intervention rate     {summary['intervention_rate_start']:.2f}     {summary['intervention_rate_end']:.2f}")
    print(f"policy versions published: {summary['policy_versions_published']}; "
          f"steps ingested: {summary['steps_ingested']}; episodes: {summary['episodes']}")
    print(f"summary: {summary['run_dir']}/summary.json")
    print(f"learning curve: {summary['run_dir']}/learning_curve.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fleet.config import DEFAULT_TASKS, GatewayConfig, TrainerConfig, add_dataclass_args

    parser = argparse.ArgumentParser(prog="fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from cloud.demo import DemoConfig

    p = sub.add_parser("demo", help="run the whole system on this machine and show the policy improving",
                       description=DemoConfig.__doc__ + " Writes summary.json and learning_curve.png to the run "
                       "directory.")
    add_dataclass_args(p, DemoConfig, renames={"duration_s": "duration"})
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("learner", help="the cloud side: gateway + trainer as two processes",
                       description="Start the gateway and the trainer as child processes sharing Redis and "
                       "the policy store. Trainer options go after '--' (see `fleet trainer --help`).")
    p.add_argument("--listen", default="[::]:50051", help="gateway host:port (default: [::]:50051)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis with the buffer (AOF on)")
    p.add_argument("--policy-dir", default="runs/learner/policies", help="policy store directory")
    p.add_argument("--log-dir", default="runs/learner/logs", help="where the children's logs go")
    p.add_argument("--gateway-metrics-port", type=int, default=0, help="gateway /metrics port (0 = off)")
    p.add_argument("trainer_args", nargs=argparse.REMAINDER, help="options passed to `fleet trainer`")
    p.set_defaults(func=_cmd_learner)

    p = sub.add_parser("gateway", help="the gRPC gateway (stateless; run several behind a load balancer)",
                       description=GatewayConfig.__doc__)
    add_dataclass_args(p, GatewayConfig)
    p.set_defaults(func=_cmd_gateway)

    p = sub.add_parser("trainer", help="the trainer: sample from Redis, train, publish versions",
                       description=TrainerConfig.__doc__)
    add_dataclass_args(p, TrainerConfig)
    p.set_defaults(func=_cmd_trainer)

    from edge.agent import EdgeConfig

    p = sub.add_parser("edge", help="one robot's edge agent", description=EdgeConfig.__doc__)
    p.add_argument("--config", help="JSON file with EdgeConfig fields; command-line options override it")
    add_dataclass_args(p, EdgeConfig)
    p.set_defaults(func=_cmd_edge)

    p = sub.add_parser("status", help="a table of the fleet's robots, read from Redis")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis with the buffer")
    p.add_argument("--json", action="store_true", help="print a JSON list of robots")
    p.add_argument("--watch", action="store_true", help="refresh until interrupted")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("seed", help="write scripted MetaWorld demonstrations into the buffer")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis with the buffer")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated tasks")
    p.add_argument("--episodes-per-task", type=int, default=3, help="demonstrations per task")
    p.add_argument("--max-episode-steps", type=int, default=150, help="episode length limit")
    p.add_argument("--seed", type=int, default=0, help="seed for initial states")
    p.set_defaults(func=_cmd_seed)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    values = {k: v for k, v in vars(args).items() if "." in k or k not in
              ("command", "func", "verbose", "config", "json", "watch", "interval", "trainer_args")}
    try:
        return args.func(args, values)
    except ConfigError as exc:
        parser.exit(2, f"fleet {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
