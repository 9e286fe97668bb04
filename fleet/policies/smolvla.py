"""SmolVLA from a local backbone directory (no hub), and a tiny random backbone for tests.

LeRobot's SmolVLA builds its VLM with ``AutoConfig.from_pretrained(vlm_model_name)``
and ``AutoProcessor.from_pretrained(vlm_model_name)``; both accept a local
directory. :func:`ensure_tiny_vlm` writes such a directory for a SmolVLM with a
2-layer Llama text model, a 1-layer SigLIP vision encoder on 32x32 images and a
byte-level tokenizer (every byte is a token; no merges, so nothing to train or
download). It is deterministic: every machine that calls it gets the same files,
so an edge can rebuild a policy from its manifest alone.

Needs ``transformers`` (LeRobot's ``smolvla`` extra: ``transformers>=4.57.1,<5``, ``num2words``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from fleet.errors import ConfigError

log = logging.getLogger(__name__)

TINY_VLM = {
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   image_size=32, patch_size=8),
    "text": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
    "scale_factor": 2,
    "image_seq_len": 4,
}
"""The tiny backbone's architecture (changing it changes the directory name)."""
_SPECIAL_TOKENS = {"pad": "<|endoftext|>", "bos": "<|im_start|>", "eos": "<end_of_utterance>",
                   "image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                   "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}


def cache_dir() -> Path:
    """Where generated backbones live: $FLEET_CACHE_DIR or ~/.cache/fleet."""
    return Path(os.environ.get("FLEET_CACHE_DIR") or Path.home() / ".cache" / "fleet")


def tiny_vlm_dir() -> Path:
    digest = hashlib.sha256(json.dumps(TINY_VLM, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"tiny-smolvlm-{digest}"


def ensure_tiny_vlm(path: Path | None = None) -> Path:
    """Write the tiny SmolVLM config + processor into ``path`` (default: :func:`tiny_vlm_dir`) once."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    path = Path(path) if path is not None else tiny_vlm_dir()
    if (path / "config.json").exists():
        return path
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(dict.fromkeys(_SPECIAL_TOKENS.values())))
    extra = {k: v for k, v in _SPECIAL_TOKENS.items() if k.endswith("token")}
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=_SPECIAL_TOKENS["pad"],
                                   bos_token=_SPECIAL_TOKENS["bos"], eos_token=_SPECIAL_TOKENS["eos"],
                                   extra_special_tokens=extra)
    text = dict(TINY_VLM["text"], vocab_size=len(fast), pad_token_id=fast.pad_token_id)
    config = SmolVLMConfig(vision_config=TINY_VLM["vision"], text_config=text, scale_factor=TINY_VLM["scale_factor"],
                           image_token_id=fast.convert_tokens_to_ids(_SPECIAL_TOKENS["image_token"]),
                           pad_token_id=fast.pad_token_id)
    size = {"longest_edge": TINY_VLM["vision"]["image_size"]}
    processor = SmolVLMProcessor(image_processor=SmolVLMImageProcessor(size=size, max_image_size=size,
                                                                       do_image_splitting=False),
                                 tokenizer=fast, video_processor=SmolVLMVideoProcessor(),
                                 image_seq_len=TINY_VLM["image_seq_len"])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    try:
        os.rename(tmp, path)
    except OSError:  # another process won the race; its files are identical
        if not (path / "config.json").exists():
            raise
    log.info("wrote a tiny random SmolVLM backbone to %s", path)
    return path


def resolve_vlm_path(vlm_path: str) -> Path:
    """The backbone directory: ``vlm_path`` (must exist) or the generated tiny one."""
    if not vlm_path:
        return ensure_tiny_vlm()
    path = Path(vlm_path).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"policy.vlm_path ({vlm_path!r}) is not a directory with a SmolVLM config.json "
                          "(the hub is not used; download the backbone there first)")
    return path.resolve()


def vlm_image_size(vlm_dir: Path) -> int:
    """The square input size of the backbone's vision encoder."""
    config = json.loads((vlm_dir / "config.json").read_text())
    return int(config["vision_config"]["image_size"])


def smolvla_config(config: Any, common: dict[str, Any]):
    """LeRobot ``SmolVLAConfig`` for a fleet PolicyConfig (``common``: features, device, lr...)."""
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

    vlm_dir = resolve_vlm_path(config.vlm_path)
    size = vlm_image_size(vlm_dir)
    state_dim = common["input_features"]["observation.state"].shape[0]
    action_dim = common["output_features"]["action"].shape[0]
    if not any(k.startswith("observation.images.") for k in common["input_features"]):
        raise ConfigError("policy.type smolvla needs at least one camera image in the robot's schema")
    return SmolVLAConfig(**common, chunk_size=config.chunk_size, vlm_model_name=str(vlm_dir),
                         load_vlm_weights=config.load_vlm_weights, num_vlm_layers=config.vlm_layers or -1,
                         resize_imgs_with_padding=(size, size), max_state_dim=max(32, state_dim),
                         max_action_dim=max(32, action_dim), freeze_vision_encoder=config.freeze_backbone,
                         train_expert_only=config.freeze_backbone, num_steps=10)


def tokenizer_of(model) -> Any:
    """The text tokenizer inside a LeRobot SmolVLAPolicy."""
    return model.model.vlm_with_expert.processor.tokenizer
