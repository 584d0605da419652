"""A watched adapter folder: the service serves what the folder holds, so every replica that watches the same
(shared) folder converges to the same adapters without an admin call per replica.

Every ``interval_s`` seconds the folder's ``*.safetensors`` files (names starting with ``.`` are ignored: temporary
files of an atomic copy) are listed with their size and modification time:

* a new or changed file is loaded once its size and time have stayed the same for one more scan (a file still being
  copied is not read half-written), through :meth:`~.service.Service.add_adapter`: validated with no lock held,
  then served under its header's modality name — a hot swap when the file already served that name;
* a file that was refused (not an adapter, another backbone, a name another source serves) changes nothing: the
  version served before stays, the reason is logged and listed (:meth:`FolderWatcher.state`), and the file is not
  read again until it changes;
* a deleted file stops serving its name, unless that name has been taken over since by another source.

Files the service loaded from the folder when it started (``m4oe serve --zoo FOLDER --watch``) are recognised by
their sha256 and not loaded again. Adapters added through the admin endpoint are left alone unless a file of the
folder claims their name (then that file is refused: the name is served already).
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter_header import read_header

if TYPE_CHECKING:
    from .service import Service

LOG = logging.getLogger("m4oe.serve")


@dataclass
class WatchedFile:
    """What the watcher knows of one file: the stamp it last acted on, and what that gave."""

    stamp: tuple[int, int]  # (size, mtime_ns)
    sha256: str = ""  # of the bytes last read
    name: str | None = None  # the modality name this file serves (None: never served)
    served: str = ""  # sha256 of the version this file put into service under ``name``
    refused: str | None = None  # why the bytes last read were not served


class FolderWatcher:
    """Keeps a service's adapters in step with a folder (see the module docstring).

    Args:
        service: the service to change.
        folder: the folder to watch (it must exist).
        interval_s: seconds between two scans.
    """

    def __init__(self, service: "Service", folder: str | Path, interval_s: float = 2.0) -> None:
        self.service = service
        self.folder = Path(folder)
        if not self.folder.is_dir():
            from ..errors import ConfigError

            raise ConfigError(f"--watch {self.folder}: no such folder; create it or give the folder of your adapters")
        self.interval_s = float(interval_s)
        self._files: dict[str, WatchedFile] = {}
        self._pending: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one scan at a time
        self.scans = 0

    # ------------------------------------------------------------------------------------------- running
    def start(self) -> "FolderWatcher":
        """Take a first look at the folder now, then one every ``interval_s`` seconds in a daemon thread."""
        self.scan()
        self._thread = threading.Thread(target=self._run, name="m4oe-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.scan()
            except Exception as error:  # a scan must never stop the watching (the folder may come back)
                _log("watch_error", folder=str(self.folder), error=f"{type(error).__name__}: {error}")

    # ------------------------------------------------------------------------------------------- one scan
    def scan(self) -> None:
        """Look at the folder once and act on the files whose stamp changed and then stayed the same since the
        previous look (a file is read one interval after it last changed, not while it is being written)."""
        with self._lock:
            present = self._listing()
            for key, stamp in sorted(present.items()):
                known = self._files.get(key)
                if known is not None and known.stamp == stamp:
                    self._pending.pop(key, None)
                    continue
                if self._pending.get(key) != stamp:
                    self._pending[key] = stamp  # seen for the first time with this stamp: wait one scan
                    continue
                self._pending.pop(key, None)
                self._load(key, stamp, known)
            for key in sorted(set(self._files) - set(present)):
                self._forget(key, self._files.pop(key))
            for key in set(self._pending) - set(present):
                del self._pending[key]
            self.scans += 1

    def _listing(self) -> dict[str, tuple[int, int]]:
        found = {}
        for path in self.folder.glob("*.safetensors"):
            if path.name.startswith("."):
                continue
            try:
                status = path.stat()
            except OSError:  # removed between the listing and the stat
                continue
            found[path.name] = (status.st_size, status.st_mtime_ns)
        return found

    def _load(self, key: str, stamp: tuple[int, int], known: WatchedFile | None) -> None:
        from .errors import AdapterConflict

        known = known or WatchedFile(stamp)
        try:
            data = (self.folder / key).read_bytes()
        except OSError as error:  # removed or unreadable since the listing: tried again when its stamp changes
            self._files[key] = WatchedFile(stamp, known.sha256, known.name, known.served, f"unreadable: {error}")
            return
        sha256 = hashlib.sha256(data).hexdigest()
        if sha256 == known.sha256:  # touched, same bytes: same outcome as before
            self._files[key] = WatchedFile(stamp, sha256, known.name, known.served, known.refused)
            return
        served = {version.name: version for version in self.service.registry.list()}
        adopted = next((v for v in served.values() if v.sha256 == sha256 and v.source == key), None)
        if adopted is not None and known.name is None:  # loaded from this very file when the service started
            self._files[key] = WatchedFile(stamp, sha256, adopted.name, sha256)
            return
        try:
            name = read_header(data, key)[0]["modality"]
            if name in served and name != known.name:
                raise AdapterConflict(f"{key}: modality {name!r} is already served from {served[name].source} "
                                      f"(version {served[name].version}); remove that one first or change the "
                                      "file's modality")
            version = self.service.add_adapter(data, source=key, name=name, replace=name in served)
        except Exception as error:  # refused: what was served before stays; said in the log and in state()
            self._files[key] = WatchedFile(stamp, sha256, known.name, known.served, str(error))
            _log("watch_refused", file=key, error=str(error))
            return
        if known.name is not None and known.name != name and self._serves(known):
            self.service.remove_adapter(known.name)  # the file now holds another modality
        self._files[key] = WatchedFile(stamp, sha256, name, version.sha256)
        _log("watch_loaded", file=key, modality=name, version=version.version,
             action="replace" if name in served else "add")

    def _forget(self, key: str, known: WatchedFile) -> None:
        if not self._serves(known):
            return
        try:
            version = self.service.remove_adapter(known.name)
        except Exception as error:  # removed meanwhile by an admin call
            _log("watch_refused", file=key, error=str(error))
            return
        _log("watch_removed", file=key, modality=known.name, version=version.version)

    def _serves(self, known: WatchedFile) -> bool:
        """Whether the name this file put into service still serves that version (not taken over since)."""
        version = self.service.registry.get(known.name) if known.name is not None else None
        return version is not None and version.sha256 == known.served

    # ------------------------------------------------------------------------------------------- reporting
    def state(self) -> dict[str, Any]:
        """JSON-able: the folder, the scans so far, each file's served name or the reason it was refused."""
        with self._lock:
            return {
                "folder": str(self.folder), "interval_s": self.interval_s, "scans": self.scans,
                "files": {key: {"modality": entry.name, "serving": entry.served[:12] or None,
                                "refused": entry.refused}
                          for key, entry in sorted(self._files.items())},
                "waiting": sorted(self._pending),
            }


def _log(event: str, **fields: Any) -> None:
    LOG.info(json.dumps({"ts": round(time.time(), 3), "event": event, **fields}, sort_keys=True))
