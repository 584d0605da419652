"""``m4oe serve``: one backbone in memory, every adapter behind one HTTP endpoint, mixed-modality batches.

Files: :mod:`.service` (the Python API: decode → route → batched prediction → encode), :mod:`.batching` (the
mixed-modality micro-batcher), :mod:`.registry` (served adapters, hot swap), :mod:`.watch` (a watched adapter
folder), :mod:`.uploads` (input formats and masks in the input's format), :mod:`.dicom_seg` (DICOM SEG with
highdicom), :mod:`.metrics` (Prometheus), :mod:`.app` (the FastAPI app, run locally with uvicorn), :mod:`.ray_app`
(the same app on Ray Serve), :mod:`.loadtest` (``m4oe serve-bench``), :mod:`.errors` (HTTP statuses).
"""
from .app import Tokens, create_app, run_local
from .batching import MicroBatcher
from .registry import AdapterRegistry, AdapterVersion
from .service import Segmentation, ServeSettings, Service

__all__ = [
    "AdapterRegistry", "AdapterVersion", "MicroBatcher", "Segmentation", "ServeSettings", "Service", "Tokens",
    "create_app", "run_local",
]
