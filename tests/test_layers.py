"""The imports follow the data flow: what each part may import, no cycles, and what a process loads.

- ``fleet/`` is the shared core: it imports neither ``edge`` nor ``cloud`` (``fleet/cli.py``, the
  command line's composition root, is the one exception).
- ``cloud/`` never imports ``edge``.
- ``edge/`` outside ``edge/sim/`` never imports ``cloud``, nor ``edge.sim`` at module level (the
  simulated backend is imported only when a simulated robot is built).
- ``edge/sim/`` (MetaWorld robot, scripted operator, demos, sim-fleet, the demo) may import anything.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fleet", "edge", "cloud")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(module: str, path: Path, top_level_only: bool) -> set[str]:
    """Project modules ``module`` imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES and n != module)
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_only_what_its_layer_may(module):
    imports = _imports(module, MODULES[module], top_level_only=False)
    top = _imports(module, MODULES[module], top_level_only=True)
    if module.startswith("fleet.v1"):
        return
    if module.startswith("fleet") and module != "fleet.cli":
        assert not {i for i in imports if i.split(".")[0] in ("edge", "cloud")}, f"{module}: shared core"
    if module.startswith("cloud"):
        assert not {i for i in imports if i.startswith("edge")}, f"{module}: cloud imports edge"
    if module.startswith("edge") and not module.startswith("edge.sim"):
        assert not {i for i in imports if i.startswith("cloud")}, f"{module}: edge imports cloud"
        assert not {i for i in top if i.startswith("edge.sim")}, f"{module}: the real robot's path imports edge.sim"


def test_no_import_cycles():
    graph = {m: {i for i in _imports(m, p, top_level_only=True) if i in MODULES} for m, p in MODULES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def _loaded_after(code: str) -> set[str]:
    """Top-level module names loaded by ``code`` in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return {m.split(".")[0] for m in out.stdout.split()} | set(out.stdout.split())


def test_the_gateway_imports_no_torch():
    loaded = _loaded_after("from fleet.cli import parse_config\n"
                           "cfg = parse_config('gateway', ['--redis_url', 'redis://127.0.0.1:1/0'])\n"
                           "import cloud.gateway.server")
    assert not loaded & {"torch", "lerobot", "edge", "mujoco", "metaworld"}, sorted(loaded & {"torch", "lerobot"})


def test_a_simulated_robots_edge_parses_its_config_without_lerobots_device_packages_or_torch():
    """A bad edge config exits 2 before torch, LeRobot or the simulator is imported (seconds on a robot's CPU)."""
    loaded = _loaded_after("from fleet.cli import parse_config\n"
                           "cfg = parse_config('edge', ['--robot_id', 'r1', '--backend.seed', '3'])\n"
                           "assert cfg.backend.type == 'metaworld', cfg.backend")
    heavy = {"edge.robots.lerobot_config", "lerobot", "torch", "mujoco", "metaworld", "edge.agent"}
    assert not loaded & heavy, sorted(loaded & heavy)


@pytest.mark.parametrize("backend", ["lerobot", "ros2"])
def test_a_real_robots_edge_loads_no_simulator(backend):
    robot_module = {"lerobot": "edge.robots.lerobot", "ros2": "edge.robots.ros2.robot"}[backend]
    extra = {"lerobot": ["--backend.robot.type", "so101_follower", "--backend.robot.port", "/dev/ttyACM0",
                         "--backend.teleop.type", "so101_leader", "--backend.teleop.port", "/dev/ttyACM1"],
             "ros2": ["--backend.joint_names", "[j1, j2]"]}
    if backend == "ros2":
        pytest.importorskip("rclpy")
    loaded = _loaded_after(f"import edge.agent, edge.loop, {robot_module}\n"
                           f"from fleet.cli import parse_config\n"
                           f"parse_config('edge', ['--backend.type', '{backend}', *{extra[backend]!r}])")
    assert not loaded & {"mujoco", "metaworld", "edge.sim", "cloud"}, sorted(loaded & {"mujoco", "metaworld"})
