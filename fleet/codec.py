"""Typed tensors and images on the wire: dtype + shape + raw little-endian bytes.

No pickle anywhere: a tensor is rebuilt with ``np.frombuffer`` after its byte
length has been checked against dtype and shape, and an image is decoded by
Pillow from PNG/JPEG bytes. bfloat16 has no numpy dtype; it travels and is
returned as its raw 16-bit patterns (``np.uint16``) under the name "bfloat16".
"""

from __future__ import annotations

import io
import math

import numpy as np

from fleet.errors import InvalidInput
from fleet.types import EncodedImage
from fleet.v1 import fleet_pb2 as pb

_TO_PB = {
    "float32": pb.DTYPE_FLOAT32,
    "float64": pb.DTYPE_FLOAT64,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
    "int8": pb.DTYPE_INT8,
    "uint8": pb.DTYPE_UINT8,
    "int16": pb.DTYPE_INT16,
    "int32": pb.DTYPE_INT32,
    "int64": pb.DTYPE_INT64,
    "bool": pb.DTYPE_BOOL,
}
_FROM_PB = {v: k for k, v in _TO_PB.items()}
_NUMPY = {name: np.dtype("<u2" if name == "bfloat16" else name).newbyteorder("<") for name in _TO_PB}
_NUMPY["bool"] = np.dtype("bool")
_NUMPY["uint8"] = np.dtype("uint8")
_NUMPY["int8"] = np.dtype("int8")

MAX_TENSOR_ELEMENTS = 1 << 31


def dtype_to_pb(name: str) -> int:
    try:
        return _TO_PB[name]
    except KeyError:
        raise InvalidInput(f"dtype {name!r} cannot travel on the wire; use one of {sorted(_TO_PB)}") from None


def dtype_from_pb(value: int) -> str:
    try:
        return _FROM_PB[value]
    except KeyError:
        raise InvalidInput(f"unknown or unspecified tensor dtype enum {value}") from None


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype that holds a wire dtype (uint16 patterns for bfloat16)."""
    return _NUMPY[name]


def encode_tensor(array: np.ndarray, dtype: str | None = None) -> pb.Tensor:
    """numpy array -> Tensor. ``dtype="bfloat16"`` marks a uint16 array as bf16 bit patterns."""
    array = np.asarray(array)
    name = dtype or array.dtype.name
    if name == "bfloat16" and array.dtype != np.uint16:
        raise InvalidInput(f"bfloat16 tensors must be given as uint16 bit patterns, got {array.dtype}")
    wire = numpy_dtype(name) if name in _NUMPY else None
    if wire is None:
        dtype_to_pb(name)  # raises with the list of allowed names
    data = np.ascontiguousarray(array, dtype=wire).tobytes()
    return pb.Tensor(dtype=dtype_to_pb(name), shape=list(array.shape), data=data)


def decode_tensor(tensor: pb.Tensor, what: str = "tensor") -> np.ndarray:
    """Tensor -> read-only numpy array; raises InvalidInput if bytes do not match dtype x shape."""
    name = dtype_from_pb(tensor.dtype)
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{what}: negative dimension in shape {shape}")
    count = math.prod(shape)
    if count > MAX_TENSOR_ELEMENTS:
        raise InvalidInput(f"{what}: shape {shape} has {count} elements, more than {MAX_TENSOR_ELEMENTS}")
    dtype = numpy_dtype(name)
    expected = count * dtype.itemsize
    if len(tensor.data) != expected:
        raise InvalidInput(
            f"{what}: {len(tensor.data)} bytes do not match dtype {name} x shape {list(shape)} "
            f"({expected} bytes expected)"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def encode_image(pixels: np.ndarray, encoding: str = "png", quality: int = 90) -> EncodedImage:
    """(H, W, C) uint8 pixels -> PNG (Pillow) or JPEG bytes (simplejpeg, 4:2:0 like Pillow's default, but
    1.5-1.7x faster: bench/jpeg_decode.py). JPEG carries 1 or 3 channels, PNG also 4."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
        raise InvalidInput(f"images must be uint8 (H, W, C) with C in 1/3/4, got {pixels.dtype} {pixels.shape}")
    if encoding not in ("png", "jpeg"):
        raise InvalidInput(f"image encoding {encoding!r} is not 'png' or 'jpeg'")
    h, w, c = pixels.shape
    if encoding == "jpeg":
        import simplejpeg

        if c == 4:
            raise InvalidInput(f"JPEG cannot carry 4 channels (alpha) of a {pixels.shape} image; use png")
        gray = c == 1
        data = simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=quality,
                                      colorspace="GRAY" if gray else "RGB", colorsubsampling="Gray" if gray else "420")
        return EncodedImage(encoding=encoding, height=h, width=w, channels=c, data=data)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if c == 1 else pixels).save(buf, format="PNG", compress_level=1)
    return EncodedImage(encoding=encoding, height=h, width=w, channels=c, data=buf.getvalue())


def decode_image(image: EncodedImage, what: str = "image") -> np.ndarray:
    """PNG/JPEG bytes -> (H, W, C) uint8; raises InvalidInput on truncated or mismatched data."""
    from PIL import Image

    if image.encoding not in ("png", "jpeg"):
        raise InvalidInput(f"{what}: encoding {image.encoding!r} is not 'png' or 'jpeg'")
    try:
        with Image.open(io.BytesIO(image.data)) as img:
            fmt = (img.format or "").lower()
            header_shape = (img.height, img.width, len(img.getbands()))
            if header_shape != (image.height, image.width, image.channels):
                # Refuse before decoding: a lying header must not make us allocate its pixels.
                raise InvalidInput(f"{what}: decoded shape {header_shape} does not match declared "
                                   f"({image.height}, {image.width}, {image.channels})")
            img.load()
            pixels = np.asarray(img)
    except InvalidInput:
        raise
    except Exception as exc:  # Pillow raises several unrelated types for bad bytes
        raise InvalidInput(f"{what}: cannot decode {image.encoding} bytes ({len(image.data)} bytes): {exc}") from None
    if fmt not in (image.encoding, "jpg" if image.encoding == "jpeg" else image.encoding):
        raise InvalidInput(f"{what}: declared {image.encoding} but the bytes are {fmt or 'unknown'}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape != (image.height, image.width, image.channels):
        raise InvalidInput(
            f"{what}: decoded shape {pixels.shape} does not match declared "
            f"({image.height}, {image.width}, {image.channels})"
        )
    return pixels
