"""Directories that appear complete or not at all.

Write into a temp directory next to the destination (:func:`fresh_dir`), then :func:`commit_dir`:
every file and the directory are fsynced, the directory is renamed into place (atomic on POSIX) and
the parent directory is fsynced so that the rename itself survives a power loss. Used by the policy
store, the trainer's checkpoints and the edge's last good policy.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fresh_dir(tmp: str | os.PathLike) -> Path:
    """An empty directory at ``tmp`` (a leftover of a crashed writer is removed first)."""
    tmp = Path(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: str | os.PathLike, final: str | os.PathLike, previous: str | os.PathLike | None = None) -> None:
    """fsync every file in ``tmp`` and ``tmp`` itself, rename it to ``final`` and fsync the parent.

    ``previous``: an existing ``final`` is kept there (an older one there is removed) instead of
    replacing it; without it ``final`` must not exist."""
    tmp, final = Path(tmp), Path(final)
    for f in tmp.iterdir():
        fsync_path(f)
    fsync_path(tmp)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
        if final.exists():
            os.rename(final, previous)
    os.rename(tmp, final)
    fsync_path(final.parent)
