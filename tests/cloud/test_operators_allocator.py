"""The allocator alone (pure Python, no Redis): each policy's order, hold time, manual pinning, errors."""

from __future__ import annotations

import pytest

from cloud.operators.allocator import Allocator, Assignment, Need
from fleet.errors import ConfigError


def need(robot: str, score: float = 0.0, *, wanted: bool = True, holding: bool = False, risk: float = 0.0,
         uncertainty: float = 0.0, waited: float = 0.0) -> Need:
    return Need(robot_id=robot, score=score, uncertainty=uncertainty, stall=0.0, risk=risk, wanted=wanted,
                holding=holding, wanted_for_s=waited)


def needs(*items: Need) -> dict[str, Need]:
    return {n.robot_id: n for n in items}


def operators_of(assignments: dict[str, Assignment]) -> dict[str, str]:
    return {r: a.operator for r, a in assignments.items()}


def test_priority_serves_holding_then_risk_then_score_then_longest_wait():
    alloc = Allocator(["a", "b", "c", "d"], "priority", min_hold_s=0)
    reported = needs(need("r1", 0.9), need("r2", 0.2, holding=True), need("r3", 0.1, risk=0.5),
                     need("r4", 0.5, waited=1.0), need("r5", 0.5, waited=9.0), need("r6", 0.99, wanted=False))
    got = alloc.step(reported, now=0.0)
    # 4 operators, 5 robots want help: r2 (holding) first, r3 (risk), r1 (score), then r5 (waited longer than r4).
    assert operators_of(got) == {"r2": "a", "r3": "b", "r1": "c", "r5": "d"}
    assert all(not a.manual and a.since_s == 0.0 for a in got.values())
    assert alloc.queue() == ["r4"]
    assert alloc.rank(reported, 0.0) == ["r2", "r3", "r1", "r5", "r4", "r6"]  # wanting robots first


def test_an_operator_holds_one_robot_and_a_robot_one_operator():
    alloc = Allocator(["a"], "priority", min_hold_s=0)
    got = alloc.step(needs(need("r1", 0.9), need("r2", 0.8)), now=0.0)
    assert operators_of(got) == {"r1": "a"}
    assert alloc.queue() == ["r2"]
    assert alloc.robot_of("a") == "r1"


def test_min_hold_keeps_the_operator_then_releases_when_no_longer_wanted():
    alloc = Allocator(["a"], "priority", min_hold_s=5.0)
    assert operators_of(alloc.step(needs(need("r1", 0.6)), now=0.0)) == {"r1": "a"}
    # r1 stops wanting help and r2 needs more: within the hold time the operator stays on r1.
    assert operators_of(alloc.step(needs(need("r1", 0.0, wanted=False), need("r2", 0.9)), now=4.9)) == {"r1": "a"}
    assert operators_of(alloc.step(needs(need("r1", 0.0, wanted=False), need("r2", 0.9)), now=5.0)) == {"r2": "a"}
    # Nothing wanted any more: released once r2's hold has passed.
    assert operators_of(alloc.step(needs(need("r2", 0.0, wanted=False)), now=9.0)) == {"r2": "a"}
    assert alloc.step(needs(need("r2", 0.0, wanted=False)), now=10.0) == {}


def test_priority_moves_an_operator_after_the_hold_to_a_robot_in_more_need():
    alloc = Allocator(["a"], "priority", min_hold_s=2.0)
    alloc.step(needs(need("r1", 0.5)), now=0.0)
    assert operators_of(alloc.step(needs(need("r1", 0.5), need("r2", 0.3, holding=True)), now=1.0)) == {"r1": "a"}
    got = alloc.step(needs(need("r1", 0.5), need("r2", 0.3, holding=True)), now=2.0)
    assert operators_of(got) == {"r2": "a"} and got["r2"].since_s == 2.0
    # r2 keeps its operator while it outranks r1, past its own hold time too.
    assert operators_of(alloc.step(needs(need("r1", 0.5), need("r2", 0.9)), now=10.0)) == {"r2": "a"}


def test_a_robot_that_stops_reporting_loses_its_operator_at_once():
    alloc = Allocator(["a"], "priority", min_hold_s=60.0)
    alloc.step(needs(need("r1", 0.5)), now=0.0)
    assert operators_of(alloc.step(needs(need("r2", 0.4)), now=1.0)) == {"r2": "a"}


def test_round_robin_rotates_through_the_robots_that_want_help():
    alloc = Allocator(["a"], "round_robin", min_hold_s=1.0)
    wanting = needs(need("r1", 0.1), need("r2", 0.9), need("r3", 0.5))
    served = [next(iter(alloc.step(wanting, now=float(t)))) for t in range(6)]
    # Score does not matter: each robot in turn, one hold time each, then around again.
    assert served == ["r1", "r2", "r3", "r1", "r2", "r3"]


def test_round_robin_serves_the_robot_never_served_first():
    alloc = Allocator(["a", "b"], "round_robin", min_hold_s=0.0)
    alloc.step(needs(need("r1"), need("r2")), now=0.0)
    got = alloc.step(needs(need("r1"), need("r2"), need("r3")), now=1.0)
    assert "r3" in got and len(got) == 2


def test_random_is_seeded_and_ignores_the_score():
    def run(seed: int) -> list[str]:
        alloc = Allocator(["a"], "random", min_hold_s=0.0, seed=seed)
        wanting = needs(*(need(f"r{i}", 0.1 * i) for i in range(8)))
        return [next(iter(alloc.step(wanting, now=float(t)))) for t in range(20)]

    assert run(3) == run(3)
    assert run(3) != run(4)
    assert len(set(run(3))) >= 4  # not always the highest score


def test_take_over_pins_the_operator_until_hand_back():
    alloc = Allocator(["a", "b"], "priority", min_hold_s=0.0)
    alloc.step(needs(need("r1", 0.9), need("r2", 0.1, wanted=False)), now=0.0)
    assert operators_of(alloc.assignments) == {"r1": "a"}
    alloc.take_over("a", "r2", now=1.0)  # a leaves r1 for r2; b gets r1 at the next step
    got = alloc.step(needs(need("r1", 0.9), need("r2", 0.0, wanted=False), need("r3", 1.0, holding=True)), now=2.0)
    assert got["r2"] == Assignment("a", 1.0, True)
    assert got["r3"].operator == "b" and "r1" not in got  # the pinned operator is never preempted
    for t in range(3, 30):
        assert alloc.step(needs(need("r2", 0.0, wanted=False), need("r4", 1.0, holding=True)), now=float(t))["r2"] \
            == Assignment("a", 1.0, True)
    with pytest.raises(ConfigError, match="taken over by operator 'a'"):
        alloc.take_over("b", "r2", now=30.0)
    alloc.hand_back("a", "r2", now=31.0)
    assert "r2" not in alloc.assignments
    assert operators_of(alloc.step(needs(need("r2", 0.0, wanted=False), need("r4", 1.0, holding=True)), now=32.0)) \
        == {"r4": "b"}


def test_take_over_of_an_automatically_served_robot_frees_its_operator():
    alloc = Allocator(["a", "b"], "priority", min_hold_s=100.0)
    alloc.step(needs(need("r1", 0.9)), now=0.0)
    alloc.take_over("b", "r1", now=1.0)
    assert alloc.assignments == {"r1": Assignment("b", 1.0, True)}
    assert operators_of(alloc.step(needs(need("r1", 0.9), need("r2", 0.5)), now=2.0)) == {"r1": "b", "r2": "a"}


def test_unknown_ids_and_bad_settings_are_config_errors():
    alloc = Allocator(["a"], "priority")
    alloc.step(needs(need("r1")), now=0.0)
    with pytest.raises(ConfigError, match="unknown operator 'z'"):
        alloc.take_over("z", "r1", now=1.0)
    with pytest.raises(ConfigError, match="unknown robot 'nope'"):
        alloc.take_over("a", "nope", now=1.0)
    with pytest.raises(ConfigError, match="does not hold robot 'r1'"):
        _hand_back_unheld()
    for kwargs, message in (({"operators": []}, "at least one"), ({"operators": ["a", "a"]}, "unique"),
                            ({"operators": ["a"], "policy": "fifo"}, "fifo"),
                            ({"operators": ["a"], "min_hold_s": -1.0}, "min_hold_s")):
        with pytest.raises(ConfigError, match=message):
            Allocator(**kwargs)


def _hand_back_unheld():
    alloc = Allocator(["a", "b"], min_hold_s=0.0)
    alloc.step(needs(need("r1")), now=0.0)
    alloc.hand_back("b", "r1", now=1.0)
