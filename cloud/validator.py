"""The one validator of experience: a columnar chunk against its robot's registration, column by
column (dtype and shape were checked by their byte lengths when the chunk was decoded against the
registered schema; here: finite values, flags, names, image headers). No per-step Python for
low-dim data; camera frames are checked one header each (never decoded)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np

from fleet.columns import ColumnChunk
from fleet.errors import InvalidInput
from fleet.names import check_episode_id, shown
from fleet.types import EncodedImage, RobotInfo


def check_columns(cc: ColumnChunk, info: RobotInfo) -> None:
    """Raise InvalidInput (``step_seq`` set when one step is to blame) if ``cc`` does not fit ``info``."""
    if cc.robot_id != info.robot_id:
        raise InvalidInput(f"chunk of robot {shown(cc.robot_id)} checked against robot {info.robot_id!r}'s registration")
    check_episode_id(cc.episode_id, f"robot {cc.robot_id!r} episode_id")
    if cc.task not in info.tasks:
        raise InvalidInput(f"task {shown(cc.task)} is not among the tasks robot {cc.robot_id!r} registered")
    cols = cc.columns
    if cols.first_seq < 1:
        raise InvalidInput("step sequence numbers start at 1")
    where = f"robot {cc.robot_id!r} chunk at seq {cols.first_seq}"
    schema = info.schema
    checks = [(cols.observation[f.name], f"observation {f.name!r}") for f in schema.observation
              if not f.is_image and not f.allow_nonfinite]
    if not schema.action.allow_nonfinite:
        checks.append((cols.action, "action"))
    checks.append((cols.reward, "reward"))
    for values, name in checks:
        # A NaN or Inf anywhere makes the sum NaN or Inf: one pass, no temporaries, for the common case.
        # (A sum that overflows with finite values only costs the exact check, and warns nobody.)
        if values.dtype.kind != "f":
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.add.reduce(values, axis=None)):
                continue
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            _blame(cols.first_seq + int(np.argmax(bad)), f"{where}: {name} contains NaN or Inf")
    help = cols.help
    if help is not None and len(help) and not (help.min() >= 0 and help.max() <= 1):  # NaN fails both
        bad = ~(np.isfinite(help) & (help >= 0) & (help <= 1))
        if bad.any():
            _blame(cols.first_seq + int(np.argmax(bad)), f"{where}: help score is not a number in [0, 1]")
    if cols.done[:-1].any():
        seq = cols.first_seq + int(np.argmax(cols.done[:-1]))
        _blame(seq, f"step seq={seq} is done but is not the chunk's last step")
    if cc.episode_end is not None and not cols.done[-1]:
        raise InvalidInput("chunk has an episode_end but its last step is not done")
    for f in schema.observation:
        if f.is_image:
            encoding = cols.encodings[f.name]
            for i, data in enumerate(cols.frames[f.name]):
                try:
                    check_image(EncodedImage(encoding, f.shape[0], f.shape[1], f.shape[2], data),
                                f"{where} step seq={cols.first_seq + i} image {f.name!r}")
                except InvalidInput as exc:
                    exc.step_seq = cols.first_seq + i
                    raise


def _blame(seq: int, message: str) -> None:
    exc = InvalidInput(message)
    exc.step_seq = seq
    raise exc


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_header(data: bytes, what: str) -> tuple[int, int, int]:
    """(height, width, channels) from a JPEG's start-of-frame segment, walking only the segment headers."""
    if not data.startswith(b"\xff\xd8"):
        raise InvalidInput(f"{what}: the {len(data)} bytes are not a jpeg image")
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            raise InvalidInput(f"{what}: cannot read the jpeg bytes ({len(data)} bytes): bad marker at {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            pos += 2
            continue
        (seglen,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _SOF:
            if pos + 10 > end:
                break
            _, height, width, channels = struct.unpack_from(">BHHB", data, pos + 4)
            return height, width, channels
        if marker == 0xDA or seglen < 2:
            break
        pos += 2 + seglen
    raise InvalidInput(f"{what}: cannot read the jpeg bytes ({len(data)} bytes): no frame header")


def check_image(img: EncodedImage, what: str) -> None:
    """The bytes are one complete PNG/JPEG of the declared format, size and channels.

    Checked from the structure, without decoding pixels (a decode costs ~100x more): the header first,
    before anything else (a few kilobytes of PNG can claim gigapixels); then completeness: every PNG chunk
    through IEND present with a good CRC, a JPEG ending with its end-of-image marker. Truncated bytes
    fail either way; flipped bits inside JPEG entropy data would not fail a decode either."""
    if img.encoding not in _FORMATS:
        raise InvalidInput(f"{what}: encoding {img.encoding!r} is not 'png' or 'jpeg'")
    if img.encoding == "jpeg" and img.data.startswith(b"\xff\xd8"):
        height, width, channels = jpeg_header(img.data, what)
        fmt = "JPEG"
    else:
        fmt, width, height, channels = _pil_header(img, what)
    if fmt != _FORMATS[img.encoding]:
        raise InvalidInput(f"{what}: declared {img.encoding} but the bytes are {(fmt or 'unknown').lower()}")
    if (width, height) != (img.width, img.height):
        raise InvalidInput(f"{what}: the bytes hold a {width}x{height} image, declared {img.width}x{img.height}")
    if channels != img.channels:
        raise InvalidInput(f"{what}: the bytes hold {channels} channels, declared {img.channels}")
    if fmt == "JPEG" and not img.data.endswith(_JPEG_END):
        raise InvalidInput(f"{what}: the jpeg is truncated ({len(img.data)} bytes, no end-of-image marker)")


def _pil_header(img: EncodedImage, what: str) -> tuple[str, int, int, int]:
    from PIL import Image, UnidentifiedImageError

    if img.encoding == "png" and img.data.startswith(b"\x89PNG"):
        _png_prescan(img.data, what)
    try:
        with Image.open(io.BytesIO(img.data)) as opened:
            fmt, (width, height), channels = opened.format, opened.size, len(opened.getbands())
            if fmt == "PNG":
                opened.verify()  # walks the chunks, checking each CRC
    except UnidentifiedImageError:
        raise InvalidInput(f"{what}: the {len(img.data)} bytes are not a {img.encoding} image") from None
    except Exception as exc:  # Pillow raises several unrelated types (DecompressionBombError among them)
        raise InvalidInput(f"{what}: cannot read the {img.encoding} bytes ({len(img.data)} bytes): {exc}") from None
    return fmt, width, height, channels


_FORMATS = {"png": "PNG", "jpeg": "JPEG"}
_JPEG_END = b"\xff\xd9"


MAX_IMAGE_PIXELS = 3840 * 2160
"""Largest camera frame a robot may register (4K): a registered size is what every frame must decode to."""
MAX_PNG_CHUNKS = 4096
"""A PNG made of more chunks is refused before anything walks them (1.1M empty chunks cost seconds)."""


def _png_prescan(data: bytes, what: str) -> None:
    """Count the chunks (refuse more than MAX_PNG_CHUNKS) and check that the image data starts as a
    zlib stream: cheap (no pixels decoded), and it catches a PNG whose IDAT is not zlib at all."""
    pos, chunks, idat = 8, 0, b""
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise InvalidInput(f"{what}: the png has more than {MAX_PNG_CHUNKS} chunks")
        if kind == b"IDAT" and not idat:
            idat = data[pos + 8:pos + 8 + min(length, 4096)]
        if kind == b"IEND":
            break
        pos += 12 + length
    if idat:
        try:
            zlib.decompressobj().decompress(idat, 64)
        except zlib.error as exc:
            raise InvalidInput(f"{what}: the png's image data is not a zlib stream ({exc})") from None


