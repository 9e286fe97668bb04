"""The index's pools: runs of usable steps (:class:`Segment`) per (task, source) (:class:`Pool`), and all
of them as one set of flat arrays (:class:`PoolSet`), so a batch's picks are drawn with a few vectorised
calls (no Python per pick): a uniform robot of the pick's pool, then uniform over that robot's steps (one
searchsorted over every pool's segments, pool after pool, robot after robot)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Segment:
    """A run of consecutive usable steps of one episode."""

    robot_id: str
    episode_id: str
    start: int
    length: int
    labels_all: bool
    """Every step is a target (False: targets end where the operator handed back)."""
    episode_len: int = 0
    """Steps of the finished episode (0: not finished yet)."""
    success: bool = False
    number: int = -1
    """The episode's number in its index (``BufferIndex.episode_keys``; the sampler's key into its cache)."""


class Pool:
    """Segments of one (task, source), sampled robot first: every robot with steps here is equally likely,
    then uniformly over that robot's steps (one robot cannot take over a task by sending more)."""

    def __init__(self) -> None:
        self.by_robot: dict[str, list[Segment]] = {}
        self._cum: dict[str, np.ndarray] = {}
        self.version = 0
        """Bumped on every change (``PoolSet`` rebuilds its arrays)."""
        self._flat: tuple | None = None
        """(segments robot after robot, their cumulative lengths, each robot's first cumulative step and steps,
        the segments' columns)"""

    @property
    def segments(self) -> list[Segment]:
        return [seg for segs in self.by_robot.values() for seg in segs]

    def add(self, seg: Segment) -> None:
        segs = self.by_robot.setdefault(seg.robot_id, [])
        last = segs[-1] if segs else None
        if (last is not None and not seg.labels_all and last.episode_id == seg.episode_id
                and last.start + last.length == seg.start):
            last.length += seg.length  # an intervention run continued in a later chunk
        else:
            segs.append(seg)
        self._cum.pop(seg.robot_id, None)
        self._flat = None
        self.version += 1

    def drop_episode(self, rid: str, eid: str) -> int:
        """Remove one episode's segments; returns the steps removed."""
        segs = self.by_robot.get(rid, [])
        keep = [seg for seg in segs if seg.episode_id != eid]
        dropped = sum(seg.length for seg in segs) - sum(seg.length for seg in keep)
        if keep:
            self.by_robot[rid] = keep
        else:
            self.by_robot.pop(rid, None)
        self._cum.pop(rid, None)
        self._flat = None
        self.version += 1
        return dropped

    def __len__(self) -> int:
        cum = self._flatten()[1]
        return int(cum[-1]) if len(cum) else 0

    def cum(self, rid: str) -> np.ndarray:
        cum = self._cum.get(rid)
        if cum is None:
            cum = self._cum[rid] = np.cumsum([s.length for s in self.by_robot[rid]])
        return cum

    def _flatten(self) -> tuple:
        if self._flat is None:
            segs = [seg for segs in self.by_robot.values() for seg in segs]
            cum = np.cumsum([seg.length for seg in segs], dtype=np.int64)
            totals = np.array([int(self.cum(rid)[-1]) for rid in self.by_robot], np.int64)
            firsts = np.concatenate([[0], np.cumsum(totals)[:-1]]).astype(np.int64)
            columns = SegmentColumns(
                number=np.array([seg.number for seg in segs], np.int64),
                start=np.array([seg.start for seg in segs], np.int64) - np.concatenate([[0], cum[:-1]]),
                labels_all=np.array([seg.labels_all for seg in segs], bool),
                episode_len=np.array([seg.episode_len for seg in segs], np.int64),
                success=np.array([seg.success for seg in segs], bool))
            self._flat = (segs, cum, firsts, totals, columns)
        return self._flat

    def flat(self) -> tuple:
        """(segments robot after robot, their cumulative lengths, each robot's first cumulative step and steps,
        the segments' ``SegmentColumns``)."""
        return self._flatten()

    def sample(self, rng: np.random.Generator, n: int) -> list[tuple[Segment, int]]:
        """``n`` (segment, step index) pairs: a uniform robot, then uniform over its steps (``PoolSet.draw``
        over this pool alone)."""
        segs = self._flatten()[0]
        seg_index, t = PoolSet({"": self}).draw(rng, np.zeros(n, np.int64))
        return [(segs[i], k) for i, k in zip(seg_index.tolist(), t.tolist())]


@dataclass(frozen=True)
class SegmentColumns:
    """A pool's segments field by field (``start`` less the pool's steps before the segment)."""

    number: np.ndarray
    start: np.ndarray
    labels_all: np.ndarray
    episode_len: np.ndarray
    success: np.ndarray


class PoolSet:
    """``group[(task, source)]`` numbers the pools with steps; ``draw`` takes one group per pick."""

    def __init__(self, pools: dict, signature: tuple = ()):
        self.signature = signature
        """The pools' (key, version) it was built from."""
        self.group: dict = {}
        robot_first, robots, firsts, totals, cums, columns = [], [], [], [], [], []
        steps = n_robots = 0
        for key, pool in pools.items():
            if not len(pool):
                continue
            _, cum, pool_firsts, pool_totals, cols = pool.flat()
            self.group[key] = len(robots)
            robot_first.append(n_robots)
            robots.append(len(pool_totals))
            firsts.append(pool_firsts + steps)
            totals.append(pool_totals)
            cums.append(cum + steps)
            columns.append((cols.number, cols.start - steps, cols.labels_all, cols.episode_len, cols.success))
            steps += int(cum[-1])
            n_robots += len(pool_totals)
        self.robot_first = np.array(robot_first, np.int64)
        """Each group's first robot."""
        self.robots = np.array(robots, np.int64)
        """Robots with steps in each group."""
        self.firsts = _cat(firsts, np.int64)
        """Each robot's first step (steps numbered over every group)."""
        self.totals = _cat(totals, np.int64)
        self.cum = _cat(cums, np.int64)
        """Cumulative steps of the segments, group after group."""
        self.number, self.start, self.labels_all, self.episode_len, self.success = (
            _cat(parts, dtype) for parts, dtype in zip(zip(*columns) if columns else [[]] * 5,
                                                         (np.int64, np.int64, bool, np.int64, bool)))
        """Per segment: episode number, start less the steps before it, its fields (``SegmentColumns``)."""

    def draw(self, rng: np.random.Generator, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One pick per entry of ``groups``: (segment index into this set's arrays, step index)."""
        r = self.robot_first[groups] + rng.integers(self.robots[groups])
        step = self.firsts[r] + rng.integers(self.totals[r])
        seg = np.searchsorted(self.cum, step, side="right")
        return seg, self.start[seg] + step


def _cat(parts: list, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if len(parts) else np.zeros(0, dtype)
