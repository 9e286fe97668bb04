"""The one rule for every string a robot sends (docs/protocol.md, "Names").

Identifiers (robot id, episode id, embodiment, feature and camera names): ASCII letters,
digits and ``. _ : -``, starting with a letter or digit; at most ``MAX_ID_CHARS`` characters
(an episode id ``MAX_EPISODE_ID_CHARS``: the edge names episodes ``<robot id>-<12 hex>``).
Robot id, episode id and feature names must not be empty; an embodiment may be.

Tasks (natural-language instructions): 1 to ``MAX_TASK_BYTES`` bytes of UTF-8 with no
control, format, separator-line or unassigned code points (no newline, tab, NUL, bidi
override), no leading or trailing space.

Nothing the gateway stores is parsed back by splitting on a character these rules allow.
"""

from __future__ import annotations

import re
import unicodedata

from fleet.errors import InvalidInput

MAX_ID_CHARS = 128
MAX_EPISODE_ID_CHARS = 200
MAX_TASK_BYTES = 256

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*\Z")
_BAD_TASK_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def shown(value: str, limit: int = 64) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters (a hostile value can be huge)."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"


def is_id(value: str, max_chars: int = MAX_ID_CHARS) -> bool:
    """Whether ``value`` is a non-empty identifier (the gateway's fast path)."""
    return 0 < len(value) <= max_chars and _ID.match(value) is not None


def to_id(text: str, max_chars: int = MAX_ID_CHARS) -> str:
    """``text`` made into an identifier (other characters become ``_``), for names the system derives."""
    out = re.sub(r"[^A-Za-z0-9._:-]", "_", text).lstrip("._:-")[:max_chars]
    return out or "x"


def check_id(value: str, field: str, max_chars: int = MAX_ID_CHARS, allow_empty: bool = False) -> str:
    """``value`` if it is a valid identifier, else InvalidInput naming ``field``."""
    if not value and allow_empty:
        return value
    if not value:
        raise InvalidInput(f"{field} is empty")
    if len(value) > max_chars:
        raise InvalidInput(f"{field} has {len(value)} characters; at most {max_chars}")
    if not _ID.match(value):
        raise InvalidInput(f"{field} {shown(value)} must be ASCII letters, digits and '._:-', starting with a "
                           "letter or digit")
    return value


def check_episode_id(value: str, field: str = "episode_id") -> str:
    return check_id(value, field, MAX_EPISODE_ID_CHARS)


def check_task(value: str, field: str = "task", allow_empty: bool = False) -> str:
    """``value`` if it is a valid task instruction (or other free text: a software version, a state),
    else InvalidInput naming ``field``."""
    if not value and allow_empty:
        return value
    if not value:
        raise InvalidInput(f"{field} is empty")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_TASK_BYTES:
        raise InvalidInput(f"{field} has {size} bytes of UTF-8; at most {MAX_TASK_BYTES}")
    for ch in value:
        if unicodedata.category(ch) in _BAD_TASK_CATEGORIES:
            raise InvalidInput(f"{field} {shown(value)} contains the control or format character U+{ord(ch):04X}")
    if value != value.strip():
        raise InvalidInput(f"{field} {shown(value)} has leading or trailing white space")
    return value
