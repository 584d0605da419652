"""`m4oe serve --watch`: the service serves what a folder holds. New, changed and deleted files are acted on once
their size and time have settled; a refused file (hostile, truncated, a name served from elsewhere) changes nothing
and says why; files loaded at start are not loaded twice. Scans are called directly (no sleeping on timers)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from m4oe_adapters.prediction import predict_array
from m4oe_adapters.serve.watch import FolderWatcher

from serve_support import ADMIN, LiveServer, adapter_bytes, empty_service, random_adapters, random_png
from test_serve_safety import hostile_adapters

CLASSES = {"CT": 2, "MRI": 4}


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two models of the same modalities with different weights (version 1 and version 2 of each adapter)."""
    folder = tmp_path_factory.mktemp("adapters")
    models = [random_adapters(CLASSES, seed=seed) for seed in (0, 1)]
    return models, [{name: adapter_bytes(model, name, folder) for name in CLASSES} for model in models]


def watching(folder) -> tuple:
    """A service watching ``folder``, and its watcher (whose thread never fires: the tests scan)."""
    service = empty_service()
    return service, service.watch(folder, interval_s=3600)


@pytest.fixture
def watched(tmp_path):
    """:func:`watching` ``tmp_path``, the service closed afterwards."""
    service, watcher = watching(tmp_path)
    yield service, watcher
    service.close()


def write(path, data: bytes, stamp_ns: int | None = None) -> None:
    path.write_bytes(data)
    if stamp_ns is not None:  # a distinct modification time, whatever the file system's clock resolution
        os.utime(path, ns=(stamp_ns, stamp_ns))


def served(service) -> dict[str, str]:
    return {version.name: version.sha256 for version in service.registry.list()}


def sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_a_new_file_is_served_once_settled_and_a_changed_one_is_hot_swapped(versions, tmp_path, watched):
    models, files = versions
    service, watcher = watched
    write(tmp_path / "ct.safetensors", files[0]["CT"], 10**18)
    watcher.scan()
    assert served(service) == {}, "a file seen once may still be being copied: not read yet"
    watcher.scan()
    assert served(service) == {"CT": sha(files[0]["CT"])}
    write(tmp_path / "ct.safetensors", files[1]["CT"], 2 * 10**18)
    watcher.scan()
    assert served(service) == {"CT": sha(files[0]["CT"])}
    watcher.scan()
    assert served(service) == {"CT": sha(files[1]["CT"])}
    _, raw = random_png(64, 64, seed=4)
    answer = service.segment(_png(raw), modality="CT")
    assert answer.info["adapter"]["sha256"] == sha(files[1]["CT"])
    np.testing.assert_array_equal(answer.masks[0], predict_array(models[1], raw, "CT"))
    assert len(service.model.modalities) == 1, "the old version's slot is unloaded"


def test_a_file_still_being_copied_is_not_read_and_a_deleted_file_stops_being_served(versions, tmp_path, watched):
    _, files = versions
    service, watcher = watched
    data = files[0]["MRI"]
    path = tmp_path / "mri.safetensors"
    write(path, data[: len(data) // 3], 10**18)
    watcher.scan()
    write(path, data[: 2 * len(data) // 3], 2 * 10**18)  # grew since the last scan: still being copied
    watcher.scan()
    assert served(service) == {} and watcher.state()["files"] == {}, "nothing read, nothing refused"
    write(path, data, 3 * 10**18)
    watcher.scan()
    watcher.scan()
    assert served(service) == {"MRI": sha(data)}
    (tmp_path / ".mri.safetensors.tmp").write_bytes(b"half")  # a temporary file of an atomic copy: ignored
    path.unlink()
    watcher.scan()
    assert served(service) == {} and len(service.model.modalities) == 0
    assert watcher.state()["files"] == {}


def test_hostile_files_in_the_folder_change_nothing_and_say_why(versions, tmp_path):
    from m4oe_adapters import ExpertConfig, SegmentationModel

    from conftest import tiny_backbone

    _, files = versions
    foreign = SegmentationModel(tiny_backbone(seed=3), ExpertConfig(rank=4))
    foreign.add_modality("CT", 2, input_size=(64, 64))
    cases = hostile_adapters(files[0]["CT"], adapter_bytes(foreign.eval(), "CT", tmp_path.parent))
    folder = tmp_path / "watched"
    folder.mkdir()
    service, watcher = watching(folder)
    try:
        path = folder / "ct.safetensors"
        write(path, files[0]["CT"], 10**18)
        watcher.scan()
        watcher.scan()
        good = sha(files[0]["CT"])
        refused = 0
        for index, (label, blob) in enumerate(cases.items()):
            write(path, blob, (index + 2) * 10**18)
            watcher.scan()
            watcher.scan()
            entry = watcher.state()["files"]["ct.safetensors"]
            if entry["refused"] is None:  # a harmless flip (e.g. inside a label) loads: it is then the file's CT
                assert served(service)["CT"] == sha(blob), label
                write(path, files[0]["CT"], (index + 2) * 10**18 + 1)
                watcher.scan()
                watcher.scan()
                continue
            refused += 1
            assert served(service) == {"CT": good}, label  # the version served before stays
            assert entry["modality"] == "CT" and entry["serving"] == good[:12] and entry["refused"], label
        assert refused >= 15
        assert len(service.model.modalities) == 1, "nothing half-loaded left in the model"
        write(path, files[1]["CT"], 10**19)  # a good file again: served
        watcher.scan()
        watcher.scan()
        assert served(service) == {"CT": sha(files[1]["CT"])}
        assert watcher.state()["files"]["ct.safetensors"]["refused"] is None
    finally:
        service.close()


def test_a_second_file_claiming_a_served_name_is_refused_and_deleting_it_leaves_the_first(versions, tmp_path, watched):
    _, files = versions
    service, watcher = watched
    write(tmp_path / "a.safetensors", files[0]["CT"], 10**18)
    write(tmp_path / "b.safetensors", files[1]["CT"], 10**18)
    watcher.scan()
    watcher.scan()
    assert served(service) == {"CT": sha(files[0]["CT"])}  # files are taken in name order
    state = watcher.state()["files"]
    assert "already served from a.safetensors" in state["b.safetensors"]["refused"]
    (tmp_path / "b.safetensors").unlink()
    watcher.scan()
    assert served(service) == {"CT": sha(files[0]["CT"])}


def test_files_served_at_start_are_adopted_not_loaded_again(versions, tmp_path):
    from m4oe_adapters.serve import ServeSettings, Service

    _, files = versions
    for name, data in files[0].items():
        (tmp_path / f"{name}.safetensors").write_bytes(data)
    service = Service.from_adapters(sorted(tmp_path.glob("*.safetensors")), "none",
                                    ServeSettings(device="cpu", watch=str(tmp_path), watch_interval_s=3600))
    try:
        before = {version.name: version for version in service.registry.list()}
        assert set(before) == set(CLASSES) and service.watcher is not None
        service.watcher.scan()
        service.watcher.scan()
        assert {v.name: v for v in service.registry.list()} == before  # the same version objects
        assert all(v.slot == v.name for v in before.values())
        (tmp_path / "CT.safetensors").unlink()  # and they are watched like any other
        service.watcher.scan()
        assert served(service) == {"MRI": sha(files[0]["MRI"])}
    finally:
        service.close()


def test_the_adapter_listing_shows_the_watched_folder_and_a_request_after_a_change_uses_the_new_file(
        versions, tmp_path):
    models, files = versions
    service, watcher = watching(tmp_path)
    with LiveServer(service) as live, live.client() as client:
        write(tmp_path / "mri.safetensors", files[1]["MRI"], 10**18)
        write(tmp_path / "junk.safetensors", b"not an adapter", 10**18)
        watcher.scan()
        watcher.scan()
        listing = client.get("/v1/adapters").json()
        assert [a["name"] for a in listing["adapters"]] == ["MRI"]
        assert listing["watch"]["folder"] == str(tmp_path)
        assert listing["watch"]["files"]["mri.safetensors"]["serving"] == sha(files[1]["MRI"])[:12]
        assert listing["watch"]["files"]["junk.safetensors"]["refused"]
        data, raw = random_png(64, 64, seed=5)
        answer = client.post("/v1/segment", params={"modality": "MRI"}, content=data).json()
        assert answer["adapter"]["file"] == "mri.safetensors"
        assert client.get("/v1/adapters", headers=ADMIN).status_code == 200


def test_watch_without_a_folder_needs_a_zoo(tmp_path):
    import argparse

    from m4oe_adapters.commands.serve import settings_from
    from m4oe_adapters.errors import ConfigError

    args = dict(max_batch=8, max_wait_ms=10.0, max_body_mb=64.0, max_megapixels=50.0, max_in_flight=64,
                device="cpu", widen_adapters=False, watch_interval=2.0)
    assert settings_from(argparse.Namespace(zoo=str(tmp_path), adapter=None, watch="", **args)).watch == str(tmp_path)
    with pytest.raises(ConfigError, match="name the folder"):
        settings_from(argparse.Namespace(zoo=None, adapter=["a.safetensors"], watch="", **args))
    with pytest.raises(ConfigError, match="no such folder"):
        FolderWatcher(empty_service(), tmp_path / "missing")


def _png(raw: np.ndarray) -> bytes:
    from serve_support import png_bytes

    return png_bytes(raw[0].astype(np.uint8))
