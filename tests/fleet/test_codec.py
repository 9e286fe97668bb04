"""Wire codec round trips for every dtype, images, and malformed input."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.codec import decode_image, decode_tensor, encode_image, encode_tensor
from fleet.convert import chunk_to_pb, columns_from_pb, decode_step, encode_step, schema_from_pb, schema_to_pb
from fleet.errors import InvalidInput
from fleet.types import DTYPES, Chunk, EncodedImage, EpisodeSummary, FeatureSpec, Schema, Step
from fleet.v1 import fleet_pb2 as pb


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != "bfloat16"])
def test_tensor_round_trip_every_dtype(dtype):
    rng = np.random.default_rng(0)
    arr = (rng.normal(size=(3, 5)) * 100).astype(dtype)
    out = decode_tensor(encode_tensor(arr))
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_bfloat16_travels_as_bit_patterns():
    import torch

    t = torch.randn(4, 7).to(torch.bfloat16)
    bits = t.view(torch.int16).numpy().view(np.uint16)
    out = decode_tensor(encode_tensor(bits, dtype="bfloat16"))
    back = torch.from_numpy(out.astype(np.uint16).view(np.int16).copy()).view(torch.bfloat16)
    assert torch.equal(back, t)
    with pytest.raises(InvalidInput, match="uint16 bit patterns"):
        encode_tensor(np.zeros(3, np.float32), dtype="bfloat16")


def test_scalar_and_empty_tensors():
    for arr in (np.float32(3.5).reshape(()), np.zeros((0, 4), np.float32)):
        np.testing.assert_array_equal(decode_tensor(encode_tensor(arr)), arr)


def test_byte_count_mismatch_is_invalid():
    msg = encode_tensor(np.zeros((2, 3), np.float32))
    msg.data = msg.data[:-1]
    with pytest.raises(InvalidInput, match="23 bytes do not match dtype float32 x shape \\[2, 3\\]"):
        decode_tensor(msg)
    with pytest.raises(InvalidInput, match="unknown or unspecified"):
        decode_tensor(pb.Tensor(dtype=0, shape=[1], data=b"\0"))


@pytest.mark.parametrize("encoding", ["png", "jpeg"])
def test_image_round_trip(encoding):
    pixels = np.zeros((24, 32, 3), np.uint8)
    pixels[4:12, 8:20] = (200, 30, 90)
    img = encode_image(pixels, encoding)
    out = decode_image(img)
    assert out.shape == (24, 32, 3)
    if encoding == "png":
        np.testing.assert_array_equal(out, pixels)
    else:
        assert np.abs(out.astype(int) - pixels).mean() < 8


def test_truncated_image_is_invalid():
    img = encode_image(np.full((16, 16, 3), 77, np.uint8), "png")
    bad = EncodedImage(img.encoding, img.height, img.width, img.channels, img.data[: len(img.data) // 2])
    with pytest.raises(InvalidInput, match="cannot decode png"):
        decode_image(bad)
    lying = EncodedImage(img.encoding, 8, 16, 3, img.data)
    with pytest.raises(InvalidInput, match="does not match declared"):
        decode_image(lying)


def _step(seq=1) -> Step:
    return Step(seq=seq, index=0, observation={"state": np.arange(39, dtype=np.float32)},
                policy_action=np.ones(4, np.float32), action=np.full(4, 0.5, np.float32), is_intervention=True,
                reward=1.5, success=False, done=True, policy_version=3, timestamp_s=123.25)


def test_step_and_chunk_round_trip():
    schema = Schema((FeatureSpec("state", "float32", (39,)),), FeatureSpec("action", "float32", (4,)))
    step = _step()
    back = decode_step(encode_step(step, schema))
    np.testing.assert_array_equal(back.observation["state"], step.observation["state"])
    np.testing.assert_array_equal(back.action, step.action)
    assert (back.is_intervention, back.policy_version, back.timestamp_s, back.done) == (True, 3, 123.25, True)
    summary = EpisodeSummary(True, 1, 1, 1, False, 3)
    chunk = Chunk("r1", "ep1", "reach the goal", [step], episode_end=summary, evaluation=True)
    again = columns_from_pb(chunk_to_pb(chunk, schema), schema)
    assert again.episode_end == summary and again.evaluation and again.task == "reach the goal"
    np.testing.assert_array_equal(again.columns.observation["state"][0], step.observation["state"])
    assert again.columns.intervention.tolist() == [True] and again.columns.done.tolist() == [True]
    assert again.columns.steps(0, schema)[0].timestamp_s == 123.25
    assert schema_from_pb(schema_to_pb(schema)) == schema


def test_malformed_step_bytes():
    with pytest.raises(InvalidInput, match="malformed step bytes"):
        decode_step(b"\xff\xff\xff\x01garbage")
