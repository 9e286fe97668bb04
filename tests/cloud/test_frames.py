"""cloud/frames.py: frames decoded into a preallocated batch, bad frames named by index, never a crash."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from cloud.frames import CorruptFrames, FrameDecoder, FrameError, decode_frame
from fleet.codec import encode_image
from fleet.errors import ConfigError, InvalidInput

pytestmark = pytest.mark.timeout(60)

JPEG_TOLERANCE = 2
"""Two libjpeg-turbo builds may round the inverse DCT / upsampling differently by a level or two."""


def frame(seed: int, height: int = 48, width: int = 64, channels: int = 3) -> np.ndarray:
    """Smooth content with some noise, so JPEG stays close to the pixels."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 40 * seed % 256)], axis=-1)[..., :channels]
    noise = np.random.default_rng(seed).integers(-3, 4, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def pil_jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pil_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


@pytest.fixture(params=[0, 2], ids=["inline", "2 workers"])
def decoder(request):
    with FrameDecoder(request.param) as dec:
        yield dec


def test_jpeg_pixels_match_pillow(decoder):
    blobs = [pil_jpeg(frame(i)) for i in range(5)]
    out = np.zeros((5, 48, 64, 3), np.uint8)
    decoder.decode_into(blobs, out)
    for i, data in enumerate(blobs):
        assert np.abs(out[i].astype(int) - pil_decode(data).astype(int)).max() <= JPEG_TOLERANCE
        assert np.abs(out[i].astype(int) - frame(i).astype(int)).mean() < 4  # and close to the original


def test_png_and_gray_frames_decode(decoder):
    rgb, gray = frame(1), frame(2, channels=1)
    out = np.zeros((2, 48, 64, 3), np.uint8)
    decoder.decode_into([encode_image(rgb, "png").data, pil_jpeg(rgb)], out)
    np.testing.assert_array_equal(out[0], rgb)  # lossless
    mono = np.zeros((2, 48, 64, 1), np.uint8)
    decoder.decode_into([encode_image(gray, "png").data, pil_jpeg(gray)], mono)
    np.testing.assert_array_equal(mono[0], gray)
    assert np.abs(mono[1].astype(int) - gray.astype(int)).max() <= 8


def test_writes_into_a_strided_view():
    """Any writable view: here every other slot of a bigger buffer, and channels-last slices of RGBX rows."""
    big = np.zeros((4, 48, 64, 3), np.uint8)
    FrameDecoder(0).decode_into([pil_jpeg(frame(3)), pil_jpeg(frame(4))], big[::2])
    assert big[0].any() and big[2].any() and not big[1].any() and not big[3].any()
    rgbx = np.zeros((1, 48, 64, 4), np.uint8)
    decode_frame(pil_jpeg(frame(3)), rgbx[0, :, :, :3])
    np.testing.assert_array_equal(rgbx[0, :, :, :3], big[0])
    assert not rgbx[..., 3].any()


@pytest.mark.parametrize("bad, why", [
    (lambda: pil_jpeg(frame(0, 32, 64)), "32x64"),                      # another size
    (lambda: pil_jpeg(frame(0, channels=1)), "Gray"),                   # gray into an RGB slot: not widened
    (lambda: encode_image(frame(0, 40, 64), "png").data, "does not match"),
    (lambda: pil_jpeg(frame(0))[:-200], "decode JPEG"),                 # truncated in the pixels
    (lambda: pil_jpeg(frame(0))[:4] + b"\x00" * 64, "header"),          # garbage after the magic
    (lambda: b"", "neither JPEG nor PNG"),
    (lambda: b"GIF89a" + bytes(100), "neither JPEG nor PNG"),
    (lambda: encode_image(frame(0), "png").data[:60], "cannot decode png"),
], ids=["size", "gray", "png size", "truncated", "garbage", "empty", "gif", "png truncated"])
def test_bad_frame_is_named_and_others_decoded(decoder, bad, why):
    good = pil_jpeg(frame(5))
    out = np.zeros((3, 48, 64, 3), np.uint8)
    with pytest.raises(CorruptFrames) as info:
        decoder.decode_into([good, bad(), good], out)
    assert isinstance(info.value, InvalidInput)  # what the sampler already catches as corrupt_image
    [err] = info.value.errors
    assert isinstance(err, FrameError) and err.index == 1 and why in err.detail, err.detail
    assert out[0].any() and out[2].any()


def test_many_bad_frames_all_reported():
    blobs = [pil_jpeg(frame(i)) if i % 3 else b"nope" for i in range(12)]
    with FrameDecoder(2) as dec, pytest.raises(CorruptFrames) as info:
        dec.decode_into(blobs, np.zeros((12, 48, 64, 3), np.uint8))
    assert [e.index for e in info.value.errors] == [0, 3, 6, 9]


def test_many_frames_in_parallel_from_several_callers():
    """Two sampler threads share one decoder: every slot gets its own frame, decoded on the pool's threads."""
    blobs = [pil_jpeg(frame(i)) for i in range(64)]
    expected = np.stack([pil_decode(b) for b in blobs])
    outs = [np.zeros((64, 48, 64, 3), np.uint8) for _ in range(2)]
    with FrameDecoder(2) as dec:
        callers = [threading.Thread(target=dec.decode_into, args=(blobs, out)) for out in outs]
        for t in callers:
            t.start()
        for t in callers:
            t.join(30)
    for out in outs:
        assert np.abs(out.astype(int) - expected.astype(int)).max() <= JPEG_TOLERANCE


def test_misuse_is_refused():
    with pytest.raises(ConfigError):
        FrameDecoder(-1)
    dec = FrameDecoder(1)
    with pytest.raises(InvalidInput, match="2 frames for 1 slots"):
        dec.decode_into([b"", b""], np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(InvalidInput, match="uint8"):
        dec.decode_into([b""], np.zeros((1, 4, 4, 3), np.float32))
    readonly = np.zeros((1, 4, 4, 3), np.uint8)
    readonly.flags.writeable = False
    with pytest.raises(InvalidInput, match="writable"):
        dec.decode_into([b""], readonly)
    dec.close()
    with pytest.raises(RuntimeError, match="closed"):
        dec.decode_into([b"", b""], np.zeros((2, 4, 4, 3), np.uint8))


def test_decodes_into_a_torch_tensor_view():
    """The trainer's batch can be a torch tensor (pinned on CUDA machines): decode into its numpy view."""
    torch = pytest.importorskip("torch")
    pin = torch.cuda.is_available()
    batch = torch.zeros((3, 48, 64, 3), dtype=torch.uint8, pin_memory=pin)
    blobs = [pil_jpeg(frame(i)) for i in range(3)]
    with FrameDecoder(2) as dec:
        dec.decode_into(blobs, batch.numpy())
    for i, data in enumerate(blobs):
        assert np.abs(batch[i].numpy().astype(int) - pil_decode(data).astype(int)).max() <= JPEG_TOLERANCE


def test_mutated_frames_decode_or_are_refused_never_crash():
    """Flipped bytes and cuts anywhere in a JPEG: each frame decodes (JPEG has no checksum) or is a FrameError."""
    rng = np.random.default_rng(0)
    good = pil_jpeg(frame(7))
    out = np.zeros((1, 48, 64, 3), np.uint8)
    refused = 0
    for _ in range(300):
        data = bytearray(good)
        for pos in rng.integers(0, len(data), int(rng.integers(1, 8))):
            data[pos] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            data = data[:int(rng.integers(0, len(data)))]
        try:
            decode_frame(bytes(data), out[0])
        except FrameError:
            refused += 1
    assert 0 < refused < 300
