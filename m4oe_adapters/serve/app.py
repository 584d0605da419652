"""The HTTP API (FastAPI, an ASGI app): served by uvicorn on this machine (:func:`run_local`) and by Ray Serve
replicas across machines (:mod:`.ray_app`) — the same app either way.

Endpoints (every one needs ``Authorization: Bearer <token>``; ``/v1/admin/*`` the admin token):

=========================================  =====================================================================
``POST /v1/segment?modality=NAME``          body: the image file (PNG/JPG/TIF/BMP/GIF, NIfTI, DICOM, zip of a
                                            DICOM series). JSON: modality, routing, labels, adapter version,
                                            backbone, timings, and the mask file (base64) in the input's format
``GET /v1/adapters``                        served adapters (name, version, file, labels...) and, with a
                                            watched folder, each of its files' state (served, or why refused)
``PUT /v1/admin/adapters/{name}``           body: an adapter file; add, or replace (hot swap) with ``?replace=true``
``DELETE /v1/admin/adapters/{name}``        stop serving an adapter
``GET /healthz``, ``GET /readyz``           liveness; readiness (batcher running and >= 1 adapter)
``GET /metrics``                            Prometheus text format
``GET /openapi.json``                       this API's OpenAPI schema
=========================================  =====================================================================

Errors are JSON ``{"error": message}`` with a 4xx status (503 when busy); one JSON log line per request (logger
``m4oe.serve``: method, path, status, milliseconds, modality, adapter version; never a token or a body).
"""
from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from dataclasses import dataclass

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..errors import ConfigError, M4oEError
from .errors import PayloadTooLarge, ServiceError, http_status
from .service import Service

LOG = logging.getLogger("m4oe.serve")
BINARY_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}


@dataclass(frozen=True)
class Tokens:
    """Bearer tokens: ``predict`` for ``/v1`` and monitoring endpoints, ``admin`` for adapter changes (it is also
    accepted wherever ``predict`` is)."""

    predict: str
    admin: str

    @classmethod
    def generate(cls) -> "Tokens":
        return cls(secrets.token_urlsafe(24), secrets.token_urlsafe(24))

    @classmethod
    def resolve(cls, path: str | None = None) -> tuple["Tokens", bool]:
        """Tokens from a JSON file ``{"predict": ..., "admin": ...}``, else from ``$M4OE_SERVE_TOKEN`` and
        ``$M4OE_SERVE_ADMIN_TOKEN``, else freshly generated; the flag says whether they were generated."""
        import os

        if path:
            try:
                document = json.loads(open(path, encoding="utf-8").read())
                tokens = cls(str(document["predict"]), str(document["admin"]))
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise ConfigError(f"{path}: cannot read the tokens ({type(error).__name__}: {error}); expected "
                                  'JSON {"predict": "...", "admin": "..."}') from None
        elif os.environ.get("M4OE_SERVE_TOKEN") and os.environ.get("M4OE_SERVE_ADMIN_TOKEN"):
            tokens = cls(os.environ["M4OE_SERVE_TOKEN"], os.environ["M4OE_SERVE_ADMIN_TOKEN"])
        else:
            return cls.generate(), True
        if len(tokens.predict) < 16 or len(tokens.admin) < 16 or tokens.predict == tokens.admin:
            raise ConfigError("tokens must be at least 16 characters and the admin token must differ from the other")
        return tokens, False


class Unauthorized(ServiceError):
    status = 401


class Forbidden(ServiceError):
    status = 403


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    return token.strip()


def _matches(token: str, expected: str) -> bool:
    return secrets.compare_digest(token.encode(), expected.encode())


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {int(declared)} bytes, over this service's limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over {limit} bytes, this service's limit")
        chunks.append(chunk)
    data = b"".join(chunks)
    if not data:
        raise ServiceError("empty body: send the file's bytes as the request body")
    return data


def create_app(service: Service, tokens: Tokens) -> FastAPI:
    """The ASGI app serving ``service``; ``tokens`` are the bearer tokens it accepts."""
    app = FastAPI(
        title="m4oe serve",
        version="1",
        description="One frozen backbone in memory, one adapter per modality, mixed-modality batches.",
        openapi_url=None, docs_url=None, redoc_url=None,  # the schema is served below, behind the token
    )
    app.state.service = service

    def predict_scope(request: Request) -> None:
        token = _bearer(request)
        if not (_matches(token, tokens.predict) or _matches(token, tokens.admin)):
            raise Unauthorized("invalid token")

    def admin_scope(request: Request) -> None:
        token = _bearer(request)
        if _matches(token, tokens.admin):
            return
        if _matches(token, tokens.predict):
            raise Forbidden("this token may not change adapters; use the admin token")
        raise Unauthorized("invalid token")

    @app.exception_handler(M4oEError)
    async def library_error(request: Request, error: M4oEError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=http_status(error))

    @app.middleware("http")
    async def log_line(request: Request, call_next):
        start = time.perf_counter()
        request.state.log = {}
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            fields = request.state.log
            entry = {"ts": round(time.time(), 3), "method": request.method, "path": request.url.path,
                     "status": status, "ms": round((time.perf_counter() - start) * 1000, 2), **fields}
            LOG.info(json.dumps(entry, sort_keys=True))
            # Labels from the route template and served names only: a client cannot grow the label sets.
            route = request.scope.get("route")
            endpoint = getattr(route, "path", "other")
            modality = fields.get("modality", "")
            if modality and service.registry.get(modality) is None:
                modality = "other"
            service.metrics.requests.labels(endpoint, modality, str(status)).inc()
            if endpoint == "/v1/segment" and status == 200:
                service.metrics.latency.labels(modality).observe(time.perf_counter() - start)

    @app.get("/healthz", dependencies=[Depends(predict_scope)], summary="liveness")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", dependencies=[Depends(predict_scope)], summary="readiness: batcher up, adapters loaded")
    def readyz() -> JSONResponse:
        ready = service.ready
        return JSONResponse({"ready": ready, "adapters": len(service.registry)}, status_code=200 if ready else 503)

    @app.get("/metrics", dependencies=[Depends(predict_scope)], summary="Prometheus metrics")
    def metrics() -> Response:
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/openapi.json", dependencies=[Depends(predict_scope)], include_in_schema=False)
    def openapi() -> dict:
        return app.openapi()

    @app.get("/v1/adapters", dependencies=[Depends(predict_scope)], summary="served adapters")
    def adapters() -> dict:
        return {"adapters": [version.describe() for version in service.registry.list()],
                "backbone": service.backbone,
                "watch": service.watcher.state() if service.watcher is not None else None}

    @app.post("/v1/segment", dependencies=[Depends(predict_scope)], openapi_extra=BINARY_BODY,
              summary="segment an image, NIfTI volume, DICOM file or zipped DICOM series")
    async def segment(request: Request, modality: str | None = None, name: str = "upload",
                      threshold: str | None = None) -> dict:
        """Body: the file's bytes. Without ``modality`` the image-level router chooses (422 when none fits).
        ``threshold`` (two-class adapters): a number between 0 and 1 or ``otsu`` instead of the most probable class."""
        data = await _read_body(request, service.settings.max_body_bytes)
        if modality:
            request.state.log["modality"] = modality
        result = await anyio.to_thread.run_sync(
            lambda: service.segment(data, modality=modality, name=name[:200], threshold=threshold))
        request.state.log.update(modality=result.info["modality"], adapter=result.info["adapter"]["version"],
                                 routed_by=result.info["routing"]["by"])
        return {**result.info, "mask": {**result.info["mask"], "base64": base64.b64encode(result.data).decode()}}

    @app.put("/v1/admin/adapters/{name}", dependencies=[Depends(admin_scope)], openapi_extra=BINARY_BODY,
             summary="add an adapter file, or replace (hot swap) the one serving this name")
    async def put_adapter(request: Request, name: str, replace: bool = False, source: str = "<upload>") -> dict:
        data = await _read_body(request, service.settings.max_body_bytes)
        request.state.log["modality"] = name
        version = await anyio.to_thread.run_sync(
            lambda: service.add_adapter(data, source=source[:200], name=name, replace=replace))
        request.state.log["adapter"] = version.version
        return version.describe()

    @app.delete("/v1/admin/adapters/{name}", dependencies=[Depends(admin_scope)], summary="stop serving an adapter")
    async def delete_adapter(request: Request, name: str) -> dict:
        request.state.log["modality"] = name
        version = await anyio.to_thread.run_sync(lambda: service.remove_adapter(name))
        return {"removed": version.describe()}

    return app


def run_local(service: Service, tokens: Tokens, *, host: str = "127.0.0.1", port: int = 8000,
              log_level: str = "warning") -> None:
    """Serve on this machine with uvicorn until interrupted (loopback unless ``host`` says otherwise)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    LOG.setLevel(logging.INFO)
    uvicorn.run(create_app(service, tokens), host=host, port=port, log_level=log_level, access_log=False)
