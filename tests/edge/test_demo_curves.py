"""The demo's learning curve: rates per time bin with 95% intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge.sim.demo import curves, ratio_interval, wilson


def test_wilson_interval_matches_the_textbook_values():
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)  # never a zero-width interval at 0/n
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_ratio_interval_brackets_the_pooled_ratio_and_narrows_with_more_episodes():
    rng = np.random.default_rng(1)
    steps = rng.integers(50, 120, 40).astype(float)
    inter = np.floor(steps * rng.uniform(0, 0.6, 40))
    low, high = ratio_interval(inter, steps)
    assert low < inter.sum() / steps.sum() < high
    low4, high4 = ratio_interval(np.tile(inter, 4), np.tile(steps, 4))
    assert high4 - low4 < high - low
    assert all(math.isnan(x) for x in ratio_interval(np.array([]), np.array([])))


def test_curves_bin_evaluation_success_and_operator_effort_separately():
    def ep(ts, evaluation, success, steps=100, inter=0):
        return {"ts": ts, "evaluation": evaluation, "success": success, "num_steps": steps,
                "intervention_steps": inter}

    episodes = [ep(1, True, False), ep(2, True, False), ep(3, False, True, inter=60), ep(4, False, True, inter=40),
                ep(11, True, True), ep(12, True, True), ep(13, False, True, inter=10)]
    c = curves(episodes, 0.0, 20.0, bins=2)
    assert c["success_rate"] == [0.0, 1.0] and c["eval_episodes"] == [2, 2] and c["episodes"] == [4, 3]
    assert c["intervention_rate"] == [0.5, 0.1]
    assert c["success_ci"][0][0] == 0.0 and 0.0 < c["success_ci"][0][1] < 1.0
    assert c["intervention_ci"][0][0] <= 0.5 <= c["intervention_ci"][0][1]
