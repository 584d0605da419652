"""`m4oe serve` under stress: concurrent mixed-modality requests each get exactly their own result; adapters are
added, replaced and removed at run time; a hot swap under concurrent requests drops and misroutes nothing and every
answer names the adapter version that made it; malformed uploads, oversized bodies and hostile adapter files (the
fuzz tests' mutations) get a 4xx and leave the service and its adapters unchanged. Bounded loops, loopback only."""
from __future__ import annotations

import base64
import io
import json
import random
import struct
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from m4oe_adapters.prediction import predict_array

from serve_support import ADMIN, LiveServer, adapter_bytes, empty_service, random_adapters, random_png
from test_hostile_adapters import join as _join, split as _split  # the fuzz tests' file surgery

CLASSES = {"CT": 2, "MRI": 4, "xray": 3}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = random_adapters(CLASSES, resize=("xray",))
    folder = tmp_path_factory.mktemp("adapters")
    return model, {name: adapter_bytes(model, name, folder) for name in CLASSES}


def serving(files: dict[str, bytes], **settings) -> LiveServer:
    service = empty_service(**settings)
    for name, data in files.items():
        service.add_adapter(data, source=f"{name}.safetensors")
    return LiveServer(service)


def mask_of(answer: dict) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask"]["base64"]))))


# ------------------------------------------------------------------------------------------------- batching
def test_concurrent_mixed_modality_requests_share_batches_and_each_gets_its_own_result(reference):
    model, files = reference
    jobs = []  # (modality, png, expected mask): every image has its own size, so a swapped answer cannot pass
    for index in range(9):
        modality = list(CLASSES)[index % 3]
        data, raw = random_png(40 + 3 * index, 70 - 2 * index, seed=index)
        jobs.append((modality, data, predict_array(model, raw, modality, {"dtype": "uint8"})))
    with serving(files, max_batch=16, max_wait_ms=300) as live:
        barrier = threading.Barrier(len(jobs))

        def send(job):
            modality, data, _ = job
            with live.client() as client:
                barrier.wait(timeout=30)
                return client.post("/v1/segment", params={"modality": modality}, content=data)

        with ThreadPoolExecutor(len(jobs)) as pool:
            # Hold the model lock until tiles of several requests wait, so that a mixed batch surely forms.
            with live.service.batcher.lock:
                futures = [pool.submit(send, job) for job in jobs]
                deadline = time.monotonic() + 30  # well inside the clients' 60 s timeout, also on a loaded CPU
                while len(live.service.batcher._queue) < 4 and time.monotonic() < deadline:
                    time.sleep(0.01)
            responses = [future.result(timeout=120) for future in futures]
        with live.client() as client:
            metrics = client.get("/metrics").text
    for (modality, _, expected), response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        assert response.json()["modality"] == modality
        mask = mask_of(response.json())
        assert mask.shape == expected.shape
        # Batched and single forward passes may differ in the last float bits; a misrouted answer differs wholesale.
        assert (mask == expected).mean() > 0.99
    mixed = [line for line in metrics.splitlines() if line.startswith("m4oe_batch_modalities_bucket")]
    single = next(float(line.split()[-1]) for line in mixed if 'le="1.0"' in line)
    total = next(float(line.split()[-1]) for line in mixed if 'le="+Inf"' in line)
    assert total > single, "no forward pass held more than one modality"


# ------------------------------------------------------------------------------------------------- admin
def test_adapters_are_listed_added_replaced_and_removed_at_run_time(reference, tmp_path):
    model, files = reference
    other = random_adapters({"CT": 2}, seed=5)
    replacement = adapter_bytes(other, "CT", tmp_path)
    data, raw = random_png(64, 64, seed=1)
    with serving({"CT": files["CT"]}) as live, live.client() as client, live.client(ADMIN) as admin:
        first = client.post("/v1/segment", params={"modality": "CT"}, content=data).json()
        added = admin.put("/v1/admin/adapters/MRI", content=files["MRI"], params={"source": "MRI.safetensors"})
        assert added.status_code == 200 and added.json()["labels"] == model.modalities["MRI"].label_names
        assert [a["name"] for a in client.get("/v1/adapters").json()["adapters"]] == ["CT", "MRI"]
        conflict = admin.put("/v1/admin/adapters/CT", content=replacement)
        assert conflict.status_code == 409 and "replace" in conflict.json()["error"]
        swapped = admin.put("/v1/admin/adapters/CT", content=replacement, params={"replace": "true"})
        assert swapped.status_code == 200 and swapped.json()["version"] != first["adapter"]["version"]
        second = client.post("/v1/segment", params={"modality": "CT"}, content=data).json()
        assert second["adapter"]["version"] == swapped.json()["version"]
        np.testing.assert_array_equal(mask_of(second), predict_array(other, raw, "CT", {"dtype": "uint8"}))
        assert not np.array_equal(mask_of(first), mask_of(second))  # the replacement really answers
        assert admin.delete("/v1/admin/adapters/MRI").status_code == 200
        assert client.post("/v1/segment", params={"modality": "MRI"}, content=data).status_code == 422
        assert admin.delete("/v1/admin/adapters/MRI").status_code == 404
        assert len(live.service.model.modalities) == 1  # old versions are unloaded, not leaked


def test_an_adapter_can_be_served_under_another_name(reference):
    _, files = reference
    with serving({}) as live, live.client(ADMIN) as admin:
        response = admin.put("/v1/admin/adapters/CT-chest", content=files["CT"])
        assert response.status_code == 200
        data, _ = random_png(64, 64, seed=1)
        answer = admin.post("/v1/segment", params={"modality": "CT-chest"}, content=data).json()
        assert answer["modality"] == "CT-chest"


def test_hot_swap_under_concurrent_requests_drops_and_misroutes_nothing(reference, tmp_path):
    """Four clients send 10 requests each while the admin swaps the CT adapter back and forth four times."""
    model, files = reference
    versions = {"a": files["CT"], "b": adapter_bytes(random_adapters({"CT": 2}, seed=9), "CT", tmp_path)}
    other = random_adapters({"CT": 2}, seed=9)
    data, raw = random_png(90, 90, seed=3)
    expected = {"a": predict_array(model, raw, "CT", {"dtype": "uint8"}),
                "b": predict_array(other, raw, "CT", {"dtype": "uint8"})}
    assert (expected["a"] != expected["b"]).mean() > 0.05  # the two versions answer differently
    import hashlib

    version_of = {hashlib.sha256(blob).hexdigest()[:12]: key for key, blob in versions.items()}
    answers, stop = [], threading.Event()
    with serving({"CT": versions["a"], "MRI": files["MRI"]}, max_wait_ms=5) as live:

        def client_loop(index: int) -> list:
            out = []
            with live.client() as client:
                for _ in range(10):  # bounded
                    modality = "CT" if index % 4 else "MRI"
                    response = client.post("/v1/segment", params={"modality": modality}, content=data)
                    out.append((modality, response.status_code, response.json()))
            return out

        def swapper() -> int:
            swaps = 0
            with live.client(ADMIN) as admin:
                for key in "baba":
                    if stop.is_set():
                        break
                    response = admin.put("/v1/admin/adapters/CT", content=versions[key], params={"replace": "true"})
                    assert response.status_code == 200, response.text
                    swaps += 1
            return swaps

        with ThreadPoolExecutor(5) as pool:
            swapping = pool.submit(swapper)
            clients = [pool.submit(client_loop, index) for index in range(4)]
            for future in clients:
                answers += future.result(timeout=300)
            stop.set()
            swaps = swapping.result(timeout=60)
        slots = sorted(live.service.model.modalities)
    assert swaps >= 1
    assert len(answers) == 40
    assert all(status == 200 for _, status, _ in answers), [a for a in answers if a[1] != 200][:2]
    seen = set()
    for modality, _, answer in answers:
        assert answer["modality"] == modality
        if modality == "CT":
            key = version_of[answer["adapter"]["version"]]  # every answer names a version that was served
            seen.add(key)
            assert (mask_of(answer) == expected[key]).mean() > 0.99, "answer made by a version it does not name"
    assert seen  # at least one version observed (usually both)
    assert len(slots) == 2  # each retired version was unloaded after its last request


# ------------------------------------------------------------------------------------------------- hostile input
def _unchanged(live, data: bytes, before: dict) -> None:
    with live.client() as client:
        listing = client.get("/v1/adapters").json()["adapters"]
        answer = client.post("/v1/segment", params={"modality": "CT"}, content=data)
    assert [(a["name"], a["version"]) for a in listing] == before["listing"]
    assert answer.status_code == 200
    np.testing.assert_array_equal(mask_of(answer.json()), before["mask"])
    assert sorted(live.service.model.modalities) == before["slots"]


def _state(live, data: bytes) -> dict:
    with live.client() as client:
        listing = client.get("/v1/adapters").json()["adapters"]
        mask = mask_of(client.post("/v1/segment", params={"modality": "CT"}, content=data).json())
    return {"listing": [(a["name"], a["version"]) for a in listing], "mask": mask,
            "slots": sorted(live.service.model.modalities)}


def test_malformed_uploads_get_a_4xx_with_a_message_and_the_service_keeps_serving(reference):
    _, files = reference
    data, _ = random_png(64, 64, seed=1)
    zipped_text, traversal = io.BytesIO(), io.BytesIO()
    with zipfile.ZipFile(zipped_text, "w") as archive:
        archive.writestr("notes.txt", "not a DICOM file")
    with zipfile.ZipFile(traversal, "w") as archive:
        archive.writestr("../../../../tmp/evil.dcm", b"\0" * 128 + b"DICM" + b"\0" * 64)
    import nibabel

    four_d = nibabel.Nifti1Image(np.zeros((4, 4, 2, 2), np.float32), np.eye(4)).to_bytes()
    cases = {
        "text": (b"hello, this is not an image", 415),
        "truncated png": (data[: len(data) // 2], 400),
        "png header only": (data[:40], 400),
        "empty": (b"", 400),
        "zip of text": (zipped_text.getvalue(), 400),
        "zip path traversal, broken DICOM": (traversal.getvalue(), 400),
        "broken zip": (b"PK\x03\x04" + b"\0" * 100, 400),
        "4D NIfTI": (four_d, 400),
        "DICOM preamble, no dataset": (b"\0" * 128 + b"DICM" + b"\xff" * 50, 400),
    }
    with serving({"CT": files["CT"]}) as live:
        before = _state(live, data)
        with live.client() as client:
            for label, (body, status) in cases.items():
                response = client.post("/v1/segment", params={"modality": "CT"}, content=body)
                assert response.status_code == status, (label, response.status_code, response.text)
                assert response.json()["error"], label
        _unchanged(live, data, before)


def test_bodies_and_images_over_the_limits_get_413(reference):
    _, files = reference
    big, _ = random_png(300, 300, seed=1)
    with serving({"CT": files["CT"]}, max_body_bytes=len(big) - 1, max_pixels=200 * 200) as live:
        with live.client() as client:
            response = client.post("/v1/segment", params={"modality": "CT"}, content=big)
            assert response.status_code == 413 and "limit" in response.json()["error"]

            def chunks():  # no Content-Length: the limit applies while streaming
                for start in range(0, len(big), 1000):
                    yield big[start : start + 1000]

            response = client.post("/v1/segment", params={"modality": "CT"}, content=chunks())
            assert response.status_code == 413
            tall, _ = random_png(1000, 41, seed=2)  # small file, too many pixels
            response = client.post("/v1/segment", params={"modality": "CT"}, content=tall)
            assert response.status_code == 413 and "pixels" in response.json()["error"]
            small, _ = random_png(64, 64, seed=3)
            assert client.post("/v1/segment", params={"modality": "CT"}, content=small).status_code == 200


def hostile_adapters(valid: bytes, other_backbone: bytes) -> dict[str, bytes]:
    """Mutations of the fuzz tests (tests/test_hostile_adapters.py), made deterministically."""
    header, body = _split(valid)
    cases = {
        "empty": b"",
        "truncated header": valid[:20],
        "truncated data": valid[:-7],
        "padded": valid + b"\0" * 16,
        "huge header length": struct.pack("<Q", 2**62) + valid[8:],
        "pickle": b"\x80\x04\x95" + valid[3:],
        "zip (torch.save)": b"PK\x03\x04" + valid[4:],
        "not JSON": _join(b"{not json" + b" " * 20, body),
        "another backbone": other_backbone,
    }
    metadata = json.loads(header["__metadata__"]["m4oe"])
    for label, change in {
        "format version 99": ("format_version", 99),
        "bad modality name": ("modality", "../../etc"),
        "num_classes 0": ("num_classes", 0),
        "labels with escapes": ("label_names", ["background", "\x1b[2Jlesion"]),
        "bad input size": ("input_size", [1, 10**9]),
    }.items():
        document = dict(metadata)
        document[change[0]] = change[1]
        mutated = dict(header)
        mutated["__metadata__"] = {**header["__metadata__"], "m4oe": json.dumps(document)}
        cases[label] = _join(mutated, body)
    nan_body = bytearray(body)
    nan_body[0:4] = struct.pack("<f", float("nan"))
    cases["NaN tensor"] = _join(header, bytes(nan_body))
    shifted = {key: (dict(value, data_offsets=[value["data_offsets"][0] + 4, value["data_offsets"][1] + 4])
                     if key != "__metadata__" else value) for key, value in header.items()}
    cases["overlapping offsets"] = _join(shifted, body)
    generator = random.Random(15)
    for index in range(20):  # random byte flips in the header
        blob = bytearray(valid)
        position = generator.randrange(8, 8 + struct.unpack("<Q", valid[:8])[0])
        blob[position] = generator.randrange(256)
        cases[f"header byte flip {index}"] = bytes(blob)
    return cases


def test_hostile_adapter_files_sent_to_the_admin_endpoint_get_a_4xx_and_change_nothing(reference, tmp_path):
    from m4oe_adapters import ExpertConfig, SegmentationModel
    from conftest import tiny_backbone

    _, files = reference
    foreign = SegmentationModel(tiny_backbone(seed=3), ExpertConfig(rank=4))
    foreign.add_modality("CT", 2, input_size=(64, 64))
    other_backbone = adapter_bytes(foreign.eval(), "CT", tmp_path)
    cases = hostile_adapters(files["CT"], other_backbone)
    data, _ = random_png(64, 64, seed=1)
    refused = 0
    with serving({"CT": files["CT"], "MRI": files["MRI"]}) as live:
        before = _state(live, data)
        with live.client(ADMIN) as admin:
            for label, blob in cases.items():
                for replace in ("false", "true"):
                    response = admin.put("/v1/admin/adapters/CT", content=blob, params={"replace": replace})
                    if response.status_code == 200:  # a harmless flip (e.g. inside a label): it loads, put it back
                        admin.put("/v1/admin/adapters/CT", content=files["CT"], params={"replace": "true"})
                        continue
                    assert 400 <= response.status_code < 500, (label, response.status_code, response.text)
                    assert response.json()["error"], label
                    refused += 1
        after = _state(live, data)
    assert refused >= 2 * 15
    assert after["listing"] == before["listing"]  # same names, same versions
    np.testing.assert_array_equal(after["mask"], before["mask"])
    assert len(after["slots"]) == 2  # nothing half-loaded left in the model
