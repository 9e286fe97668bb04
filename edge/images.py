"""Camera frames leave the control loop as PNG/JPEG, not raw pixels.

Robots with cameras put ``(H, W, C)`` uint8 frames into ``Observation.features`` (the
policy may look at them). :class:`ImageEncodingSink` sits between the control loop and
the spool: it moves every image feature of the schema from ``step.observation`` to
``step.images`` as an :class:`~fleet.types.EncodedImage`, which is how images travel
and are validated by the gateway.
"""

from __future__ import annotations

import logging

from edge.loop import StepSink
from fleet.codec import encode_image
from fleet.errors import ConfigError
from fleet.types import EpisodeSummary, Schema, Step

log = logging.getLogger(__name__)

ENCODINGS = ("jpeg", "png")


class ImageEncodingSink:
    """A StepSink that encodes a step's image features, then hands the step to ``inner``."""

    def __init__(self, inner: StepSink, schema: Schema, encoding: str = "jpeg", jpeg_quality: int = 90):
        if encoding not in ENCODINGS:
            raise ConfigError(f"image encoding ({encoding!r}) must be one of {ENCODINGS}")
        if not 1 <= jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality ({jpeg_quality}) must be in [1, 100]")
        self.inner = inner
        self.encoding = encoding
        self.jpeg_quality = jpeg_quality
        self.image_names = tuple(f.name for f in schema.observation if f.is_image)

    def record(self, episode_id: str, task: str, evaluation: bool, step: Step,
               episode_end: EpisodeSummary | None) -> None:
        """Encode the image features still in ``step.observation`` and pass the step on."""
        if self.image_names:
            observation = dict(step.observation)
            images = dict(step.images)
            for name in self.image_names:
                pixels = observation.pop(name, None)
                if pixels is not None and name not in images:
                    images[name] = encode_image(pixels, self.encoding, self.jpeg_quality)
            step.observation, step.images = observation, images
        self.inner.record(episode_id, task, evaluation, step, episode_end)
