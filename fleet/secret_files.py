"""Reading private keys and tokens: refused when other users can read them.

The rule is PostgreSQL's for its server key: a file owned by this process's user must grant
nothing to group or others (0600 or stricter); a file owned by root may also be group-readable
(0640 or stricter), which is how Kubernetes mounts a secret with ``defaultMode: 0400`` and an
``fsGroup`` (root-owned, 0440) and how systemd may hand over credentials. Anything looser is a
:class:`ConfigError` (the CLI exits 2) naming the file and the fix.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fleet.errors import ConfigError


def check_private(path: str | os.PathLike, what: str) -> None:
    """Raise ConfigError if ``path`` (symlinks followed) is missing or readable beyond its owner."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {exc.strerror}") from None
    allowed_extra = 0o040 if st.st_uid == 0 and os.getuid() != 0 else 0
    loose = stat.S_IMODE(st.st_mode) & 0o077 & ~allowed_extra
    if loose:
        raise ConfigError(f"{what} {str(path)!r} is readable or writable by group or others "
                          f"(mode {stat.S_IMODE(st.st_mode):04o}): run `chmod 600 {path}`")


def read_private(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of a private key or token file, after :func:`check_private`."""
    check_private(path, what)
    return Path(path).read_bytes()


def tighten(fd: int) -> None:
    """Make an open file owner-only (0600): ``os.open(..., 0o600)`` leaves an existing file's mode as it was."""
    os.fchmod(fd, 0o600)
