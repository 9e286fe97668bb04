"""How long `fleet gateway` takes from process start to serving (the "listening on port" line), against
same-run baselines: a bare interpreter, and an interpreter that imports torch (what the gateway paid
when it imported torch for dtype sizes). Target: under 1 s on an idle core.

Besides wall-clock time, each start reports the CPU seconds the process used until then (user + system,
from /proc): on a loaded machine the wall clock includes waiting for a core, the CPU time is what an
idle core would spend (plus a little disk I/O from a warm page cache).

    python bench/gateway_startup.py [--runs 7] [--json bench/results/gateway_startup.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_json  # noqa: E402
from fleet.redis_server import free_port, start_redis  # noqa: E402


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (and its waited-for children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _time_until(argv: list[str], marker: str | None) -> tuple[float, float]:
    """(wall seconds, CPU seconds) from spawning ``argv`` until it prints ``marker`` (None: until it exits)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if marker is None:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return time.monotonic() - t0, usage.ru_utime + usage.ru_stime
        for line in proc.stdout:  # type: ignore[union-attr]
            if marker in line:
                return time.monotonic() - t0, _cpu_s(proc.pid)
        raise RuntimeError(f"{argv[:4]} exited with {proc.wait()} before printing {marker!r}")
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="starts of each kind (median reported)")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis_proc = start_redis(Path(tmp) / "redis")
        try:
            kinds = {
                "python -c pass": lambda: _time_until([sys.executable, "-c", "pass"], None),
                "python -c 'import torch'": lambda: _time_until([sys.executable, "-c", "import torch"], None),
                "fleet gateway (to listening)": lambda: _time_until(
                    [sys.executable, "-m", "fleet.cli", "gateway", "--listen", f"127.0.0.1:{free_port()}",
                     "--redis_url", redis_proc.url, "--policy_dir", str(Path(tmp) / "policies")],
                    "listening on port"),
            }
            results = {}
            for name, run in kinds.items():
                wall, cpu = zip(*[run() for _ in range(args.runs)])
                results[name] = {"median_s": statistics.median(wall), "min_s": min(wall), "max_s": max(wall),
                                 "median_cpu_s": statistics.median(cpu)}
        finally:
            redis_proc.stop()
    print(f"{'start':32s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'median CPU s':>13s}")
    for name, r in results.items():
        print(f"{name:32s} {r['median_s']:9.2f} {r['min_s']:7.2f} {r['max_s']:7.2f} {r['median_cpu_s']:13.2f}")
    write_json(args.json, {"runs": args.runs, "results": results,
                           "target": "fleet gateway serving in < 1 s on an idle core"})


if __name__ == "__main__":
    main()
