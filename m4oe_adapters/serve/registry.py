"""The served adapter set: which adapter file answers for each modality name, with hot swap.

A modality name the clients use (``fundus``) points at a *slot*, the modality's name inside the one model. Adding or
replacing an adapter:

1. reads and validates the file (:func:`~m4oe_adapters.adapter_file.read_adapter`: header, metadata, finite
   tensors) and checks it fits the backbone (:func:`~m4oe_adapters.adapter_file.check_compatible`), with no lock
   held and the model untouched — a refused file changes nothing;
2. loads it into a *new* slot of the model (a temporary name when the modality is already served), under the model
   lock, i.e. between two batches;
3. points the name at the new slot in one assignment. Requests that started before keep the slot they acquired (so
   every tile of one request goes through one adapter version); the old slot is removed when its last request ends.

No request ever sees a half-loaded adapter, and none is dropped: a request acquires a complete slot or none.
Every :class:`AdapterVersion` carries the sha256 of its file, which each response names.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from ..adapter_file import DTYPES, check_compatible, read_adapter
from ..config import check_modality_name
from ..errors import AdapterFormatError
from ..model import ModalityInfo, SegmentationModel
from ..signatures import SIGNATURE_PREFIX, ImageSignature  # routing signatures are kept with their slot
from .errors import AdapterConflict, AdapterNotFound, UnknownModality

VERSION_DIGITS = 12  # hex digits of the sha256 shown as an adapter's version


@dataclass(frozen=True)
class AdapterVersion:
    """One loaded adapter file.

    Attributes:
        name: the modality name clients use.
        slot: the modality's name inside the model (``name``, or ``name--sN`` while another version is served).
        sha256: of the adapter file's bytes; ``version`` is its first 12 hex digits.
        source: file name (or ``<upload>``) it came from.
        size_bytes: size of the file.
        info: labels, preset, input size, provenance of the modality.
        load_seconds: validation + loading time.
    """

    name: str
    slot: str
    sha256: str
    source: str
    size_bytes: int
    info: ModalityInfo
    loaded_at: float
    load_seconds: float

    @property
    def version(self) -> str:
        return self.sha256[:VERSION_DIGITS]

    def describe(self) -> dict[str, Any]:
        """The JSON a client sees for this adapter."""
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "file": self.source,
            "size_bytes": self.size_bytes,
            "labels": list(self.info.label_names),
            "input_size": list(self.info.input_size),
            "resize_mode": self.info.provenance.get("resize_mode", "crop"),
            "load_seconds": round(self.load_seconds, 4),
        }


class AdapterRegistry:
    """Served modality names → loaded adapter versions, over one :class:`SegmentationModel`.

    Args:
        model: the model every adapter is loaded into (its backbone is shared).
        model_lock: the lock every forward of ``model`` holds (:attr:`MicroBatcher.lock`).
        on_change: called with the number of served adapters after every change (metrics).
        keep_dtype: hold each adapter in its file's dtype (fp16 files: half the memory, the same masks) with its
            decoder packed in one buffer (see :meth:`~m4oe_adapters.model.SegmentationModel.add_modality`).
    """

    def __init__(self, model: SegmentationModel, model_lock, on_change: Callable[[int], None] | None = None,
                 keep_dtype: bool = True) -> None:
        self.model = model
        self.keep_dtype = keep_dtype
        self.model_lock = model_lock
        self._on_change = on_change
        self._current: dict[str, AdapterVersion] = {}
        self._by_slot: dict[str, AdapterVersion] = {}
        self._users: Counter[str] = Counter()
        self._retired: set[str] = set()
        self._lock = threading.Lock()  # the tables above
        self._admin = threading.Lock()  # one add/replace/remove at a time
        self._counter = 0

    # ------------------------------------------------------------------------------------------- reading
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._current)

    def list(self) -> list[AdapterVersion]:
        with self._lock:
            return [self._current[name] for name in sorted(self._current)]

    def get(self, name: str) -> AdapterVersion | None:
        with self._lock:
            return self._current.get(name)

    def by_slot(self, slot: str) -> AdapterVersion | None:
        """The adapter version a model modality belongs to (retired ones included, while still loaded)."""
        with self._lock:
            return self._by_slot.get(slot)

    def __len__(self) -> int:
        with self._lock:
            return len(self._current)

    # ------------------------------------------------------------------------------------------- requests
    def acquire(self, name: str) -> AdapterVersion:
        """The adapter now serving ``name``, kept loaded until :meth:`release`.

        Raises:
            UnknownModality: ``name`` is not served (422).
        """
        with self._lock:
            version = self._current.get(name)
            if version is None:
                served = ", ".join(sorted(self._current)) or "none"
                raise UnknownModality(f"modality {name!r} is not loaded (loaded: {served}); load its adapter first")
            self._users[version.slot] += 1
            return version

    def release(self, version: AdapterVersion) -> None:
        with self._lock:
            self._users[version.slot] -= 1
            drop = self._users[version.slot] <= 0 and version.slot in self._retired
            if self._users[version.slot] <= 0:
                del self._users[version.slot]
        if drop:
            self._unload(version.slot)

    # ------------------------------------------------------------------------------------------- changes
    def add(self, data: bytes, *, source: str, name: str | None = None, replace: bool = False) -> AdapterVersion:
        """Validate an adapter file's bytes and serve it as ``name`` (default: the file's modality).

        Raises:
            AdapterFormatError: the file is not a valid adapter (nothing changed).
            BackboneMismatchError: it was made for another backbone (nothing changed).
            AdapterConflict: ``name`` is served already and ``replace`` is false.
        """
        start = time.perf_counter()
        metadata, tensors = read_adapter(data, source)  # no lock: a refused file never touches the model
        check_compatible(self.model, metadata, tensors, source)
        # Loading into a slot mirrors load_adapter (add_modality + set_modality_tensors); a tensor kind that
        # load_adapter learns later must not be dropped here without a word.
        signed = metadata.get("routing") is not None
        placed = set(self.model.expected_tensor_shapes(metadata["num_classes"]))
        if signed:  # the routing signature is attached to the slot like load_adapter does
            placed |= {key for key in tensors if key.startswith(SIGNATURE_PREFIX)}
        unknown = set(tensors) - placed
        if unknown:
            raise AdapterFormatError(
                f"{source}: this service cannot place tensors {sorted(unknown)[:3]} in a served slot; update "
                "m4oe_adapters/serve/registry.py to load them as load_adapter does"
            )
        name = check_modality_name(name or metadata["modality"])
        sha256 = hashlib.sha256(data).hexdigest()
        with self._admin:
            if name in self._current and not replace:
                raise AdapterConflict(
                    f"{source}: modality {name!r} is already served (version {self._current[name].version}); "
                    "replace it (PUT) or remove it first"
                )
            slot = self._free_slot(name)
            with self.model_lock:  # between two batches
                info = self.model.add_modality(
                    slot, metadata["num_classes"], metadata["label_names"], preset=metadata["preset"],
                    input_size=metadata["input_size"], dtype=DTYPES[metadata["dtype"]] if self.keep_dtype else None,
                    packed=self.keep_dtype,
                )
                try:
                    self.model.set_modality_tensors(slot, tensors)
                    if signed:
                        self.model.set_signature(slot, ImageSignature.from_file(metadata["routing"], tensors))
                except BaseException:
                    self.model.remove_modality(slot)  # drops the slot's signature too
                    raise
                info.provenance = dict(metadata.get("provenance", {}))
                info.metrics = dict(metadata.get("metrics", {}))
            version = AdapterVersion(name, slot, sha256, source, len(data), info, time.time(),
                                     time.perf_counter() - start)
            with self._lock:
                previous = self._current.get(name)
                self._current[name] = version
                self._by_slot[slot] = version
                drop = previous is not None and self._retire(previous)
            if drop:
                self._unload(previous.slot)
        self._changed()
        return version

    def remove(self, name: str) -> AdapterVersion:
        """Stop serving ``name``; its slot is unloaded once the requests using it end.

        Raises:
            AdapterNotFound: ``name`` is not served.
        """
        with self._admin:
            with self._lock:
                version = self._current.pop(name, None)
                if version is None:
                    raise AdapterNotFound(f"modality {name!r} is not served (served: {sorted(self._current)})")
                drop = self._retire(version)
            if drop:
                self._unload(version.slot)
        self._changed()
        return version

    def _retire(self, version: AdapterVersion) -> bool:
        """Mark a slot for removal (registry lock held); true when no request uses it, so it can go now."""
        self._retired.add(version.slot)
        return self._users[version.slot] <= 0

    def _unload(self, slot: str) -> None:
        with self.model_lock:
            if slot in self.model.modalities:
                self.model.remove_modality(slot)
        with self._lock:
            self._retired.discard(slot)
            self._by_slot.pop(slot, None)

    def _free_slot(self, name: str) -> str:
        """``name`` if the model has no such modality, else ``name--sN`` (a name never used before)."""
        if name not in self.model.modalities:
            return name
        while True:
            self._counter += 1
            slot = f"{name[:52]}--s{self._counter}"
            if slot not in self.model.modalities:
                return slot

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(len(self))
