"""``fleet``: one command, one subcommand per process.

    fleet demo      the whole system on this machine (private Redis, learner, simulated fleet)
    fleet learner   the cloud side: gateway + trainer (+ operators), as child processes
    fleet gateway   the gRPC gateway alone (run several replicas behind a load balancer)
    fleet trainer   the trainer alone
    fleet operators M operators shared by the robots: allocator, operator console, metrics
    fleet edge      one robot's edge agent
    fleet sim-fleet N simulated robots (full edge agents) on threads of one process
    fleet ros2-sim-robot  a simulated arm as a ROS 2 driver, for `fleet edge --backend.type=ros2`
    fleet status    the fleet as seen from Redis
    fleet seed      write scripted MetaWorld demonstrations into the buffer as offline data
    fleet export    buffer episodes as a LeRobotDataset v3 or an MCAP rosbag2
    fleet import    a LeRobotDataset on local disk into the buffer as offline data
    fleet certs     a development CA, gateway/robot certificates, robot tokens, revocation, the publisher key
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

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


def _setup_logging(verbose: bool, path: Path | None = None, replay: list[logging.LogRecord] = ()) -> None:
    """Log to stderr, or only to the file ``path`` (with Python's warnings); then hand ``replay`` (records
    logged before logging was set up) to the new handler."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path) if path is not None else logging.StreamHandler()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.captureWarnings(path is not None)
    for record in replay:
        if record.levelno >= logging.getLogger().level:
            handler.handle(record)


@contextlib.contextmanager
def _records_held():
    """Hold the log records of the block (LeRobot's configs log while they are built) for ``_setup_logging``."""
    held: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = held.append
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield held
    finally:
        root.removeHandler(handler)


def _run_gateway(cfg) -> int:
    import asyncio

    from cloud.gateway.server import protected_mode_refusal, serve_forever
    from fleet import metrics
    from fleet.secret_files import check_private

    refusal = None if cfg.insecure else protected_mode_refusal(cfg)
    if refusal:
        raise ConfigError(refusal)
    for what in ("tls_key_file", "token_key_file"):  # before anything starts (read again when used)
        if getattr(cfg.security, what):
            check_private(getattr(cfg.security, what), what)
    metrics.serve(cfg.metrics_port)
    asyncio.run(serve_forever(cfg))
    return 0


def _exit_if_stop_hangs(stop: threading.Event, done: threading.Event, timeout_s: float) -> None:
    """Once ``stop`` is set, exit 1 if ``done`` is not set within ``timeout_s`` (a bound for Kubernetes)."""

    def watch() -> None:
        stop.wait()
        if not done.wait(timeout_s):
            logging.getLogger("fleet").error("shutdown took longer than %.0fs; exiting now", timeout_s)
            os._exit(1)

    threading.Thread(target=watch, name="shutdown-watchdog", daemon=True).start()


def _run_trainer(cfg) -> int:
    from cloud.trainer import Trainer
    from fleet import metrics

    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # torchrun: one /metrics port per rank on a node
    metrics.serve(cfg.metrics_port + local_rank if cfg.metrics_port else 0)
    stop = _stop_on_signals()
    done = threading.Event()
    _exit_if_stop_hangs(stop, done, cfg.shutdown_timeout_s)
    try:
        Trainer(cfg, stop, fresh=cfg.fresh).run()
    except InterruptedError:
        pass
    finally:
        done.set()
    return 0


def _run_operators(cfg) -> int:
    from cloud.operators.service import OperatorsService
    from fleet import metrics

    metrics.serve(cfg.metrics_port)
    stop = _stop_on_signals()
    OperatorsService(cfg).run(stop)
    return 0


def _cmd_learner(args) -> int:
    from pathlib import Path

    from cloud.app import run_learner
    from fleet.netaddr import is_loopback

    if not is_loopback(args.listen):  # protected mode: the learner's gateway child runs without TLS or tokens
        if not args.insecure:
            raise ConfigError(f"refusing to listen on {args.listen} (not loopback) without TLS and robot tokens, "
                              "which `fleet learner` cannot set: pass --insecure, use a loopback --listen, or run "
                              "`fleet gateway` with --security.tls_cert_file, --security.tls_key_file and "
                              "--security.token_key_file and `fleet trainer` separately")
    operator_args = None
    if args.operators:
        from cloud.app import operators_args

        extra = ["--policy", args.operator_policy, "--metrics_port", str(args.operators_metrics_port),
                 *(["--console_listen", args.console_listen] if args.console_listen else []),
                 *(["--console_insecure", "true"] if args.console_insecure else []),
                 *(["--console_token_file", args.console_token_file] if args.console_token_file else [])]
        operator_args = operators_args(args.redis_url, args.operators, extra)
        parse_config("operators", operator_args[1:], exit_on_error=False)  # a bad value exits 2 before anything starts
    stop = _stop_on_signals()
    passthrough = [a for a in args.trainer_args if a != "--"]
    return run_learner(args.listen, args.redis_url, args.policy_dir, passthrough, Path(args.log_dir), stop,
                       args.gateway_metrics_port, args.embodiment, args.insecure, operator_args)


def _run_edge(cfg) -> int:
    from edge.config import plaintext_refusal
    from fleet import metrics

    refusal = None if cfg.insecure else plaintext_refusal(cfg)
    if refusal:
        raise ConfigError(refusal)
    if cfg.security.policy_public_key_files:  # before anything starts (read again when the agent is built)
        from fleet.signing import PinnedKeys

        PinnedKeys.from_files(cfg.security.policy_public_key_files)
    from edge.agent import EdgeAgent  # torch and the policy code: only for a config that passed

    metrics.serve(cfg.metrics_port)
    stop = _stop_on_signals()
    EdgeAgent(cfg).run(stop)
    return 0


def _run_sim_fleet(cfg) -> int:
    from edge.sim.fleet import SimFleet

    stop = _stop_on_signals()
    SimFleet(cfg).run(stop)
    return 0


def _run_ros2_sim_robot(cfg) -> int:
    try:
        from edge.sim.ros2_arm import SimArm
    except ImportError as e:
        raise ConfigError(f"ROS 2 (rclpy) is not installed: pip install -e '.[ros2]' ({e})") from None
    stop = _stop_on_signals()
    SimArm(cfg).run(stop)
    return 0


def _cmd_status(args) -> int:
    import redis

    from cloud.status import run_status
    from fleet.redis_client import connect

    if args.interval <= 0 or args.window_s <= 0:
        raise ConfigError(f"--interval ({args.interval}) and --window_s ({args.window_s}) must be > 0")
    client = connect(args.redis_url, socket_connect_timeout=5, socket_timeout=10)
    stop = _stop_on_signals() if args.watch else threading.Event()
    try:
        run_status(client, args.json, args.watch, args.interval, args.window_s, stop,
                   lambda text: print(text, flush=True))
    except redis.RedisError as exc:
        print(f"fleet status: cannot read Redis at {args.redis_url}: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_seed(args) -> int:
    from edge.sim.demos import seed_scripted_demos
    from edge.loop import LoopConfig

    result = seed_scripted_demos(args.redis_url, list(args.tasks), args.episodes_per_task,
                                 args.max_episode_steps or LoopConfig.max_episode_steps, args.seed)
    print(json.dumps(result))
    return 0


def _cmd_export(args) -> int:
    from cloud.export import ExportFilter, parse_time
    from fleet.redis_client import connect

    flt = ExportFilter(tasks=tuple(args.task), robots=tuple(args.robot), embodiment=args.embodiment,
                       since_s=parse_time(args.since) if args.since else None,
                       until_s=parse_time(args.until) if args.until else None,
                       min_version=args.min_version, max_version=args.max_version,
                       include_unfinished=args.include_unfinished, include_eval=not args.no_eval)
    client = connect(args.redis_url, socket_connect_timeout=5)
    if args.format == "lerobot":
        from cloud.export.lerobot import export_lerobot

        result = export_lerobot(client, args.out, flt, fps=args.fps, video=args.video)
    else:
        from cloud.export.rosbag2 import export_rosbag2

        result = export_rosbag2(client, args.out, flt)
    print(json.dumps({"path": result.path, "episodes": result.episodes, "steps": result.steps}))
    return 0


def _cmd_import(args) -> int:
    from cloud.offline_lerobot import import_lerobot_dataset

    result = import_lerobot_dataset(args.redis_url, args.path, robot_id=args.robot_id, embodiment=args.embodiment,
                                    max_episodes=args.max_episodes)
    print(json.dumps(result))
    return 0


TOKEN_TTL_S = 30 * 24 * 3600.0
TOKEN_TTL_HELP = "token lifetime, seconds (default 30 days; 0 = until revoked); refresh with `fleet certs token`"


def _cmd_certs(args) -> int:
    from fleet import certs

    if args.action in ("publisher-key", "rotate-publisher-key"):
        return _publisher_key(args)
    try:
        if args.action == "init":
            made = certs.init_pki(args.dir, tuple(h for h in args.hosts.split(",") if h),
                                  tuple(r for r in args.robots.split(",") if r), args.token_ttl_s)
        elif args.action == "robot":
            made = [certs.add_robot(args.dir, args.robot_id, args.token_ttl_s)]
        elif args.action == "token":
            path, claims = certs.refresh_token(args.dir, args.robot_id, args.token_ttl_s)
            print(json.dumps({"robot_id": args.robot_id, "token_file": str(path), "token_id": claims.token_id,
                              "expires_s": claims.expires_s}))
            return 0
        elif args.action == "deny":
            from pathlib import Path

            from cloud.gateway.auth import deny_cert
            from fleet.redis_client import connect

            fingerprint, newly = deny_cert(connect(args.redis_url), Path(args.cert_file).read_bytes())
            print(json.dumps({"denied_sha256": fingerprint, "already_denied": not newly}))
            return 0
        else:
            from cloud.gateway.auth import revoke
            from fleet.redis_client import connect

            newly = revoke(connect(args.redis_url), args.token_id)
            print(json.dumps({"revoked": args.token_id, "already_revoked": not newly}))
            return 0
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    print(json.dumps({"dir": args.dir, "robots": {c.robot_id: {"dir": str(c.directory), "token_id": c.token_id}
                                                  for c in made}}))
    return 0


def _publisher_key(args) -> int:
    from pathlib import Path

    from fleet import signing

    root = Path(args.dir)
    try:
        if args.action == "publisher-key":
            out = {"key_id": signing.make_publisher_key(root)}
        else:
            old, new = signing.rotate_publisher_key(root)
            out = {"key_id": new, "previous_key_id": old,
                   "pin_during_rotation": [str(root / signing.PUBLIC_KEY_FILE),
                                           str(root / signing.PREVIOUS_PUBLIC_KEY_FILE)]}
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    print(json.dumps({"private_key": str(root / signing.PRIVATE_KEY_FILE),
                      "public_key": str(root / signing.PUBLIC_KEY_FILE), **out}))
    return 0


def _cmd_robots(args) -> int:
    from cloud.buffer import ROBOTS_KEY, RobotKeys
    from fleet.redis_client import connect

    if args.ttl_s < 1:
        raise ConfigError(f"--ttl_s ({args.ttl_s}) must be >= 1")
    import redis

    client = connect(args.redis_url, socket_connect_timeout=5, socket_timeout=10)
    try:
        if not client.hexists(ROBOTS_KEY, args.robot_id):
            raise ConfigError(f"robot {args.robot_id!r} has never registered (see `fleet status`)")
        client.set(RobotKeys(args.robot_id).allow_schema_change, "1", ex=args.ttl_s)
    except redis.RedisError as exc:
        print(f"fleet robots: cannot reach Redis at {args.redis_url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"robot_id": args.robot_id, "schema_change_allowed_for_s": args.ttl_s}))
    return 0


def _fmt(x) -> str:
    return "  n/a" if x is None or x != x else f"{x:.2f}"


def _demo_log_file(cfg):
    """The demo logs to <run_dir>/logs/demo.log (the terminal shows its view); its run directory is fixed here."""
    from dataclasses import replace

    from edge.sim.demo import run_dir_of

    cfg = replace(cfg, run_dir=str(run_dir_of(cfg)))
    return cfg, Path(cfg.run_dir) / "logs" / "demo.log"


def _run_demo(cfg) -> int:
    from edge.sim.demo import run_demo
    from edge.sim.demo_view import DemoView

    stop = _stop_on_signals()
    summary = run_demo(cfg, stop, DemoView.for_stdout(cfg.progress_interval_s))
    print()
    print("                      start    end")
    print(f"autonomous success    {_fmt(summary['success_rate_start'])}     {_fmt(summary['success_rate_end'])}")
    print(f"intervention rate     {_fmt(summary['intervention_rate_start'])}     "
          f"{_fmt(summary['intervention_rate_end'])}")
    print(f"policy versions published: {summary['policy_versions_published']}; "
          f"steps ingested: {summary['steps_ingested']}; episodes: {summary['episodes']}")
    print(f"summary: {summary['run_dir']}/summary.json")
    print(f"learning curve: {summary['run_dir']}/learning_curve.png")
    return 0


def _gateway_config():
    from fleet.gateway_config import GatewayConfig

    return GatewayConfig


def _trainer_config():
    from cloud.checkpoints import RESUME_HELP
    from cloud.trainer_config import TrainerConfig

    return TrainerConfig, RESUME_HELP


def _operators_config():
    from cloud.operators.config import OperatorsConfig

    return OperatorsConfig, "See docs/operators.md."


def _edge_config():
    from edge.config import EdgeConfig  # no torch: a bad config exits 2 before the agent's imports

    return EdgeConfig


def _sim_fleet_config():
    from edge.sim.fleet import SimFleetConfig

    return SimFleetConfig


def _ros2_sim_robot_config():
    from edge.sim.ros2_arm_config import SimArmConfig

    return SimArmConfig, "See docs/robots.md."


def _demo_config():
    from edge.sim.demo import DemoConfig

    return DemoConfig, "Writes summary.json and learning_curve.png to the run directory."


CONFIG_COMMANDS = {
    "demo": ("run the whole system on this machine and show the policy improving", _demo_config, _run_demo),
    "gateway": ("the gRPC gateway (stateless; run several behind a load balancer)", _gateway_config, _run_gateway),
    "trainer": ("the trainer: sample from Redis, train, publish versions", _trainer_config, _run_trainer),
    "operators": ("M operators shared by the robots: who helps which robot now, the operator console",
                  _operators_config, _run_operators),
    "edge": ("one robot's edge agent", _edge_config, _run_edge),
    "sim-fleet": ("N simulated robots (full edge agents) on threads of one process", _sim_fleet_config,
                  _run_sim_fleet),
    "ros2-sim-robot": ("a simulated MetaWorld arm as a ROS 2 driver (joint states, camera, commands, reset "
                       "service, scripted teleop)", _ros2_sim_robot_config, _run_ros2_sim_robot),
}
"""Commands whose options are one typed config (draccus: ``--field=value``, ``--config_path``): help,
the config class (imported only when the command runs: a gateway never imports the trainer's torch)
and the runner."""

LOG_FILES = {"demo": _demo_log_file}
"""Commands that log to a file instead of stderr: config -> (config, log file)."""


def parse_config(command: str, argv: list[str], exit_on_error: bool = True):
    """The config of ``fleet <command> <argv>`` (exit 2 on a bad one, or ConfigError without ``exit_on_error``)."""
    from fleet.config import parse

    found = CONFIG_COMMANDS[command][1]()
    cls, extra = found if isinstance(found, tuple) else (found, "")
    return parse(cls, argv, prog=f"fleet {command}", description=f"{cls.__doc__}\n\n{extra}".strip(),
                 exit_on_error=exit_on_error)


def run_config_command(command: str, argv: list[str], verbose: bool = False) -> int:
    """Parse ``argv`` into the command's config (exit 2 on a bad one) and run it."""
    with _records_held() as held:
        cfg = parse_config(command, argv)
    log_file = None
    if command in LOG_FILES:
        cfg, log_file = LOG_FILES[command](cfg)
    runner = CONFIG_COMMANDS[command][2]
    _setup_logging(verbose, log_file, held)
    try:
        return runner(cfg)
    except ConfigError as exc:
        print(f"fleet {command}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        return 130


def _tasks(text: str) -> tuple[str, ...]:
    from fleet.config import cli_value

    value = cli_value(tuple[str, ...], text)
    if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
        raise argparse.ArgumentTypeError(f"expected a task or a YAML list of tasks, got {text!r}")
    return tuple(value)


def build_parser() -> argparse.ArgumentParser:
    """The commands without a process config (their few options are plain argparse flags, spelt as the
    config fields are: ``--redis_url``); the others are listed here and parsed by :func:`run_config_command`."""
    from fleet.config import DEFAULT_TASKS

    parser = argparse.ArgumentParser(prog="fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, (help_text, _, _) in CONFIG_COMMANDS.items():  # parsed by fleet.config.parse (draccus)
        sub.add_parser(name, help=help_text, add_help=False)

    p = sub.add_parser("learner", help="the cloud side: gateway + trainer (+ operators) as child processes",
                       description="Start the gateway and the trainer as child processes sharing Redis and "
                       "the policy store. Trainer options go after '--' (see `fleet trainer --help`). The "
                       "trainer checkpoints into <policy-dir>-checkpoints and resumes from "
                       "the newest complete checkpoint by itself when restarted ('-- --fresh' starts over); the "
                       "buffer lives in Redis. See docs/learner-recovery.md.")
    p.add_argument("--listen", default="127.0.0.1:50051", help="gateway host:port (default: 127.0.0.1:50051; "
                   "beyond loopback needs --insecure: the learner's gateway has no TLS or robot tokens)")
    p.add_argument("--insecure", action="store_true",
                   help="let the gateway serve a non-loopback --listen without TLS and robot tokens (trusted "
                   "networks only; see docs/deploy.md)")
    p.add_argument("--redis_url", default="redis://127.0.0.1:6379/0", help="Redis with the buffer (AOF on)")
    p.add_argument("--policy_dir", default="runs/learner/policies", help="policy store directory")
    p.add_argument("--log_dir", default="runs/learner/logs", help="where the children's logs go")
    p.add_argument("--gateway_metrics_port", type=int, default=0, help="gateway /metrics port (0 = off)")
    p.add_argument("--embodiment", default="", help="serve and train only this embodiment's policy line (run one "
                   "learner, with its own --listen and --policy_dir, per embodiment; docs/robots.md)")
    p.add_argument("--operators", default="", help="share this many operators (or these names, comma-separated) "
                   "among the robots: also starts `fleet operators` (docs/operators.md); default: none")
    p.add_argument("--operator_policy", default="priority", help="with --operators: priority, round_robin or random")
    p.add_argument("--console_listen", default="", help="with --operators: host:port of the operator console "
                   "(loopback; e.g. 127.0.0.1:8470)")
    p.add_argument("--console_insecure", action="store_true", help="with --console_listen: let the console listen "
                   "beyond loopback (plain HTTP; take-over moves robots): trusted networks only")
    p.add_argument("--console_token_file", default="", help="with --console_listen: file holding the bearer token "
                   "every console API call must carry (docs/operators.md, Console)")
    p.add_argument("--operators_metrics_port", type=int, default=0, help="with --operators: its /metrics port (0 = off)")
    p.add_argument("trainer_args", nargs=argparse.REMAINDER, help="options passed to `fleet trainer`")
    p.set_defaults(func=_cmd_learner)

    p = sub.add_parser("status", help="a table of the fleet's robots, read from Redis",
                       description="Robots (id, embodiment, task, connected, policy version and lag, steps/s, "
                       "intervention rate, spool backlog) and, per task over the last --window_s seconds, "
                       "autonomous success, intervention ratio, human effort and Return on Human Effort. "
                       "Offline-data sources (seeded demonstrations) are left out.")
    p.add_argument("--redis_url", default="redis://127.0.0.1:6379/0", help="Redis with the buffer")
    p.add_argument("--json", action="store_true", help="print a JSON list of robots")
    p.add_argument("--watch", action="store_true", help="refresh until interrupted")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch")
    p.add_argument("--window_s", type=float, default=600.0, help="window of the per-task summary, seconds")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("seed", help="write scripted MetaWorld demonstrations into the buffer")
    p.add_argument("--redis_url", default="redis://127.0.0.1:6379/0", help="Redis with the buffer")
    p.add_argument("--tasks", default=DEFAULT_TASKS, type=_tasks,
                   help='tasks: one, or a YAML list \'["reach the goal", "close the drawer"]\' (default: the demo\'s)')
    p.add_argument("--episodes_per_task", type=int, default=3, help="demonstrations per task")
    p.add_argument("--max_episode_steps", type=int, default=0,
                   help="episode length limit (0 = the control loop's default, loop.max_episode_steps)")
    p.add_argument("--seed", type=int, default=0, help="seed for initial states")
    p.set_defaults(func=_cmd_seed)

    p = sub.add_parser("export", help="buffer episodes as a LeRobotDataset v3 or an MCAP rosbag2",
                       description="Write episodes from the Redis buffer in the formats the field uses "
                       "(docs/robots.md). Filters combine with AND; repeat --task/--robot for several.")
    p.add_argument("--format", required=True, choices=("lerobot", "rosbag2"), help="output format")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--redis_url", default="redis://127.0.0.1:6379/0", help="Redis with the buffer")
    p.add_argument("--task", action="append", default=[], help="only this task (repeatable)")
    p.add_argument("--robot", action="append", default=[], help="only this robot id (repeatable)")
    p.add_argument("--embodiment", default="", help="only robots of this embodiment")
    p.add_argument("--since", default="", help="episodes started at/after: Unix seconds or ISO 8601 (UTC)")
    p.add_argument("--until", default="", help="episodes started before: Unix seconds or ISO 8601 (UTC)")
    p.add_argument("--min_version", type=int, default=None, help="only episodes run by policy version >= N")
    p.add_argument("--max_version", type=int, default=None, help="only episodes run by policy version <= N")
    p.add_argument("--include_unfinished", action="store_true", help="also episodes still being recorded")
    p.add_argument("--no_eval", action="store_true", help="leave out evaluation episodes")
    p.add_argument("--fps", type=int, default=None, help="lerobot: frame rate (default: the robots' registered control rate)")
    p.add_argument("--video", action="store_true", help="lerobot: store camera frames as AV1 video, not images")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("import", help="a LeRobotDataset on local disk into the buffer as offline data",
                       description="Read a LeRobotDataset v3 from a local directory (no hub) and write its episodes "
                       "into the buffer as offline demonstrations for the learner (docs/robots.md).")
    p.add_argument("--format", default="lerobot", choices=("lerobot",), help="input format")
    p.add_argument("--path", required=True, help="dataset root (the directory holding meta/info.json)")
    p.add_argument("--redis_url", default="redis://127.0.0.1:6379/0", help="Redis with the buffer")
    p.add_argument("--robot_id", default="", help="offline robot id to file it under (default: offline-<dir name>)")
    p.add_argument("--embodiment", default="", help="embodiment (default: lerobot-<robot_type>, as the edge names it)")
    p.add_argument("--max_episodes", type=int, default=0, help="import at most this many episodes (0 = all)")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("certs", help="development CA, certificates and robot tokens; token revocation",
                       description="Credentials for TLS, mutual TLS, robot tokens and the key that signs policy "
                       "versions (see docs/deploy.md).")
    certs_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = certs_sub.add_parser("init", help="new CA, gateway certificate, token key and robot credentials in DIR")
    c.add_argument("dir", help="output directory (must not hold a CA yet)")
    c.add_argument("--hosts", default="localhost,127.0.0.1", help="gateway DNS names/IPs, comma-separated")
    c.add_argument("--robots", default="", help="robot ids to issue credentials for, comma-separated")
    c.add_argument("--token_ttl_s", type=float, default=TOKEN_TTL_S, help=TOKEN_TTL_HELP)
    c = certs_sub.add_parser("robot", help="issue a certificate and a token for one more robot from DIR's CA")
    c.add_argument("dir", help="directory made by `fleet certs init`")
    c.add_argument("--robot_id", required=True, help="the robot's id (its certificate's common name)")
    c.add_argument("--token_ttl_s", type=float, default=TOKEN_TTL_S, help=TOKEN_TTL_HELP)
    c = certs_sub.add_parser("token", help="a fresh token for a robot of DIR (refresh before it expires; the edge "
                             "re-reads its token file when it changes)")
    c.add_argument("dir", help="directory made by `fleet certs init`")
    c.add_argument("--robot_id", required=True, help="the robot's id")
    c.add_argument("--token_ttl_s", type=float, default=TOKEN_TTL_S, help=TOKEN_TTL_HELP)
    c = certs_sub.add_parser("deny", help="refuse a robot certificate on every gateway (mutual TLS denylist, in Redis)")
    c.add_argument("--cert_file", required=True, help="the robot's certificate (PEM)")
    c.add_argument("--redis_url", default="redis://127.0.0.1:6379/0", help="Redis (or redis+cluster://)")
    c = certs_sub.add_parser("revoke", help="revoke a robot token id on every gateway (a Redis set)")
    c.add_argument("--token_id", required=True, help="the token id printed when the token was issued")
    c.add_argument("--redis_url", default="redis://127.0.0.1:6379/0", help="Redis (or redis+cluster://)")
    c = certs_sub.add_parser("publisher-key", help="the Ed25519 key that signs policy versions: DIR/publisher.key "
                             "(0600, for `fleet trainer --publish_key_file`) and DIR/publisher.pub (robots pin it)")
    c.add_argument("dir", help="output directory (must not hold a publisher key yet)")
    c = certs_sub.add_parser("rotate-publisher-key",
                             help="a new publisher key in DIR; the old public key moves to "
                             "DIR/publisher-previous.pub so robots can pin both until the old versions are gone")
    c.add_argument("dir", help="directory made by `fleet certs publisher-key`")
    p.set_defaults(func=_cmd_certs)

    p = sub.add_parser("robots", help="operator actions on registered robots",
                       description="Operator actions on registered robots (read and written in Redis).")
    robots_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = robots_sub.add_parser("allow-schema-change",
                              help="let ROBOT_ID's next Register change its observation/action schema")
    c.add_argument("robot_id", help="the robot's id")
    c.add_argument("--ttl_s", type=int, default=3600, help="the allowance expires unused after this (default 3600)")
    c.add_argument("--redis_url", default="redis://127.0.0.1:6379/0", help="Redis (or redis+cluster://)")
    p.set_defaults(func=_cmd_robots)
    parser.set_defaults(subparsers=sub.choices)
    return parser


def _reject_unknown(parser: argparse.ArgumentParser, args, unknown: list[str]) -> None:
    """Exit 2 like argparse on unrecognized arguments, naming the closest option for each misspelt one."""
    from fleet.config import flag_spelling, suggest

    sub = getattr(args, "subparsers", {}).get(getattr(args, "command", None), parser)
    for action in sub._actions:  # a nested subcommand (`fleet certs init`) knows its own options
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            sub = action.choices[getattr(args, action.dest)]
    options = sorted({o for a in sub._actions for o in a.option_strings if o.startswith("--")})
    parts = [arg + (suggest(flag_spelling(arg), options) if arg.startswith("--") else "") for arg in unknown]
    sub.error(f"unrecognized arguments: {' '.join(parts)}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    while argv and argv[0] in ("-v", "--verbose"):
        verbose = True
        argv.pop(0)
    if argv and argv[0] in CONFIG_COMMANDS:
        return run_config_command(argv[0], argv[1:], verbose)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _reject_unknown(parser, args, unknown)
    _setup_logging(verbose or args.verbose)
    try:
        return args.func(args)
    except ConfigError as exc:
        parser.exit(2, f"fleet {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
