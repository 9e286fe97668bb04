"""Trainer checkpoints: atomic, self-verifying, the newest ``keep`` kept.

Layout of the checkpoint directory::

    step-00001200/             one complete checkpoint
        model.safetensors      the policy's tensors (weights + normalisation stats)
        policy.json            the policy's config (rebuilds the architecture)
        state.safetensors      every tensor of the training state (optimizer moments, torch RNG...)
        state.json             the rest of it (step counters, publisher, sampler, RNG states, the
                               policy version counter), tensors referenced by name
        DONE                   written last: the step and the sha256 of every file above
    .tmp-step-00001300-4242/   being written by pid 4242, or left half-written by a crash

Write: a temp directory, each file fsynced, DONE, the directory fsynced, renamed
to ``step-XXXXXXXX`` and the parent fsynced, so a checkpoint either exists
complete or not at all (Reverb's DONE marker, on top of POSIX rename). On load
every file's sha256 is checked against DONE; a checkpoint that fails is skipped
with a warning and the one before it is used.

Format choice: tensors in safetensors, everything else in JSON (tuples, int
dict keys and numpy arrays are tagged so they round-trip). Nothing is pickled,
so loading a checkpoint never runs code, and ``state.json`` is readable with
``jq``. ``torch.save`` of our own files would be allowed, but would tie the
files to pickle and to torch's class layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from cloud.snapshot import HostSnapshot
from fleet import metrics
from fleet.atomic import commit_dir, fresh_dir, fsync_path
from fleet.errors import IntegrityError
from fleet.weights import write_safetensors

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DONE = "DONE"
_PREFIX = "step-"
_TMP_PREFIX = ".tmp-step-"

RESUME_HELP = """\
Resume: the trainer checkpoints its whole training state (policy weights, optimizer, step
counters, sampler and RNG states, policy version counter) every --checkpoint_every_steps
steps and --checkpoint_every_s seconds, on SIGTERM/SIGINT and at --max_steps, into
--checkpoint_dir (default: <policy-dir>-checkpoints). A checkpoint
is written to a temp directory and renamed into place, so a crash never leaves a
half-written one behind as 'complete'. On start the trainer resumes from the newest complete
checkpoint by itself (half-written ones are ignored with a warning); with no checkpoint it
takes the weights of the newest published policy, else builds a new policy. --fresh sets
existing checkpoints aside and starts from a new policy. Published version numbers keep
rising across restarts. Training data lives in Redis, so a restarted trainer trains on
everything stored, including what robots sent while it was down. On SIGTERM the trainer
finishes its optimizer step, checkpoints and exits 0 within --shutdown_timeout_s seconds."""


# --- the nested training state as JSON + named tensors ------------------------------

_TENSOR, _ARRAY, _TUPLE, _DICT = "__tensor__", "__ndarray__", "__tuple__", "__dict__"
_MARKERS = (_TENSOR, _ARRAY, _TUPLE, _DICT)


def encode_tree(obj: Any, copy: bool = True) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, scalars, tensors, arrays) into JSON + tensors (CPU copies;
    ``copy=False``: the tensors themselves, for a snapshot to copy)."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().to("cpu", copy=True).contiguous() if copy else x.detach()
            return {_TENSOR: path}
        if isinstance(x, np.ndarray):
            raw = np.ascontiguousarray(x)
            tensors[path] = torch.frombuffer(bytearray(raw.tobytes()), dtype=torch.uint8) if raw.nbytes \
                else torch.zeros(0, dtype=torch.uint8)
            return {_ARRAY: path, "dtype": raw.dtype.str, "shape": list(raw.shape)}
        if isinstance(x, np.generic):
            return x.item()
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, tuple):
            return {_TUPLE: [enc(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and not (len(x) == 1 and next(iter(x)) in _MARKERS):
                return {k: enc(v, f"{path}.{k}") for k, v in x.items()}
            return {_DICT: [[enc(k, f"{path}.k{i}"), enc(v, f"{path}.{i}")] for i, (k, v) in enumerate(x.items())]}
        raise TypeError(f"checkpoint state at {path or '<root>'!r} has a {type(x).__name__}, which a checkpoint "
                        "cannot hold (use tensors, arrays, numbers, strings, lists, tuples, dicts)")

    return enc(obj, ""), tensors


def decode_tree(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_tree`."""
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _TENSOR in obj and len(obj) == 1:
        return tensors[obj[_TENSOR]]
    if _ARRAY in obj:
        data = tensors[obj[_ARRAY]].numpy().tobytes()
        return np.frombuffer(data, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
    if _TUPLE in obj and len(obj) == 1:
        return tuple(decode_tree(v, tensors) for v in obj[_TUPLE])
    if _DICT in obj and len(obj) == 1:
        return {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in obj[_DICT]}
    return {k: decode_tree(v, tensors) for k, v in obj.items()}


# --- RNG states ---------------------------------------------------------------------

def capture_rng() -> dict:
    """The global RNG states of python, numpy and torch (CPU, and CUDA when present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_rng(seed: int) -> None:
    """Seed the global RNGs of python, numpy and torch (every device): a fresh run's dropout and noise repeat."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def restore_rng(state: dict) -> None:
    """Restore what :func:`capture_rng` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])


# --- the directory --------------------------------------------------------------------

@dataclass(frozen=True)
class Checkpoint:
    """One loaded, verified checkpoint."""

    path: Path
    step: int
    policy_config: dict
    policy_tensors: dict[str, torch.Tensor]
    state: dict


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CheckpointDir:
    """Checkpoints of one trainer in ``root``; the newest ``keep`` complete ones are kept."""

    def __init__(self, root: str | os.PathLike, keep: int):
        if keep < 1:
            raise ValueError(f"keep ({keep}) must be >= 1")
        self.root = Path(root)
        self.keep = keep

    def _final(self, step: int) -> Path:
        return self.root / f"{_PREFIX}{step:08d}"

    def _step_dirs(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.root.glob(f"{_PREFIX}*"):
            try:
                out.append((int(p.name[len(_PREFIX):]), p))
            except ValueError:
                continue
        return sorted(out)

    def steps(self) -> list[int]:
        """Steps of the checkpoints that have a DONE marker, oldest first (not verified)."""
        return [step for step, p in self._step_dirs() if (p / DONE).exists()]

    def save(self, step: int, policy_config: dict, policy_tensors: dict[str, torch.Tensor], state: dict) -> Path:
        """Write a checkpoint atomically, then prune to the newest ``keep``; returns its path."""
        encoded, tensors = encode_tree(state)
        return self.write(step, policy_config, policy_tensors, encoded, tensors)

    def write(self, step: int, policy_config: dict, policy_tensors: dict[str, torch.Tensor], encoded: Any,
              state_tensors: dict[str, torch.Tensor]) -> Path:
        """:meth:`save` of a state already split by :func:`encode_tree`."""
        t0 = time.perf_counter()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = fresh_dir(self.root / f"{_TMP_PREFIX}{step:08d}-{os.getpid()}")
        with open(tmp / "model.safetensors", "wb") as fh:  # straight from the tensors' memory
            write_safetensors(fh, {k: v.detach().to("cpu") for k, v in policy_tensors.items()})
        (tmp / "policy.json").write_text(json.dumps(policy_config, sort_keys=True))
        with open(tmp / "state.safetensors", "wb") as fh:
            write_safetensors(fh, {k: v.to("cpu") for k, v in state_tensors.items()})
        (tmp / "state.json").write_text(json.dumps(encoded))
        files = {}
        for f in sorted(tmp.iterdir()):
            files[f.name] = _sha256(f)
        (tmp / DONE).write_text(json.dumps({"format": FORMAT_VERSION, "step": step, "files": files,
                                            "created_s": time.time()}, indent=1))
        final = self._final(step)
        if final.exists():  # e.g. saved at this step before a crash; replace it
            shutil.rmtree(final)
        commit_dir(tmp, final)
        self._prune()
        log.info("checkpoint %s written in %.2fs", final, time.perf_counter() - t0)
        return final

    def verify(self, path: Path) -> None:
        """IntegrityError unless the checkpoint at ``path`` is complete and every file matches its DONE."""
        self.load(path)

    def _prune(self) -> None:
        for step in self.steps()[:-self.keep]:
            shutil.rmtree(self._final(step), ignore_errors=True)

    def load(self, path: str | os.PathLike) -> Checkpoint:
        """Read and verify one checkpoint; IntegrityError if it is incomplete or corrupt."""
        path = Path(path)
        try:
            done = json.loads((path / DONE).read_text())
            files, step = dict(done["files"]), int(done["step"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"checkpoint {path} has no valid {DONE} marker ({exc})") from None
        if int(done.get("format", 0)) != FORMAT_VERSION:
            raise IntegrityError(f"checkpoint {path} has format {done.get('format')}, this trainer reads "
                                 f"{FORMAT_VERSION}")
        for name in ("model.safetensors", "policy.json", "state.safetensors", "state.json"):
            if name not in files:
                raise IntegrityError(f"checkpoint {path}: {DONE} does not list {name}")
        for name, digest in files.items():
            try:
                actual = _sha256(path / name)
            except OSError as exc:
                raise IntegrityError(f"checkpoint {path}: cannot read {name} ({exc})") from None
            if actual != digest:
                raise IntegrityError(f"checkpoint {path}: {name} sha256 {actual[:12]} != {digest[:12]} in {DONE}")
        tensors = load_file(str(path / "state.safetensors"))
        state = decode_tree(json.loads((path / "state.json").read_text()), tensors)
        return Checkpoint(path=path, step=step, policy_config=json.loads((path / "policy.json").read_text()),
                          policy_tensors=load_file(str(path / "model.safetensors")), state=state)

    def discard_half_written(self) -> list[Path]:
        """Remove temp directories left by a writer that died (call before this process saves)."""
        found = sorted(self.root.glob(f"{_TMP_PREFIX}*"))
        for p in found:
            log.warning("ignoring half-written checkpoint %s (its writer died mid-write); removing it", p)
            shutil.rmtree(p, ignore_errors=True)
        return found

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; incomplete or corrupt ones are skipped with a warning."""
        if not self.root.exists():
            return None
        self.discard_half_written()
        for _, path in reversed(self._step_dirs()):
            try:
                return self.load(path)
            except IntegrityError as exc:
                log.warning("ignoring checkpoint %s: %s", path, exc)
        return None

    def set_aside(self) -> Path | None:
        """Move every checkpoint into ``superseded-<time>/`` (for ``--fresh``); returns that directory."""
        if not self.root.exists():
            return None
        self.discard_half_written()
        existing = [p for _, p in self._step_dirs()]
        if not existing:
            return None
        aside = self.root / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        aside.mkdir()
        for p in existing:
            os.rename(p, aside / p.name)
        fsync_path(self.root)
        log.warning("fresh start: moved %d checkpoints from %s to %s", len(existing), self.root, aside)
        return aside


class CheckpointSchedule:
    """Due every ``every_steps`` optimizer steps and/or every ``every_s`` seconds (0 = off)."""

    def __init__(self, every_steps: int, every_s: float, last_step: int = 0):
        self.every_steps = every_steps
        self.every_s = every_s
        self.last_step = last_step
        self._last_time = time.monotonic()

    def due(self, step: int) -> bool:
        if step <= self.last_step:
            return False
        if self.every_steps and step - self.last_step >= self.every_steps:
            return True
        return bool(self.every_s) and time.monotonic() - self._last_time >= self.every_s

    def mark(self, step: int) -> None:
        self.last_step, self._last_time = step, time.monotonic()


class CheckpointWriter:
    """Checkpoints written off the training thread: ``save_async`` snapshots the policy and the training state
    (one copy into host buffers reused from one checkpoint to the next) and a thread writes, fsyncs and
    renames it; the trainer goes on meanwhile. ``save`` (the way out, e.g. SIGTERM) waits for that thread,
    writes on the calling thread and verifies what it wrote."""

    def __init__(self, directory: CheckpointDir):
        self.dir = directory
        self._model = HostSnapshot()
        self._state = HostSnapshot()
        self._thread: threading.Thread | None = None
        self.failures = 0
        """Background checkpoints that could not be written (logged; the next one is tried as scheduled)."""
        self.last_written = 0
        """Step of the newest checkpoint written complete (or resumed from)."""

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def save_async(self, step: int, policy_config: dict, policy_tensors: dict[str, torch.Tensor],
                   state: dict) -> None:
        """Snapshot now, write in the background (after waiting for the previous one, which only happens when
        checkpoints are due faster than the disk writes them)."""
        self.wait()
        encoded, tensors = encode_tree(state, copy=False)
        model, tensors = self._model.copy_from(policy_tensors), self._state.copy_from(tensors)
        self._thread = threading.Thread(target=self._write, args=(step, policy_config, model, encoded, tensors),
                                        name="checkpoint", daemon=True)
        self._thread.start()

    def _write(self, step: int, policy_config: dict, model: dict, encoded: Any, tensors: dict) -> None:
        t0 = time.perf_counter()
        try:
            self.dir.write(step, policy_config, model, encoded, tensors)
        except Exception:  # noqa: BLE001 - a background checkpoint must not kill training; the next one retries
            self.failures += 1
            log.exception("checkpoint at step %d could not be written; training goes on", step)
            return
        metrics.TRAINER_CHECKPOINT.observe(time.perf_counter() - t0)
        metrics.TRAINER_LAST_CHECKPOINT.set(time.time())
        self.last_written = max(self.last_written, step)

    def wait(self, timeout_s: float | None = None) -> bool:
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        return not self.busy

    def save(self, step: int, policy_config: dict, policy_tensors: dict[str, torch.Tensor], state: dict) -> Path:
        """Write now, on this thread (after the one being written), and verify it; returns its path."""
        self.wait()
        t0 = time.perf_counter()
        path = self.dir.save(step, policy_config, policy_tensors, state)
        self.dir.verify(path)
        metrics.TRAINER_CHECKPOINT.observe(time.perf_counter() - t0)
        metrics.TRAINER_LAST_CHECKPOINT.set(time.time())
        self.last_written = max(self.last_written, step)
        return path
