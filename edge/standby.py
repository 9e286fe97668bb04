"""The standby model: where the updater writes the next policy version, in place.

An edge holds at most two models: the acting one and this one. A new version's
verified bytes go straight into the standby model's weights (its memory, through
``FleetPolicy.weight_views``); it is offered to the PolicySlot and swapped in at
an episode boundary, and the model it replaced becomes the next standby. No
model is built per version: only for the first one, or when the architecture
changes (``models_built`` counts them). Weights the edge cannot view as host bytes (a model on a GPU)
are received into host buffers and copied into the standby model's tensors by ``load_tensors``
(``load_state_dict``'s in-place copy): still no model per version.

Which model is the standby, in order: the one the updater holds already (a
transfer failed or a version was refused), the slot's previous model (after a
swap; rollback to it then goes through the disk), the slot's pending model
(no swap happened since it was offered: the next version is written over it, a
delta applied to its own bytes). Never the acting one. If an episode boundary
passed while the pending model was being rewritten (no swap there), the next
version first waits for a boundary and goes into the model freed by that swap:
a robot whose transfers take longer than the trainer takes to publish still
swaps at every other boundary instead of never.

Per model, ``digests`` records which version's bytes each weight holds, so an
unchanged tensor (a frozen backbone) is not copied again, and a tensor being
rewritten is forgotten until its bytes are verified.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from weakref import WeakKeyDictionary

import torch

from edge.hotswap import PolicySlot
from fleet.weights import Manifest, tensor_from_bytes

log = logging.getLogger(__name__)


def _views(policy) -> dict[str, memoryview]:
    views = getattr(policy, "weight_views", None)
    return views() if views is not None else {}


class Standby:
    """Claims, tracks and fills the model the next version is written into."""

    def __init__(self, slot: PolicySlot, build: Callable[[Manifest, dict[str, torch.Tensor]], object]):
        self.slot = slot
        self.build = build
        self.policy = None
        """The model the updater holds (claimed, not in the slot), if any."""
        self.models_built = 0
        """Models built from a manifest (the first version, or a new architecture): not one per version."""
        self._digests: WeakKeyDictionary = WeakKeyDictionary()
        self._views: WeakKeyDictionary = WeakKeyDictionary()

    def views(self, policy) -> dict[str, memoryview]:
        """Writable raw bytes of ``policy``'s weights (cached per model; {} if it cannot be written in place)."""
        views = self._views.get(policy)
        if views is None:
            views = self._views[policy] = _views(policy)
        return views

    def digests(self, policy) -> dict[str, str]:
        """What ``policy``'s weights hold: name -> digest (in its manifest's hash)."""
        digests = self._digests.get(policy)
        if digests is None:
            digests = self._digests[policy] = {}
        return digests

    def record(self, policy, manifest: Manifest) -> None:
        """``policy``'s weights are exactly ``manifest``'s."""
        digests = self.digests(policy)
        digests.clear()
        digests.update({e.name: e.digest for e in manifest.tensors if e.name in self.views(policy)})

    def claim(self, manifest: Manifest, wait_swap: Callable[[], bool] | None = None):
        """A model with ``manifest``'s architecture that is neither acting nor pending after this call, or None
        (then the version is built). Incompatible candidates are dropped (their memory is freed).

        ``wait_swap()`` blocks until the next swap (True) or gives up (False: the transfer is being cancelled,
        and the pending model stays pending): called before taking the pending model when the last episode
        boundary missed a swap because that model was being rewritten; after a swap, the model the robot
        stopped acting with is free instead."""
        for take in (lambda: self.policy, self.slot.take_previous, lambda: self._take_pending(manifest, wait_swap)):
            candidate = take()
            self.policy = None
            if candidate is None:
                continue
            same = getattr(candidate, "same_architecture", None)
            views = self.views(candidate)  # {} for weights not in host memory (a GPU): loaded in place instead
            if same is not None and same(manifest.config) and all(
                    len(views[e.name]) == e.nbytes for e in manifest.tensors if e.name in views):
                self.policy = candidate
                return candidate
        return None

    def _take_pending(self, manifest: Manifest, wait_swap: Callable[[], bool] | None):
        if wait_swap is not None and self.slot.pending_version is not None and self.slot.missed_swap:
            log.info("v%d waits for the next episode boundary: the last one passed while the pending model was "
                     "being rewritten", manifest.version)
            if not wait_swap():
                return None  # the updater stops or must handle a rollback (the transfer is cancelled): keep it
            previous = self.slot.take_previous()
            if previous is not None:
                return previous
        return self.slot.take_pending()

    def fill(self, policy, manifest: Manifest, payload: Mapping[str, memoryview | bytes]) -> None:
        """Copy verified ``payload`` (e.g. the last good version's file) into ``policy`` and load the rest
        (normalization stats) through ``load_tensors``."""
        views, digests = self.views(policy), self.digests(policy)
        extras = {}
        for entry in manifest.tensors:
            view = views.get(entry.name)
            if view is None:
                extras[entry.name] = tensor_from_bytes(payload[entry.name], entry.dtype, entry.shape)
            elif digests.get(entry.name) != entry.digest:
                digests.pop(entry.name, None)
                view[:] = payload[entry.name]
        policy.load_tensors(extras, manifest.version, partial=True)
        self.record(policy, manifest)

    def finish(self, policy, manifest: Manifest, tensors: Mapping[str, torch.Tensor]) -> None:
        """After an in-place transfer: load what did not go through the views and set the version."""
        views = self.views(policy)
        policy.load_tensors({k: v for k, v in tensors.items() if k not in views}, manifest.version, partial=True)
        self.record(policy, manifest)

    def build_new(self, manifest: Manifest, tensors: dict[str, torch.Tensor]):
        """Build a model for ``manifest`` (no compatible standby); its weights then back the held version."""
        policy = self.build(manifest, tensors)
        self.models_built += 1
        log.info("built a model for policy v%d (%d built so far: the first version or a new architecture)",
                 manifest.version, self.models_built)
        self.record(policy, manifest)
        return policy

    def payload(self, policy, manifest: Manifest, fallback: Mapping[str, memoryview | bytearray]
                ) -> dict[str, memoryview | bytearray]:
        """The held version's bytes: views of ``policy``'s weights where it holds them, else ``fallback``'s."""
        views, digests = self.views(policy), self.digests(policy)
        return {e.name: views[e.name] if digests.get(e.name) == e.digest else fallback[e.name]
                for e in manifest.tensors}
