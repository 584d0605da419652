"""Do adapter changes reach every Ray Serve replica through a watched folder? One bounded run on this machine.

    python examples/ray_watch_check.py --zoo adapters_zoo --new runs/s9/zoo_fundus_two/fundus-drive-chase.safetensors \
        [--replicas 2] [--requests 24] [--out report.json]

Copies the zoo into a temporary folder, starts ``m4oe serve --zoo COPY --engine ray --replicas N --watch`` on a
free loopback port, then: (1) sends ``--requests`` segment requests naming the new adapter's modality (all 422:
nobody serves it), (2) copies the new adapter file into the folder and waits until requests for it succeed
(2 × replicas + 2 in a row), (3) sends ``--requests`` more (all must be 200, each naming the new file's version),
(4) deletes the file and waits likewise, (5) sends ``--requests`` more (all must be 422 again). Ray sends each
request to one replica of its choice, so a replica that had missed a change would answer some of a phase's requests
wrongly (with 2 replicas and 12 requests, all going to one replica has probability 2 × 0.5^12). Prints a JSON
report (status and version counts per phase, seconds until a change was served by every replica, and from Ray's
log lines how many answers of each status every replica gave) and stops the service.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="adapters_zoo")
    parser.add_argument("--new", required=True, help="an adapter file whose modality the zoo does not serve")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--image", default=None, help="PNG to send (default: a 64x64 grey ramp)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import httpx
    import numpy as np
    from PIL import Image

    from m4oe_adapters.adapter_header import inspect_adapter

    deadline = time.monotonic() + args.timeout
    new = Path(args.new)
    modality = inspect_adapter(new)["metadata"]["modality"]
    report: dict = {"replicas": args.replicas, "requests_per_phase": args.requests, "modality": modality}
    with tempfile.TemporaryDirectory(prefix="m4oe-watch-") as temp:
        zoo = Path(temp) / "zoo"
        shutil.copytree(args.zoo, zoo)
        if args.image:
            image = Path(args.image).read_bytes()
        else:
            ramp = (np.add.outer(np.arange(64), np.arange(64)) * 2).astype(np.uint8)
            buffer = Path(temp) / "ramp.png"
            Image.fromarray(ramp).save(buffer)
            image = buffer.read_bytes()
        tokens = {"predict": secrets.token_urlsafe(16), "admin": secrets.token_urlsafe(16)}
        (Path(temp) / "tokens.json").write_text(json.dumps(tokens))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "m4oe_adapters.cli", "serve", "--zoo", str(zoo), "--engine", "ray",
                   "--replicas", str(args.replicas), "--watch", "--watch-interval", "1", "--port", str(port),
                   "--device", "cpu", "--tokens", str(Path(temp) / "tokens.json")]
        log = open(Path(temp) / "serve.log", "w")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "RAY_DEDUP_LOGS": "0"})  # every replica's every log line
        headers = {"Authorization": f"Bearer {tokens['predict']}"}
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=120, trust_env=False)

        def segment() -> tuple[int, str | None]:
            response = client.post("/v1/segment", params={"modality": modality}, content=image)
            return response.status_code, (response.json().get("adapter") or {}).get("version")

        def phase(name: str) -> None:
            outcomes = collections.Counter()
            for _ in range(args.requests):
                status, version = segment()
                outcomes[f"{status} {version or ''}".strip()] += 1
            report[name] = dict(outcomes)
            print(name, dict(outcomes), flush=True)

        def wait_until(wanted: int) -> float:
            """Seconds until ``2 * replicas + 2`` answers in a row have the wanted status: every replica changed
            (each looks at the folder on its own, so for a moment they may disagree)."""
            start, streak = time.monotonic(), 0
            while time.monotonic() < deadline:
                streak = streak + 1 if segment()[0] == wanted else 0
                if streak >= 2 * args.replicas + 2:
                    return round(time.monotonic() - start, 1)
                time.sleep(0.2)
            raise TimeoutError(f"no run of {wanted} answers before the deadline")

        try:
            started = time.monotonic()
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the service stopped or did not become ready: "
                                       + (Path(temp) / "serve.log").read_text()[-2000:])
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(1)
            report["ready_s"] = round(time.monotonic() - started, 1)
            phase("before_copy")
            shutil.copyfile(new, zoo / new.name)
            report["served_everywhere_s"] = wait_until(200)
            phase("after_copy")
            (zoo / new.name).unlink()
            report["refused_everywhere_s"] = wait_until(422)
            phase("after_delete")
        finally:
            client.close()
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()
            text = (Path(temp) / "serve.log").read_text()
            # Ray prefixes each replica's log lines with its process id: which replica answered what.
            answers: dict = collections.defaultdict(collections.Counter)
            for pid, status in re.findall(r"ServeReplica:[^)]*pid=(\d+)\).*?POST /v1/segment (\d{3})", text):
                answers[f"replica pid {pid}"][status] += 1
            report["answers_per_replica"] = {key: dict(value) for key, value in answers.items()}
            if sys.exc_info()[0] is not None:  # failed: show what the service said
                print(text[-3000:], file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
