"""The config layer (fleet/config.py on draccus): flags, config files, choice registries, errors that
name the key, help from field docstrings, one default in one place."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from edge.sim.demo import DemoConfig
from cloud.operators.config import OperatorsConfig
from cloud.trainer_config import TrainerConfig
from edge.agent import EdgeConfig
from edge.sim.fleet import SimFleetConfig
from fleet.config import _is_choice, _is_config, field_docs, parse
from fleet.gateway_config import GatewayConfig

PROCESS_CONFIGS = (GatewayConfig, TrainerConfig, EdgeConfig, SimFleetConfig, DemoConfig, OperatorsConfig)


def _exit_code(cls, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        parse(cls, argv, prog="fleet x")
    return exc.value.code, capsys.readouterr().err


def _configs(cls, seen=None):
    """``cls`` and every config class reachable from its fields (all choices of a registry)."""
    seen = set() if seen is None else seen
    if cls in seen:
        return seen
    seen.add(cls)
    for tp in typing.get_type_hints(cls).values():
        for sub in (tp.get_known_choices().values() if _is_choice(tp) else [tp]):
            if _is_config(sub) and sub.__module__.split(".")[0] in ("fleet", "edge", "cloud"):
                _configs(sub, seen)
    return seen


def test_a_comma_inside_a_task_survives_and_a_list_is_several_tasks():
    cfg = parse(EdgeConfig, ["--tasks", "reach the goal, carefully"], prog="fleet edge")
    assert cfg.tasks == ("reach the goal, carefully",)
    cfg = parse(EdgeConfig, ["--tasks", json.dumps(["a, b", "c"])], prog="fleet edge")
    assert cfg.tasks == ("a, b", "c")
    assert parse(GatewayConfig, ["--embodiment", "true"], prog="fleet gateway").embodiment == "true"


def test_config_file_with_dotted_overrides(tmp_path):
    path = tmp_path / "robot.yaml"
    path.write_text("robot_id: r7\nloop:\n  control_hz: 10\n  max_episode_steps: 50\nstreamer:\n  window_chunks: 3\n")
    cfg = parse(EdgeConfig, ["--config_path", str(path), "--loop.control_hz=30", "--streamer.ack_timeout_s=5"],
                prog="fleet edge")
    assert (cfg.robot_id, cfg.loop.control_hz, cfg.loop.max_episode_steps) == ("r7", 30.0, 50)
    assert (cfg.streamer.window_chunks, cfg.streamer.ack_timeout_s) == (3, 5.0)
    as_json = tmp_path / "robot.json"
    as_json.write_text(json.dumps({"robot_id": "r8", "spool": {"synchronous": "FULL"}}))
    cfg = parse(EdgeConfig, ["--config_path", str(as_json)], prog="fleet edge")
    assert (cfg.robot_id, cfg.spool.synchronous) == ("r8", "FULL")


def test_algorithm_registry_takes_only_that_algorithms_fields(capsys):
    cfg = parse(TrainerConfig, ["--algorithm.type=recap", "--algorithm.n_step=3"], prog="fleet trainer")
    assert cfg.algorithm.type == "recap" and cfg.algorithm.n_step == 3
    assert parse(TrainerConfig, [], prog="fleet trainer").algorithm.type == "hg_dagger"
    code, err = _exit_code(TrainerConfig, ["--algorithm.n_step=3"], capsys)
    assert code == 2 and 'unknown key "algorithm.n_step"' in err and "intervention_weight" in err
    code, err = _exit_code(TrainerConfig, ["--algorithm.type=dagger"], capsys)
    assert code == 2 and "--algorithm.type" in err and "hg_dagger" in err and "recap" in err


@pytest.mark.parametrize("argv, words", [
    (["--batch_size=abc"], ["batch_size", "abc"]),
    (["--batch_size=0"], ["batch_size (0) must be > 0"]),
    (["--sampler.zzz=1"], ["unrecognized arguments: --sampler.zzz=1"]),
    (["--batch-size=3"], ["--batch-size", "did you mean --batch_size?"]),
])
def test_bad_keys_types_and_values_exit_2_naming_the_key(argv, words, capsys):
    code, err = _exit_code(TrainerConfig, argv, capsys)
    assert code == 2, err
    for word in words:
        assert word in err, err


def test_unknown_key_in_a_config_file_names_file_key_and_choices(tmp_path, capsys):
    path = tmp_path / "trainer.yaml"
    path.write_text("algorithm:\n  type: recap\n  n_stepz: 3\n")
    code, err = _exit_code(TrainerConfig, ["--config_path", str(path)], capsys)
    assert code == 2 and str(path) in err and '"algorithm.n_stepz"' in err and '"algorithm.n_step"' in err
    path.write_text("algorithm:\n  type: ppo\n")
    code, err = _exit_code(TrainerConfig, ["--config_path", str(path)], capsys)
    assert code == 2 and "ppo" in err and "hg_dagger, recap" in err


def test_every_process_config_field_has_a_one_line_docstring():
    for root in PROCESS_CONFIGS:
        for cls in _configs(root):
            docs = field_docs(cls)
            missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in docs]
            assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"


def test_nested_defaults_are_the_nested_classes_own():
    """One default in one place: a parent never re-sets a child's field (the demo's robots excepted)."""
    for root in (GatewayConfig, TrainerConfig, EdgeConfig, SimFleetConfig):
        for cls in _configs(root):
            if _is_choice(cls):
                continue
            default = cls() if cls is root or dataclasses.is_dataclass(cls) else None
            for f in dataclasses.fields(cls):
                value = getattr(default, f.name)
                if dataclasses.is_dataclass(value):
                    assert value == type(value)(), f"{cls.__name__}.{f.name} re-sets defaults of {type(value).__name__}"


def test_help_shows_one_spelling_per_flag_with_its_docstring(cli_help):
    code, text = cli_help["edge"]
    assert code == 0
    assert "--streamer.window_chunks" in text and "--streamer.window-chunks" not in text
    assert "--redis" not in text and "--state-dir" not in text and "--state_dir" in text
    assert "Chunks sent and not yet acked at once" in text


def test_the_demo_hands_its_children_configs_that_read_back_equal(tmp_path):
    """The demo writes the trainer's and each robot's config as a file (``--config_path``): same configs,
    no re-declared flags, and nothing lost on the way (LeRobot's enums included)."""
    from edge.sim.demo import _write_config

    demo = parse(DemoConfig, ["--trainer.algorithm.type=recap", "--fleet.robots=2"], prog="fleet demo")
    trainer = parse(TrainerConfig, ["--config_path", _write_config(demo.trainer, tmp_path / "t.json")], prog="t")
    assert trainer == demo.trainer and trainer.policy.dim_model == 128
    for robot in demo.fleet.robot_configs():
        path = _write_config(robot, tmp_path / f"{robot.robot_id}.json")
        assert parse(EdgeConfig, ["--config_path", path], prog="fleet edge") == robot
