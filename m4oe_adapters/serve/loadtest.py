"""``m4oe serve-bench``: a bounded load test of the service on 127.0.0.1 (its own server, started and stopped here;
no other address can be targeted).

Scenarios, each bounded by a request count and a time limit:

* **overhead** — p50 latency of one 512×512 PNG, one request at a time, vs the in-process
  :func:`~m4oe_adapters.prediction.predict_array` (preset + windows/resize + ``model(...)``) on the same decoded image;
* **single vs mixed** — concurrency ``C``: every request to one adapter, vs the 9 (or N) adapters uniformly;
  the same images (one real image per modality, resized to 224×224 so every request is one tile) in both;
* **batch-1 vs batched** — mixed traffic at concurrency ``C`` with ``max_batch=1`` vs ``max_batch=B``;
* **hot swap** — mixed traffic while every adapter is replaced, in turn, by another version of itself; counts
  failed and misrouted answers (wrong modality, or a version that was never served for it);
* **100 adapters** — in a fresh process: resident memory with the backbone alone and after loading 100 adapter
  files (copies of the zoo's under new names), and load time per adapter.
"""
from __future__ import annotations

import base64
import gc
import hashlib
import http.client
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import DataError
from .app import Tokens, create_app
from .service import ServeSettings, Service, resolve_device

TILE = 224
SERVING_BATCHES = 12  # mixed batches of 8 random modalities run before memory is measured again


# ------------------------------------------------------------------------------------------------- inputs
def zoo_images(zoo: Path, data_root: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """One real image per zoo adapter, from the dataset its provenance names (first manifest row): raw ``[C, H, W]``
    and meta as :func:`~m4oe_adapters.data.read_image` gives them."""
    import csv

    from ..data import read_image
    from ..zoo import read_index

    manifest = data_root / "manifest.csv"
    if not manifest.is_file():
        raise DataError(f"{manifest}: no manifest; pass --data, the shared data folder (M4OE_DATA)")
    rows = list(csv.DictReader(manifest.open()))
    images = {}
    for entry in read_index(zoo)["adapters"]:
        datasets = entry["provenance"].get("datasets") or []
        row = next((r for r in rows if r["dataset"] in datasets), None)
        if row is None:
            continue
        record = read_image(data_root / row["image"], slice_index=0)
        images[entry["modality"]] = (record.array, record.meta)
    return images


def png_of(raw: np.ndarray, size: int | None) -> bytes:
    """An 8-bit PNG of a raw image (min-max scaled), resized to ``size``×``size`` when given."""
    from PIL import Image

    array = np.moveaxis(raw, 0, -1) if raw.shape[0] == 3 else raw[0]
    low, high = float(array.min()), float(array.max())
    pixels = ((array - low) / max(high - low, 1e-6) * 255).astype(np.uint8)
    picture = Image.fromarray(pixels)
    if size:
        picture = picture.resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------- server + client
class LocalServer:
    """uvicorn in a thread on a free 127.0.0.1 port."""

    def __init__(self, service: Service, tokens: Tokens) -> None:
        import socket

        import uvicorn

        self.service = service
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(service, tokens), log_level="error",
                                                    access_log=False, lifespan="off",
                                                    timeout_keep_alive=300))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> "LocalServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the bench server did not start within 60 s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()


class Client:
    """One keep-alive HTTP connection to the local server (one per client thread)."""

    def __init__(self, port: int, token: str) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        for attempt in (0, 1):
            try:
                self.connection.request(method, path, body=body, headers=self.headers)
                response = self.connection.getresponse()
                return response.status, json.loads(response.read() or b"{}")
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                # The server closed an idle keep-alive connection before this request reached it: reconnect once.
                self.connection.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.connection.close()


def drive(port: int, token: str, jobs: list[tuple[str, bytes]], concurrency: int, seconds: float,
          check: Callable[[str, int, dict], str | None] | None = None) -> dict[str, Any]:
    """Send ``jobs`` (modality, body) from ``concurrency`` threads, stopping early after ``seconds``.

    Returns: requests, failed, misrouted, wall seconds, throughput (requests/s), p50/p99 latency (ms).
    """
    lock, position = threading.Lock(), [0]
    latencies, failures, misrouted = [], [], []
    stop_at = time.perf_counter() + seconds

    def worker() -> None:
        client = Client(port, token)
        try:
            while time.perf_counter() < stop_at:
                with lock:
                    if position[0] >= len(jobs):
                        return
                    modality, body = jobs[position[0]]
                    position[0] += 1
                start = time.perf_counter()
                try:
                    status, answer = client.request("POST", f"/v1/segment?modality={modality}", body)
                except (OSError, http.client.HTTPException, ValueError) as error:
                    failures.append(f"{type(error).__name__}: {error}")
                    client.close()
                    client = Client(port, token)
                    continue
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    failures.append(f"{status}: {answer.get('error')}")
                elif check is not None:
                    problem = check(modality, status, answer)
                    if problem:
                        misrouted.append(problem)
        finally:
            client.close()

    begin = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - begin
    milliseconds = np.asarray(latencies) * 1000
    return {
        "requests": len(latencies) + sum(1 for f in failures if not f[:3].isdigit()),
        "failed": len(failures), "misrouted": len(misrouted), "examples": (failures + misrouted)[:3],
        "seconds": round(wall, 2), "throughput_rps": round(len(latencies) / wall, 2) if wall else 0.0,
        "p50_ms": round(float(np.percentile(milliseconds, 50)), 1) if len(milliseconds) else None,
        "p99_ms": round(float(np.percentile(milliseconds, 99)), 1) if len(milliseconds) else None,
        "concurrency": concurrency,
    }


# ------------------------------------------------------------------------------------------------- scenarios
def other_version(data: bytes, note: str) -> bytes:
    """The same adapter with one provenance note more: same tensors, another file (another sha256 version)."""
    import safetensors.torch

    from ..adapter_file import read_adapter

    metadata, tensors = read_adapter(data)
    metadata["provenance"] = {**metadata.get("provenance", {}), "bench_copy": note}
    header = {"format": "m4oe-adapter", "format_version": "1", "m4oe": json.dumps(metadata)}
    return safetensors.torch.save(tensors, metadata=header)


def renamed(data: bytes, modality: str) -> bytes:
    """The same adapter under another modality name (the 100-adapter memory scenario)."""
    import safetensors.torch

    from ..adapter_file import read_adapter

    metadata, tensors = read_adapter(data)
    metadata["modality"] = modality
    header = {"format": "m4oe-adapter", "format_version": "1", "m4oe": json.dumps(metadata)}
    return safetensors.torch.save(tensors, metadata=header)


def resident_mb() -> float:
    """Resident memory of this process (MiB), from /proc (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_probe(zoo: str, folder: str) -> dict[str, Any]:
    """Run in a fresh process: RSS with the backbone alone, after a warm-up adapter was loaded and removed, then
    after loading every adapter file of ``folder``, then after serving mixed batches."""
    import ctypes

    import torch

    from ..config import DecoderConfig, ExpertConfig
    from ..model import SegmentationModel
    from ..zoo import load_reference_backbone, read_index

    def settle() -> float:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        return resident_mb()

    index = read_index(zoo)
    first = Path(zoo) / index["adapters"][0]["file"]
    from ..adapter_file import read_header

    metadata, _ = read_header(first)
    model = SegmentationModel(load_reference_backbone(zoo), ExpertConfig.from_dict(metadata["expert"]),
                              DecoderConfig.from_dict(metadata["decoder"]))
    service = Service(model, ServeSettings(device="cpu"))
    with torch.no_grad():  # one forward, so the runtime's own lazy allocations are in the baseline
        model.add_modality("warmup", 2)
        model(torch.zeros(1, model.backbone.in_chans, TILE, TILE), "warmup")
        model.remove_modality("warmup")
    cold = settle()
    # The first adapter a process loads also pays one-time costs that no later one pays (code pages of the fp16
    # and meta-device kernels, the decoder template): reported apart, so the per-adapter ratio is what each added
    # adapter costs. The warm-up adapter is served, then removed.
    files = sorted(Path(folder).glob("*.safetensors"))
    service.add_adapter(renamed(files[0].read_bytes(), "probe-warmup"), source="warm-up")
    service.remove_adapter("probe-warmup")
    before = settle()
    seconds = []
    for path in files:
        version = service.add_adapter(path.read_bytes(), source=path.name)
        seconds.append(version.load_seconds)
    after = settle()
    # Then serve: mixed batches of random modality sets, as traffic would (each expert layer caches the stacks of
    # its recent modality sets), and measure again.
    rng = np.random.default_rng(0)
    names = service.registry.names()
    with torch.no_grad():
        for _ in range(SERVING_BATCHES):
            chosen = [service.registry.get(name).slot for name in rng.choice(names, size=8)]
            model(torch.zeros(len(chosen), model.backbone.in_chans, TILE, TILE), chosen, routing="hard")
    serving = settle()
    total_bytes = sum(path.stat().st_size for path in files)
    service.close()
    return {
        "adapters": len(files), "adapter_files_mb": round(total_bytes / 2**20, 1),
        "backbone_file_mb": round(sum(p.stat().st_size for p in (Path(zoo) / index["backbone"]["path"]).glob("*.safetensors")) / 2**20, 1),
        "rss_backbone_only_mb": round(cold, 1), "first_adapter_one_time_mb": round(before - cold, 1),
        "rss_with_adapters_mb": round(after, 1), "rss_added_mb": round(after - before, 1),
        "added_over_files": round((after - before) / (total_bytes / 2**20), 3),
        "added_over_files_with_one_time": round((after - cold) / (total_bytes / 2**20), 3),
        "keep_dtype": service.settings.keep_dtype, "serving_batches": SERVING_BATCHES,
        "rss_after_serving_mb": round(serving, 1),
        "added_after_serving_over_files": round((serving - before) / (total_bytes / 2**20), 3),
        "load_ms_p50": round(float(np.percentile(seconds, 50)) * 1000, 1),
        "load_ms_max": round(float(np.max(seconds)) * 1000, 1),
        "load_ms_mean": round(float(np.mean(seconds)) * 1000, 1),
    }


def run_bench(zoo: str | Path, data_root: str | Path, *, requests: int = 72, concurrency: int = 8,
              max_batch: int = 8, max_wait_ms: float = 20.0, seconds: float = 60.0, overhead_runs: int = 15,
              memory_adapters: int = 100, log: Callable[[str], None] = print, device: str = "cpu") -> dict[str, Any]:
    """Every scenario of this module's docstring; returns the report (JSON-ready). ``device``: where the services
    under test run their model (the 100-adapter memory scenario measures CPU resident memory, on the CPU)."""
    import torch

    from ..zoo import read_index

    zoo, data_root = Path(zoo), Path(data_root)
    index = read_index(zoo)
    files = {entry["modality"]: (zoo / entry["file"]).read_bytes() for entry in index["adapters"]}
    images = zoo_images(zoo, data_root)
    modalities = [m for m in files if m in images]
    if not modalities:
        raise DataError(f"{data_root}: none of the zoo's datasets is in the manifest")
    tokens = Tokens.generate()
    report: dict[str, Any] = {"modalities": modalities, "torch_threads": torch.get_num_threads(),
                              "cpu_count": os.cpu_count(), "device": device, "requests_per_scenario": requests,
                              "concurrency": concurrency, "max_batch": max_batch, "max_wait_ms": max_wait_ms,
                              "load_average_start": [round(v, 2) for v in os.getloadavg()]}
    tiles = {m: png_of(*images[m][:1], TILE) for m in modalities}
    single_name = "xray" if "xray" in modalities else modalities[0]
    mixed_jobs = [(modalities[i % len(modalities)], tiles[modalities[i % len(modalities)]]) for i in range(requests)]
    single_jobs = [(single_name, tiles[modalities[i % len(modalities)]]) for i in range(requests)]

    def service(batch: int) -> Service:
        built = Service.from_zoo(zoo, ServeSettings(max_batch=batch, max_wait_ms=max_wait_ms, device=device))
        return built

    # Batched service: overhead, single vs mixed, hot swap.
    log(f"serve-bench: {len(modalities)} adapters, {requests} requests per scenario, concurrency {concurrency}")
    batched = service(max_batch)
    with LocalServer(batched, tokens) as server:
        drive(server.port, tokens.predict, mixed_jobs[: 2 * len(modalities)], concurrency, seconds)  # warm-up
        report["overhead"] = _overhead(server, tokens, zoo, images, overhead_runs, device)
        log(f"  overhead: {report['overhead']}")
        report["single"] = drive(server.port, tokens.predict, single_jobs, concurrency, seconds)
        log(f"  single ({single_name}): {report['single']}")
        report["mixed"] = drive(server.port, tokens.predict, mixed_jobs, concurrency, seconds)
        log(f"  mixed: {report['mixed']}")
        report["hot_swap"] = _hot_swap(server, tokens, batched, files, modalities, mixed_jobs, concurrency, seconds)
        log(f"  hot swap: {report['hot_swap']}")
    batched.close()
    report["model_batching"] = _model_batching(zoo, modalities, max_batch, device=device)
    log(f"  model alone, batch {max_batch} vs one at a time: {report['model_batching']}")
    unbatched = service(1)
    with LocalServer(unbatched, tokens) as server:
        drive(server.port, tokens.predict, mixed_jobs[: 2 * len(modalities)], concurrency, seconds)
        report["batch_1"] = drive(server.port, tokens.predict, mixed_jobs, concurrency, seconds)
        log(f"  batch-1 (mixed): {report['batch_1']}")
    unbatched.close()
    if memory_adapters:
        report["memory"] = _memory(zoo, files, memory_adapters)
        log(f"  memory: {report['memory']}")
    report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    report["ratios"] = {
        "mixed_over_single_throughput": _ratio(report["mixed"]["throughput_rps"], report["single"]["throughput_rps"]),
        "batched_over_batch_1_throughput": _ratio(report["mixed"]["throughput_rps"],
                                                  report["batch_1"]["throughput_rps"]),
        "service_over_in_process_p50": _ratio(report["overhead"]["service_p50_ms"],
                                              report["overhead"]["in_process_p50_ms"]),
    }
    return report


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


def _overhead(server: LocalServer, tokens: Tokens, zoo: Path, images, runs: int, device: str = "cpu") -> dict:
    """One 512×512 PNG, one request at a time, vs predict_array on the same decoded image, in this process, with
    its own copy of the model (the zoo's backbone and the same adapter file) on the same device."""
    from PIL import Image

    from ..adapter_file import model_from_adapter
    from ..data import read_image
    from ..prediction import predict_array
    from ..zoo import load_reference_backbone, read_index

    name = "fundus" if "fundus" in images else next(iter(images))
    entry = next(e for e in read_index(zoo)["adapters"] if e["modality"] == name)
    reference = model_from_adapter(zoo / entry["file"], None, backbone=load_reference_backbone(zoo)).eval()
    reference.to(resolve_device(device))
    body = png_of(images[name][0], 512)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "image.png"
        path.write_bytes(body)
        record = read_image(path)
    client = Client(server.port, tokens.predict)
    service_ms, in_process_ms = [], []
    try:
        for index in range(runs + 2):  # alternating, so both see the same machine load
            start = time.perf_counter()
            status, answer = client.request("POST", f"/v1/segment?modality={name}", body)
            elapsed = time.perf_counter() - start
            if status != 200:
                raise DataError(f"bench request failed: {status} {answer}")
            begin = time.perf_counter()
            mask = predict_array(reference, record.array, name, record.meta, device=resolve_device(device))
            in_process = time.perf_counter() - begin
            if index >= 2:  # two warm-up rounds
                service_ms.append(elapsed * 1000)
                in_process_ms.append(in_process * 1000)
    finally:
        client.close()
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask"]["base64"]))))
    return {"modality": name, "image": "512x512 PNG", "runs": runs,
            "resize_mode": entry["provenance"].get("resize_mode", "crop"),
            "service_p50_ms": round(float(np.median(service_ms)), 1),
            "in_process_p50_ms": round(float(np.median(in_process_ms)), 1),
            "same_mask": bool(np.array_equal(served, mask))}


def _model_batching(zoo: Path, modalities: list[str], batch: int, repeats: int = 3, device: str = "cpu") -> dict:
    """The ceiling for any batcher on this machine: ``model(B tiles)`` (mixed modalities) vs ``B × model(1 tile)``,
    in this process, no service involved (medians of ``repeats`` round-robin rounds), on the services' device."""
    import torch

    from ..adapter_file import load_adapter, model_from_adapter
    from ..bench import synchronize
    from ..zoo import load_reference_backbone, read_index

    entries = {e["modality"]: e for e in read_index(zoo)["adapters"]}
    names = modalities[: min(len(modalities), batch)]
    model = model_from_adapter(zoo / entries[names[0]]["file"], None, backbone=load_reference_backbone(zoo)).eval()
    for name in names[1:]:
        load_adapter(model, zoo / entries[name]["file"])
    where = resolve_device(device)
    model.to(where)
    tiles = torch.randn(batch, model.backbone.in_chans, TILE, TILE).to(where)
    per_tile = [names[i % len(names)] for i in range(batch)]
    one_by_one, batched = [], []
    with torch.no_grad():
        model(tiles[:1], per_tile[0])  # warm-up of both paths (a GPU also picks its kernels here)
        model(tiles, per_tile)
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            for i in range(batch):
                model(tiles[i : i + 1], per_tile[i])
            synchronize()
            one_by_one.append(time.perf_counter() - start)
            start = time.perf_counter()
            model(tiles, per_tile)
            synchronize()
            batched.append(time.perf_counter() - start)
    single, together = float(np.median(one_by_one)), float(np.median(batched))
    return {"tiles": batch, "modalities": len(names), "device": str(where), "one_at_a_time_s": round(single, 3),
            "one_batch_s": round(together, 3), "gain": round(single / together, 3)}


def _hot_swap(server, tokens, service, files, modalities, jobs, concurrency, seconds) -> dict:
    """Mixed traffic while an admin thread replaces every adapter in turn by another version of itself."""
    variants = {m: [files[m], other_version(files[m], "hot-swap")] for m in modalities}
    known = {m: {hashlib.sha256(v).hexdigest()[:12] for v in variants[m]} for m in modalities}
    done, swaps, swap_ms = threading.Event(), [0], []

    def check(modality: str, status: int, answer: dict) -> str | None:
        if answer.get("modality") != modality:
            return f"asked {modality}, answered by {answer.get('modality')}"
        if answer.get("adapter", {}).get("version") not in known[modality]:
            return f"{modality}: version {answer.get('adapter', {}).get('version')} was never served"
        return None

    def swapper() -> None:
        admin = Client(server.port, tokens.admin)
        try:
            turn = 1
            while not done.is_set():
                for modality in modalities:
                    if done.is_set():
                        break
                    start = time.perf_counter()
                    status, answer = admin.request("PUT", f"/v1/admin/adapters/{modality}?replace=true",
                                                   variants[modality][turn % 2])
                    if status == 200:
                        swaps[0] += 1
                        swap_ms.append((time.perf_counter() - start) * 1000)
                turn += 1
        finally:
            admin.close()

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        result = drive(server.port, tokens.predict, jobs, concurrency, seconds, check)
    finally:
        done.set()
        thread.join(60)
    # Leave the original versions in place.
    admin = Client(server.port, tokens.admin)
    for modality in modalities:
        admin.request("PUT", f"/v1/admin/adapters/{modality}?replace=true", files[modality])
    admin.close()
    result.update(swaps=swaps[0], swap_p50_ms=round(float(np.median(swap_ms)), 1) if swap_ms else None)
    return result


def _memory(zoo: Path, files: dict[str, bytes], count: int) -> dict:
    """Write ``count`` renamed copies of the zoo's adapters, then measure a fresh process loading them."""
    names = list(files)
    with tempfile.TemporaryDirectory(prefix="m4oe-bench-") as folder:
        for index in range(count):
            source = names[index % len(names)]
            Path(folder, f"a{index:03d}.safetensors").write_bytes(renamed(files[source], f"{source[:40]}-{index:03d}"))
        code = ("import json, sys; from m4oe_adapters.serve.loadtest import memory_probe; "
                "print(json.dumps(memory_probe(sys.argv[1], sys.argv[2])))")
        output = subprocess.run([sys.executable, "-c", code, str(zoo), folder], capture_output=True, text=True,
                                timeout=900, cwd=Path(__file__).resolve().parents[2])
    if output.returncode != 0:
        raise DataError(f"memory probe failed: {output.stderr[-2000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    rows = [("single modality", report["single"]), ("mixed, uniform", report["mixed"]),
            ("mixed, batch-1", report["batch_1"]), ("mixed, during hot swap", report["hot_swap"])]
    lines = ["| traffic | requests | failed | misrouted | throughput (req/s) | p50 (ms) | p99 (ms) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, row in rows:
        lines.append(f"| {label} | {row['requests']} | {row['failed']} | {row['misrouted']} | "
                     f"{row['throughput_rps']} | {row['p50_ms']} | {row['p99_ms']} |")
    overhead = report["overhead"]
    lines += ["", f"512×512 PNG ({overhead['modality']}), one at a time: service p50 {overhead['service_p50_ms']} ms, "
                  f"in-process predict_array p50 {overhead['in_process_p50_ms']} ms (same mask: {overhead['same_mask']})"]
    if "memory" in report:
        memory = report["memory"]
        lines += [f"{memory['adapters']} adapters ({memory['adapter_files_mb']} MiB of files): RSS "
                  f"{memory['rss_backbone_only_mb']} MiB with the backbone, +{memory['first_adapter_one_time_mb']} MiB "
                  f"once for the first adapter loaded, then +{memory['rss_added_mb']} MiB = "
                  f"{memory['added_over_files']}× the files ({memory['added_over_files_with_one_time']}× with the "
                  f"one-time cost); load p50 {memory['load_ms_p50']} ms, max {memory['load_ms_max']} ms per adapter"]
    if "model_batching" in report:
        batching = report["model_batching"]
        lines += [f"model alone (no service), {batching['tiles']} tiles of {batching['modalities']} modalities: one "
                  f"batch {batching['one_batch_s']} s vs one at a time {batching['one_at_a_time_s']} s "
                  f"(gain {batching['gain']}×)"]
    lines += ["", "ratios: " + json.dumps(report["ratios"]),
              f"load average (1, 5, 15 min) at start {report['load_average_start']}, at end {report['load_average_end']}"
              f"; torch threads {report['torch_threads']}, {report['cpu_count']} CPUs"]
    return "\n".join(lines)
