"""The adapters zoo: the project's reference backbone and per-modality adapters trained on it, listed in
``adapters_zoo/index.json`` (file, modality, labels, backbone fingerprint, sha256, size, data provenance, metrics).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .adapter_header import inspect_adapter  # torch-free: `m4oe zoo list` starts without torch
from .errors import AdapterFormatError, M4oEError

INDEX_NAME = "index.json"


def default_zoo() -> Path:
    """``adapters_zoo/`` of the source checkout (next to the package)."""
    return Path(__file__).resolve().parent.parent / "adapters_zoo"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_index(zoo: str | Path | None = None) -> dict[str, Any]:
    zoo = Path(zoo) if zoo else default_zoo()
    path = zoo / INDEX_NAME
    if not path.is_file():
        raise AdapterFormatError(f"{path}: no zoo index (build the zoo with examples/build_zoo.py)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise AdapterFormatError(f"{path}: not valid JSON ({error})") from None


def index_entry(zoo: Path, adapter: Path) -> dict[str, Any]:
    report = inspect_adapter(adapter)
    meta = report["metadata"]
    return {
        "file": str(adapter.relative_to(zoo)),
        "modality": meta["modality"],
        "labels": meta["label_names"],
        "backbone_fingerprint": meta["backbone"]["fingerprint"],
        "sha256": sha256_file(adapter),
        "size_bytes": report["size_bytes"],
        "parameters": report["parameters"],
        "provenance": meta["provenance"],
        "metrics": meta["metrics"],
    }


def write_index(zoo: str | Path, backbone: dict[str, Any], adapters: list[Path]) -> Path:
    """(Re)write the index from the adapter files themselves, so it can never disagree with them."""
    from .adapter_file import atomic_write

    zoo = Path(zoo)
    index = {"backbone": backbone, "adapters": [index_entry(zoo, Path(a)) for a in adapters]}
    text = json.dumps(index, indent=2)
    return atomic_write(zoo / INDEX_NAME, lambda temporary: Path(temporary).write_text(text + "\n"))


def backbone_weights(zoo: str | Path | None = None) -> Path:
    zoo = Path(zoo) if zoo else default_zoo()
    return zoo / read_index(zoo)["backbone"]["path"]


def load_reference_backbone(zoo: str | Path | None = None):
    from .backbones import load_backbone

    zoo = Path(zoo) if zoo else default_zoo()
    entry = read_index(zoo)["backbone"]
    return load_backbone(entry["spec"], zoo / entry["path"], img_size=entry.get("img_size", 224))


def load_zoo_model(zoo: str | Path | None = None):
    """A :class:`~m4oe_adapters.model.SegmentationModel` on the zoo's backbone with every indexed adapter loaded
    (the setting routing is evaluated in)."""
    from .adapter_file import load_adapter, model_from_adapter

    zoo = Path(zoo) if zoo else default_zoo()
    files = [zoo / entry["file"] for entry in read_index(zoo)["adapters"]]
    model = model_from_adapter(files[0], backbone_weights(zoo))
    for path in files[1:]:
        load_adapter(model, path)
    return model


def verify(zoo: str | Path | None = None) -> list[dict[str, Any]]:
    """Check each file's sha256 and that each adapter loads on the reference backbone.

    Returns: one ``{file, ok, problem}`` per file (backbone first).
    """
    from .adapter_file import load_adapter
    from .config import DecoderConfig, ExpertConfig
    from .model import SegmentationModel

    zoo = Path(zoo) if zoo else default_zoo()
    index = read_index(zoo)
    results = []
    entry = index["backbone"]
    weights_file = zoo / entry["path"] / "model.safetensors"
    ok = weights_file.is_file() and sha256_file(weights_file) == entry["sha256"]
    results.append({"file": str(weights_file.relative_to(zoo)), "ok": ok,
                    "problem": None if ok else "missing or sha256 differs"})
    backbone = load_reference_backbone(zoo)
    if backbone.fingerprint() != entry["fingerprint"]:
        results.append({"file": entry["path"], "ok": False, "problem": "backbone fingerprint differs from the index"})
    model = None
    for adapter in index["adapters"]:
        path = zoo / adapter["file"]
        problem = None
        if not path.is_file():
            problem = "missing"
        elif sha256_file(path) != adapter["sha256"]:
            problem = "sha256 differs from the index"
        else:
            try:
                if model is None:  # every zoo adapter shares one backbone and expert configuration
                    meta = inspect_adapter(path)["metadata"]
                    model = SegmentationModel(backbone, ExpertConfig.from_dict(meta["expert"]),
                                              DecoderConfig.from_dict(meta["decoder"]))
                info = load_adapter(model, path)
                model.remove_modality(info.name)
            except M4oEError as error:
                problem = str(error)
        results.append({"file": adapter["file"], "ok": problem is None, "problem": problem})
    return results
