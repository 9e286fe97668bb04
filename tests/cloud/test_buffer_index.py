"""The buffer index's per-episode arrays grow with the number of episodes it has seen."""

from __future__ import annotations

import numpy as np

from cloud.buffer import SOURCE_ONLINE
from cloud.buffer_index import BufferIndex


def test_episode_ends_past_the_initial_capacity_are_recorded():
    # An episode's end can be the first the index hears of it (an evaluation episode has no labelled
    # steps): its number is assigned while its length is stored, and that must grow the array first.
    index = BufferIndex()
    ends = 3 * len(index._finished_len) + 1
    for i in range(ends):
        index._add_episode("robot-0", SOURCE_ONLINE, f"ep-{i}", "reach the goal", 10 + i, success=True,
                           evaluation=True, intervention_steps=0)
    numbers = np.array([index.number("robot-0", f"ep-{i}") for i in range(ends)])
    assert index.finished_lengths(numbers).tolist() == [10 + i for i in range(ends)]
