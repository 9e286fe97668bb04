"""The heartbeat's help side: a robot's help signal and camera thumbnail land in Redis, bad ones are refused
naming the field, and the operator assignment the operators service wrote comes back in the reply (a
malformed entry is no operator, never an error)."""

from __future__ import annotations

import json
import math

import grpc
import numpy as np
import pytest

from cloud.buffer import RobotKeys
from cloud.buffer.layout import OPS_ASSIGNMENTS_KEY
from edge.client import FleetClient
from fleet import PROTOCOL_VERSION, metrics
from fleet.codec import encode_image
from fleet.convert import MAX_THUMBNAIL_BYTES
from fleet.types import FeatureSpec, HelpSignal, RobotInfo, Schema

TASK = "reach the goal"
SCHEMA = Schema((FeatureSpec("state", "float32", (6,)),), FeatureSpec("action", "float32", (2,)))
THUMB = encode_image(np.full((24, 32, 3), 90, np.uint8), "jpeg").data

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def client(gateway):
    c = FleetClient(gateway.target, rpc_timeout_s=5.0)
    c.register(RobotInfo("r1", "test-arm", SCHEMA, (TASK,), PROTOCOL_VERSION))
    yield c
    c.close()


def beat(client: FleetClient, **kwargs):
    return client.heartbeat("r1", 1, 0, 0, "running", TASK, 20.0, 0.1, **kwargs)


def test_help_signal_and_thumbnail_land_in_redis(client, redis_client):
    help = HelpSignal(score=0.75, uncertainty=0.5, stall=1.0, risk=0.25, wanted=True, holding=True,
                      intervening=False, wanted_for_s=3.5)
    reply = beat(client, help=help, thumbnail=THUMB, operator_id="")
    assert reply.assignment.operator_id == ""  # nobody assigned
    status = {k.decode(): v.decode() for k, v in redis_client.hgetall(RobotKeys("r1").status).items()}
    assert (float(status["help_score"]), float(status["help_uncertainty"]), float(status["help_stall"]),
            float(status["help_risk"])) == (0.75, 0.5, 1.0, 0.25)
    assert (status["help_wanted"], status["holding"], status["intervening"]) == ("1", "1", "0")
    assert float(status["wanted_for_s"]) == 3.5 and status["operator"] == ""
    assert redis_client.get(RobotKeys("r1").thumb) == THUMB
    assert 0 < redis_client.ttl(RobotKeys("r1").thumb) <= 60
    beat(client)  # a heartbeat without a thumbnail (or help) keeps the last thumbnail and clears the signal
    assert redis_client.get(RobotKeys("r1").thumb) == THUMB
    assert redis_client.hget(RobotKeys("r1").status, "help_wanted") == b"0"


@pytest.mark.parametrize("kwargs, words", [
    ({"help": HelpSignal(score=1.5)}, "help.score (1.5) must be a finite number in [0, 1]"),
    ({"help": HelpSignal(uncertainty=math.nan)}, "help.uncertainty (nan)"),
    ({"help": HelpSignal(risk=-0.1)}, "help.risk (-0.1)"),
    ({"help": HelpSignal(stall=math.inf)}, "help.stall (inf)"),
    ({"help": HelpSignal(wanted_for_s=-1.0)}, "help.wanted_for_s (-1.0)"),
    ({"thumbnail": b"\xff\xd8\xff" + bytes(MAX_THUMBNAIL_BYTES)}, f"thumbnail is {MAX_THUMBNAIL_BYTES + 3} bytes"),
    ({"thumbnail": b"\x89PNG\r\n\x1a\n"}, "thumbnail is not a JPEG"),
    ({"operator_id": "op 1\n"}, "heartbeat operator_id"),
])
def test_bad_help_fields_are_invalid_argument(client, redis_client, kwargs, words):
    with pytest.raises(grpc.RpcError) as err:
        beat(client, **kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details(), \
        err.value.details()
    assert not redis_client.exists(RobotKeys("r1").status) and not redis_client.exists(RobotKeys("r1").thumb)


def test_the_assignment_comes_back_and_a_garbage_entry_is_no_operator(client, redis_client):
    redis_client.hset(OPS_ASSIGNMENTS_KEY, "r1", json.dumps({"operator": "op-1", "since_s": 12.5, "manual": True}))
    redis_client.hset(OPS_ASSIGNMENTS_KEY, "r2", json.dumps({"operator": "op-2", "since_s": 1.0, "manual": False}))
    got = beat(client, operator_id="op-1").assignment
    assert (got.operator_id, got.manual, got.since_s) == ("op-1", True, 12.5)
    assert redis_client.hget(RobotKeys("r1").status, "operator") == b"op-1"
    bad_before = metrics.GATEWAY_BAD_ASSIGNMENTS._value.get()
    for garbage in (b"{not json", b"[1, 2]", json.dumps({"operator": 7}), json.dumps({"operator": "op 1\n"}),
                    json.dumps({"operator": "op-1", "since_s": "soon"}), json.dumps({"operator": "op-1", "manual": 1}),
                    b"\xff\xfe"):
        redis_client.hset(OPS_ASSIGNMENTS_KEY, "r1", garbage)
        assert beat(client).assignment.operator_id == "", garbage
    assert metrics.GATEWAY_BAD_ASSIGNMENTS._value.get() == bad_before + 7
    redis_client.hdel(OPS_ASSIGNMENTS_KEY, "r1")
    assert beat(client).assignment.operator_id == ""
