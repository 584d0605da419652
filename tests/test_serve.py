"""`m4oe serve`: a real HTTP client against a live server on a free loopback port sends PNG, NIfTI, DICOM files and
zipped DICOM series and gets back masks in the input's format equal to in-process prediction; tokens, OpenAPI,
health, metrics, logs, the unknown-modality 422 and the Ray Serve wrapping. Tiny random models, made here."""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import subprocess
import sys
import time
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest

from m4oe_adapters.data import read_image
from m4oe_adapters.prediction import predict_array

from serve_support import (
    ADMIN,
    AUTH,
    TOKENS,
    LiveServer,
    adapter_bytes,
    dicom_bytes,
    dicom_series,
    empty_service,
    random_adapters,
    random_png,
)

CLASSES = {"CT": 2, "MRI": 4}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process model (the ground truth) and its adapter files' bytes."""
    model = random_adapters(CLASSES, resize=("MRI",))
    folder = tmp_path_factory.mktemp("adapters")
    return model, {name: adapter_bytes(model, name, folder) for name in CLASSES}


@pytest.fixture
def server(reference):
    _, files = reference
    service = empty_service(max_wait_ms=20)
    for name, data in files.items():
        service.add_adapter(data, source=f"{name}.safetensors")
    with LiveServer(service) as live:
        yield live


def mask_of(answer: dict) -> bytes:
    return base64.b64decode(answer["mask"]["base64"])


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


# ------------------------------------------------------------------------------------------------- formats
def test_png_upload_returns_a_png_mask_of_the_same_size_equal_to_in_process_prediction(server, reference):
    model, _ = reference
    data, raw = random_png(150, 97, seed=1)  # sliding windows (CT: crop) over a non-square image
    with server.client() as client:
        for modality in CLASSES:
            response = client.post("/v1/segment", params={"modality": modality}, content=data)
            assert response.status_code == 200, response.text
            answer = response.json()
            mask = decode_png(mask_of(answer))
            assert mask.shape == (150, 97)
            expected = predict_array(model, raw, modality, {"dtype": "uint8"})
            np.testing.assert_array_equal(mask, expected)
            assert answer["modality"] == modality and answer["labels"] == model.modalities[modality].label_names
            assert answer["adapter"]["version"] == answer["adapter"]["sha256"][:12]
            assert answer["backbone"]["fingerprint"] == model.backbone.fingerprint()
            assert answer["routing"]["by"] == "request"
            assert set(answer["timings_ms"]) >= {"decode_ms", "predict_ms", "encode_ms"}



def test_a_threshold_query_gives_the_mask_predict_gives_for_two_classes_and_is_checked(server, reference):
    """`?threshold=T` or `?threshold=otsu`: the mask of `predict --threshold` for a two-class adapter, the most
    probable class for an adapter of more classes (the answer says which was applied); a bad value is a 400."""
    model, _ = reference
    data, raw = random_png(150, 97, seed=1)
    with server.client() as client:
        for modality, threshold in (("CT", "0.05"), ("CT", "otsu"), ("MRI", "0.05")):
            response = client.post("/v1/segment", params={"modality": modality, "threshold": threshold}, content=data)
            assert response.status_code == 200, response.text
            answer = response.json()
            applied = (float(threshold) if threshold != "otsu" else "otsu") if modality == "CT" else None
            assert answer["threshold"] == applied
            expected = predict_array(model, raw, modality, {"dtype": "uint8"}, threshold=applied)
            np.testing.assert_array_equal(decode_png(mask_of(answer)), expected)
        plain = decode_png(mask_of(client.post("/v1/segment", params={"modality": "CT"}, content=data).json()))
        low = predict_array(model, raw, "CT", {"dtype": "uint8"}, threshold=0.05)
        assert (low > 0).sum() > (plain > 0).sum()  # the threshold changed the mask
        response = client.post("/v1/segment", params={"modality": "CT", "threshold": "1.5"}, content=data)
        assert response.status_code == 400 and "strictly between 0 and 1" in response.json()["error"]

def test_nifti_upload_returns_a_nifti_mask_with_the_same_affine_and_shape(server, reference):
    import nibabel

    model, _ = reference
    generator = np.random.default_rng(3)
    volume = np.kron(generator.random((5, 4, 3)), np.ones((8, 8, 1))).astype(np.float32) * 800 - 200
    affine = np.array([[0.7, 0, 0, -10], [0, 0.8, 0, 5], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    data = nibabel.Nifti1Image(volume, affine).to_bytes()
    with server.client() as client:
        response = client.post("/v1/segment", params={"modality": "CT"}, content=data)
    assert response.status_code == 200, response.text
    result = nibabel.Nifti1Image.from_bytes(mask_of(response.json()))
    assert result.shape == volume.shape
    np.testing.assert_allclose(result.affine, affine)
    for index in range(volume.shape[2]):
        expected = predict_array(model, volume[None, :, :, index], "CT", {"dtype": "float32"})
        np.testing.assert_array_equal(np.asarray(result.dataobj)[:, :, index], expected)


def test_dicom_file_returns_a_dicom_seg_whose_frames_equal_the_mask(server, reference):
    import highdicom as hd
    import pydicom

    model, _ = reference
    dataset = dicom_series(1, seed=4)[0]
    data = dicom_bytes(dataset)
    with server.client() as client:
        response = client.post("/v1/segment", params={"modality": "MRI"}, content=data)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["mask"]["media_type"] == "application/dicom"
    segmentation = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(mask_of(answer))))
    labelmap = segmentation.get_pixels_by_source_instance(
        source_sop_instance_uids=[dataset.SOPInstanceUID], combine_segments=True, skip_overlap_checks=True
    )[0]
    record = read_image(_write(dataset))
    expected = predict_array(model, record.array, "MRI", record.meta)
    assert expected.max() > 0  # a mask with foreground, or the comparison would be vacuous
    np.testing.assert_array_equal(labelmap, expected)
    assert [s.segment_label for s in segmentation.SegmentSequence] == model.modalities["MRI"].label_names[1:]
    assert segmentation.SeriesInstanceUID != dataset.SeriesInstanceUID


def test_zipped_dicom_series_returns_one_seg_referencing_every_instance_in_slice_order(server, reference):
    import highdicom as hd
    import pydicom

    model, _ = reference
    datasets = dicom_series(3, seed=5)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index in (2, 0, 1):  # not in slice order: the service sorts along the slice normal
            archive.writestr(f"series/IM{index}.dcm", dicom_bytes(datasets[index]))
    with server.client() as client:
        response = client.post("/v1/segment", params={"modality": "CT"}, content=buffer.getvalue())
    assert response.status_code == 200, response.text
    segmentation = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(mask_of(response.json()))))
    uids = [d.SOPInstanceUID for d in datasets]
    labelmaps = segmentation.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                                           skip_overlap_checks=True)
    for dataset, labelmap in zip(datasets, labelmaps):
        record = read_image(_write(dataset))
        np.testing.assert_array_equal(labelmap, predict_array(model, record.array, "CT", record.meta))
    referenced = {item.ReferencedSOPInstanceUID for series in segmentation.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence}
    assert referenced == set(uids)


def test_a_dicom_modality_tag_naming_a_served_adapter_chooses_it(server):
    dataset = dicom_series(1, seed=6)[0]  # Modality CT
    with server.client() as client:
        answer = client.post("/v1/segment", content=dicom_bytes(dataset)).json()
    assert answer["modality"] == "CT" and answer["routing"]["by"] == "dicom tag"


def _write(dataset) -> str:
    import tempfile

    handle, path = tempfile.mkstemp(suffix=".dcm")
    os.close(handle)
    dataset.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------------------------------------- modality
def test_an_unknown_modality_name_gets_422_not_a_mask(server):
    data, _ = random_png(64, 64, seed=2)
    with server.client() as client:
        response = client.post("/v1/segment", params={"modality": "ultrasound"}, content=data)
    assert response.status_code == 422
    assert "ultrasound" in response.json()["error"] and "CT" in response.json()["error"]


def test_without_a_modality_and_without_a_router_the_answer_is_a_clear_422(server):
    data, _ = random_png(64, 64, seed=2)
    with server.client() as client:
        response = client.post("/v1/segment", content=data)
    assert response.status_code == 422
    assert "modality" in response.json()["error"]


def test_the_router_is_given_the_raw_image_and_its_decision_is_reported(server, monkeypatch):
    """Without a modality the service asks ``SegmentationModel.route`` with the image as read."""
    service = server.service
    calls = []

    def route(self, images, min_confidence=None):
        calls.append(images[0].shape)
        return [SimpleNamespace(modality="MRI", confidence=0.7, scores={"MRI": 0.7, "CT": 0.1})]

    monkeypatch.setattr(type(service.model), "route", route, raising=False)
    data, _ = random_png(64, 72, seed=4)
    with server.client() as client:
        answer = client.post("/v1/segment", content=data).json()
    assert calls == [(1, 64, 72)]  # the raw image as read, not preprocessed
    assert answer["modality"] == "MRI" and answer["routing"] == {"by": "router", "confidence": 0.7,
                                                                  "scores": {"MRI": 0.7, "CT": 0.1}}


def test_a_volume_without_a_modality_is_routed_once_as_a_whole(server, reference, monkeypatch):
    """A NIfTI volume goes to one adapter, decided by ``SegmentationModel.route_volume`` over its evenly spaced
    slices (not by one slice): every slice of the mask comes from that adapter."""
    import nibabel

    model, _ = reference
    service = server.service
    calls = []

    def route_volume(routed_model, slices, min_confidence=None):
        calls.append([tuple(s.shape) for s in slices])
        return SimpleNamespace(modality="MRI", confidence=0.6, scores={"MRI": 0.6, "CT": 0.2})

    monkeypatch.setattr(type(service.model), "route_volume", route_volume, raising=False)
    volume = np.random.default_rng(5).random((32, 24, 20)).astype(np.float32) * 500
    data = nibabel.Nifti1Image(volume, np.eye(4)).to_bytes()
    with server.client() as client:
        answer = client.post("/v1/segment", content=data).json()
    assert len(calls) == 1 and len(calls[0]) == 16 and set(calls[0]) == {(1, 32, 24)}  # 16 of the 20 slices
    assert answer["modality"] == "MRI" and answer["routing"]["by"] == "router"
    result = np.asarray(nibabel.Nifti1Image.from_bytes(mask_of(answer)).dataobj)
    for index in (0, 19):
        expected = predict_array(model, volume[None, :, :, index], "MRI", {"dtype": "float32"})
        np.testing.assert_array_equal(result[:, :, index], expected)


def test_the_router_decides_without_a_modality_and_unknown_is_a_422(server, reference, monkeypatch):
    """A stand-in for ``SegmentationModel.route`` decides by image width (routing quality is tested on real images
    in tests/test_routing.py); the service must follow it and answer unknown with a 422."""
    model, _ = reference
    service = server.service

    def route(routed_model, images, min_confidence=None):
        assert routed_model is service.model
        raw = images[0]
        width = raw.shape[-1]
        modality = {64: "CT", 80: "MRI"}.get(width)
        return [SimpleNamespace(modality=modality, confidence=0.9 if modality else 0.2,
                                scores={"CT": 0.9 if modality == "CT" else 0.1,
                                        "MRI": 0.8 if modality == "MRI" else 0.1})]

    monkeypatch.setattr(type(service.model), "route", route, raising=False)
    with server.client() as client:
        for width, expected in ((64, "CT"), (80, "MRI")):
            data, raw = random_png(64, width, seed=width)
            answer = client.post("/v1/segment", content=data).json()
            assert answer["modality"] == expected and answer["routing"]["by"] == "router"
            assert answer["routing"]["confidence"] == pytest.approx(0.9)
            np.testing.assert_array_equal(decode_png(mask_of(answer)),
                                          predict_array(model, raw, expected, {"dtype": "uint8"}))
        data, _ = random_png(64, 50, seed=9)
        response = client.post("/v1/segment", content=data)
    assert response.status_code == 422
    assert "unknown modality" in response.json()["error"]
    assert "mask" not in response.json()


# ------------------------------------------------------------------------------------------------- tokens
def test_every_endpoint_refuses_requests_without_a_valid_token(server, reference):
    _, files = reference
    data, _ = random_png(64, 64, seed=2)
    endpoints = [("GET", "/healthz", None), ("GET", "/readyz", None), ("GET", "/metrics", None),
                 ("GET", "/openapi.json", None), ("GET", "/v1/adapters", None),
                 ("POST", "/v1/segment?modality=CT", data), ("PUT", "/v1/admin/adapters/CT2", files["CT"]),
                 ("DELETE", "/v1/admin/adapters/CT", None)]
    for headers in ({}, {"Authorization": "Bearer wrong-token-0000000000"}, {"Authorization": TOKENS.predict}):
        with server.client(headers) as client:
            client.headers.pop("Authorization", None)
            client.headers.update(headers)
            for method, path, body in endpoints:
                response = client.request(method, path, content=body)
                assert response.status_code == 401, (method, path, headers, response.status_code)
                assert "token" in response.json()["error"]
    with server.client(AUTH) as client:  # the predict token cannot change adapters
        assert client.put("/v1/admin/adapters/CT2", content=files["CT"]).status_code == 403
        assert client.delete("/v1/admin/adapters/CT").status_code == 403
        assert sorted(a["name"] for a in client.get("/v1/adapters").json()["adapters"]) == ["CT", "MRI"]


def test_openapi_schema_health_readiness_and_metrics_are_served(server):
    data, _ = random_png(64, 64, seed=2)
    with server.client() as client:
        schema = client.get("/openapi.json").json()
        assert {"/v1/segment", "/v1/adapters", "/v1/admin/adapters/{name}", "/healthz", "/readyz",
                "/metrics"} <= set(schema["paths"])
        assert "application/octet-stream" in schema["paths"]["/v1/segment"]["post"]["requestBody"]["content"]
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"ready": True, "adapters": 2}
        assert client.post("/v1/segment", params={"modality": "CT"}, content=data).status_code == 200
        text = client.get("/metrics").text
    assert 'm4oe_requests_total{endpoint="/v1/segment",modality="CT",status="200"} 1.0' in text
    assert 'm4oe_request_seconds_count{modality="CT"} 1.0' in text
    assert "m4oe_batch_tiles_count" in text and "m4oe_queue_tiles" in text
    assert "m4oe_adapters_loaded 2.0" in text


def test_readiness_is_503_until_an_adapter_is_loaded(reference):
    _, files = reference
    with LiveServer(empty_service()) as live, live.client() as client:
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
        with live.client(ADMIN) as admin:
            assert admin.put("/v1/admin/adapters/CT", content=files["CT"]).status_code == 200
        assert client.get("/readyz").status_code == 200


def test_each_request_writes_one_json_log_line_without_tokens(server, caplog):
    data, _ = random_png(64, 64, seed=2)
    with caplog.at_level(logging.INFO, logger="m4oe.serve"), server.client() as client:
        client.post("/v1/segment", params={"modality": "CT"}, content=data)
        client.get("/healthz", headers={"Authorization": "Bearer nope-nope-nope-nope"})
    lines = [json.loads(record.getMessage()) for record in caplog.records if record.name == "m4oe.serve"]
    assert [(line["path"], line["status"]) for line in lines] == [("/v1/segment", 200), ("/healthz", 401)]
    assert lines[0]["modality"] == "CT" and len(lines[0]["adapter"]) == 12 and lines[0]["ms"] > 0
    assert not any(TOKENS.predict in record.getMessage() for record in caplog.records)


# ------------------------------------------------------------------------------------------------- engines
def test_the_same_app_builds_as_a_ray_serve_application(tmp_path, reference):
    serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'ray[serve]')")
    import inspect

    from m4oe_adapters.serve.ray_app import ray_application, replica_builder

    _, files = reference
    path = tmp_path / "CT.safetensors"
    path.write_bytes(files["CT"])
    application = ray_application(adapters=[str(path)], weights="none", tokens=TOKENS, replicas="auto")
    assert isinstance(application, serve.Application)
    # What each replica runs at start-up: the same FastAPI app, serving the adapters.
    options = {"adapters": [str(path)], "weights": "none", "settings": {"device": "cpu"},
               "tokens": {"predict": TOKENS.predict, "admin": TOKENS.admin}}
    builder = replica_builder(options)
    assert inspect.isfunction(builder)  # what serve.ingress needs to call it per replica rather than serve it
    app = builder()
    try:
        assert [v.name for v in app.state.service.registry.list()] == ["CT"]
    finally:
        app.state.service.close()


@pytest.mark.slow
def test_serve_command_starts_on_loopback_and_answers(tmp_path, reference):
    """``m4oe serve --adapter ... --weights none`` in a subprocess; stopped by the test within its time bound."""
    import socket

    import httpx

    _, files = reference
    path = tmp_path / "CT.safetensors"
    path.write_bytes(files["CT"])
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"predict": TOKENS.predict, "admin": TOKENS.admin}))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "m4oe_adapters.cli", "serve", "--adapter", str(path), "--weights", "none",
               "--port", str(port), "--device", "cpu", "--tokens", str(tokens)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stderr.read().decode()
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/readyz", headers=AUTH, timeout=2, trust_env=False)
                if response.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service did not become ready within 90 s"
            time.sleep(0.25)
        data, _ = random_png(64, 64, seed=2)
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/segment", params={"modality": "CT"}, content=data,
                            headers=AUTH, timeout=30, trust_env=False).json()
        assert answer["modality"] == "CT" and answer["adapter"]["file"] == "CT.safetensors"
    finally:
        process.terminate()
        process.wait(20)


DEVICES = ["cpu"] + (["cuda"] if __import__("torch").cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_the_service_segments_on_every_available_device(reference, device):
    """The Python API without HTTP, on each device present (CUDA when there is one)."""
    from m4oe_adapters import ExpertConfig, SegmentationModel
    from m4oe_adapters.serve import ServeSettings, Service

    from conftest import tiny_backbone

    model, files = reference
    service = Service(SegmentationModel(tiny_backbone(), ExpertConfig(rank=4)), ServeSettings(device=device))
    try:
        for name, data in files.items():
            service.add_adapter(data, source=f"{name}.safetensors")
        assert next(service.model.parameters()).device.type == device
        png, raw = random_png(70, 66, seed=11)
        for name in files:
            result = service.segment(png, modality=name)
            expected = predict_array(model, raw, name, {"dtype": "uint8"})
            assert result.masks[0].shape == expected.shape
            assert (result.masks[0] == expected).mean() > 0.99  # float rounding may differ on another device
    finally:
        service.close()


def test_fp16_adapter_files_are_held_in_fp16_and_give_the_masks_of_fp32_holding(tmp_path):
    """ServeSettings.keep_dtype (the default): an fp16 file stays fp16 in memory (half of fp32) and the masks equal
    those of a service that widens it to fp32 on load."""
    import torch

    from m4oe_adapters import save_adapter

    from serve_support import empty_service

    model = random_adapters({"CT": 2, "MRI": 3})
    files = {name: save_adapter(model, name, tmp_path / f"{name}.safetensors", dtype="fp16").read_bytes()
             for name in ("CT", "MRI")}
    narrow, wide = empty_service(), empty_service(keep_dtype=False)
    try:
        for service in (narrow, wide):
            for name, data in files.items():
                service.add_adapter(data, source=f"{name}.safetensors")
        held = {service: {t.dtype for name in ("CT", "MRI") for t in service.model.modality_tensors(name).values()
                          if t.dim() > 1} for service in (narrow, wide)}
        assert held[narrow] == {torch.float16} and held[wide] == {torch.float32}
        png, _ = random_png(70, 66, seed=3)
        for name in files:
            ours, widened = narrow.segment(png, modality=name), wide.segment(png, modality=name)
            assert np.array_equal(ours.masks[0], widened.masks[0])
    finally:
        narrow.close(), wide.close()
