"""The adapter file format: one safetensors file per modality.

Tensors (fixed prefixes, keyed by the backbone's own layer names)::

    experts.<layer>.lora_A      [r, in]     experts.<layer>.lora_B   [out, r]     experts.<layer>.router_key  [in]
    decoder.<param>             the modality's decoder and head

Header metadata (safetensors ``__metadata__``, strings only): ``format`` = ``m4oe-adapter``, ``format_version``,
and ``m4oe``: one JSON document with the modality, label names, class count, preprocessing preset, input channels
and size, expert config (rank/alpha/targets), decoder config, backbone identity (family, name, fingerprint) and
provenance/metrics. See :data:`METADATA_SCHEMA` for the checks applied on read.

Reading never unpickles: the header is parsed and bounded by hand before safetensors touches the file, and every
failure becomes an :class:`~m4oe_adapters.errors.AdapterFormatError` naming the file. Writing goes to a temporary
file in the same folder, is fsync'ed, then renamed over the target, so a crash leaves the old file intact.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import MODALITY_NAME, DecoderConfig, ExpertConfig
from .errors import AdapterFormatError, BackboneMismatchError, ConfigError, M4oEError
from .model import DECODER_PREFIX, EXPERT_PREFIX, ModalityInfo, SegmentationModel
from .presets import validate_preset

FORMAT = "m4oe-adapter"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 8 * 1024 * 1024
MAX_TENSORS = 100_000
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAFETENSORS_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}


# ------------------------------------------------------------------------------------------------- atomic write
def atomic_write(path: str | Path, write: Any) -> Path:
    """Call ``write(temporary_path)``, fsync it, then rename it to ``path`` (same folder, so the rename is atomic).

    On any failure the temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def cleanup_stale_temporaries(folder: str | Path, older_than_seconds: float = 0.0) -> int:
    """Remove temporary files (``.<name>.*.tmp``) that a killed writer left in ``folder``; returns how many.

    They never carry a final name, so readers ignore them; this only reclaims the space.
    """
    import time

    removed = 0
    for path in Path(folder).glob(".*.tmp"):
        if time.time() - path.stat().st_mtime >= older_than_seconds:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


# ------------------------------------------------------------------------------------------------- metadata
def build_metadata(model: SegmentationModel, modality: str, dtype: str) -> dict[str, Any]:
    info = model.modalities[modality]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "modality": info.name,
        "num_classes": info.num_classes,
        "label_names": list(info.label_names),
        "preset": info.preset,
        "in_chans": model.backbone.in_chans,
        "input_size": list(info.input_size),
        "expert": model.expert_config.to_dict() | {"target_pattern": model.target_pattern},
        "decoder": model.decoder_config.to_dict(),
        "backbone": model.backbone.identity(),
        "provenance": {"saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        | info.provenance,
        "metrics": info.metrics,
        "dtype": dtype,
    }


def _fail(path: str | Path, problem: str) -> AdapterFormatError:
    return AdapterFormatError(f"{path}: {problem}")


def _require(condition: bool, path, problem: str) -> None:
    if not condition:
        raise _fail(path, problem)


def validate_metadata(metadata: Any, path: str | Path) -> dict[str, Any]:
    """Check types and ranges of an adapter's metadata; return it unchanged or raise AdapterFormatError."""
    _require(isinstance(metadata, dict), path, "metadata is not a JSON object")
    _require(metadata.get("format") == FORMAT, path, f"not an m4oe adapter (format {metadata.get('format')!r})")
    version = metadata.get("format_version")
    _require(isinstance(version, int), path, f"format_version must be an integer, got {version!r}")
    if version != FORMAT_VERSION:
        raise _fail(
            path,
            f"unknown format version {version} (this m4oe-adapters reads version {FORMAT_VERSION}); "
            "upgrade m4oe-adapters or re-export the adapter",
        )
    modality = metadata.get("modality")
    _require(
        isinstance(modality, str) and MODALITY_NAME.fullmatch(modality) is not None,
        path,
        f"bad modality name {str(modality)[:80]!r} (1-64 letters, digits, '_' or '-')",
    )
    num_classes = metadata.get("num_classes")
    _require(
        isinstance(num_classes, int) and not isinstance(num_classes, bool) and 1 <= num_classes <= 1024,
        path,
        f"num_classes must be an integer in [1, 1024], got {num_classes!r}",
    )
    labels = metadata.get("label_names")
    _require(
        isinstance(labels, list) and all(isinstance(label, str) and len(label) <= 128 for label in labels),
        path,
        "label_names must be a list of strings (at most 128 characters each)",
    )
    _require(len(labels) == num_classes, path, f"{len(labels)} label names for {num_classes} classes")
    preset = metadata.get("preset")
    _require(isinstance(preset, dict), path, "preset must be an object")
    if preset:
        try:
            validate_preset(preset)
        except ConfigError as error:
            raise _fail(path, f"bad preset: {error}") from None
    in_chans = metadata.get("in_chans")
    _require(isinstance(in_chans, int) and 1 <= in_chans <= 64, path, f"in_chans must be in [1, 64], got {in_chans!r}")
    size = metadata.get("input_size")
    _require(
        isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and 32 <= s <= 8192 for s in size),
        path,
        f"input_size must be [H, W] with 32 <= H, W <= 8192, got {size!r}",
    )
    expert = metadata.get("expert")
    _require(isinstance(expert, dict) and {"rank", "alpha"} <= set(expert), path, "expert config needs rank and alpha")
    try:  # stored back normalised, so later checks read well-typed values
        metadata["expert"] = ExpertConfig.from_dict(expert).to_dict()
        metadata["decoder"] = DecoderConfig.from_dict(metadata.get("decoder")).to_dict()
    except (ConfigError, TypeError, ValueError) as error:
        raise _fail(path, f"bad expert/decoder config: {error}") from None
    backbone = metadata.get("backbone")
    _require(isinstance(backbone, dict), path, "backbone identity missing")
    for key in ("family", "name", "fingerprint"):
        _require(isinstance(backbone.get(key), str), path, f"backbone.{key} must be a string")
    _require(isinstance(backbone.get("in_chans"), int), path, "backbone.in_chans must be an integer")
    for key in ("provenance", "metrics"):
        _require(isinstance(metadata.get(key, {}), dict), path, f"{key} must be an object")
    dtype = metadata.get("dtype")
    _require(isinstance(dtype, str) and dtype in DTYPES, path, f"dtype must be one of {sorted(DTYPES)}")
    return metadata


# ------------------------------------------------------------------------------------------------- header
def _source_name(source, name: str | None) -> str:
    return name or ("<bytes>" if isinstance(source, (bytes, bytearray)) else str(source))


def read_header(source: str | Path | bytes, name: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parse and check a safetensors header by hand (bounded size, known dtypes, offsets inside the file).

    Args:
        source: a file path, or the file's bytes (``name`` then labels error messages).

    Returns:
        ``(metadata, tensor_entries)``: the validated m4oe metadata and ``{name: {dtype, shape, data_offsets}}``.
    """
    path = _source_name(source, name)
    if isinstance(source, (bytes, bytearray)):
        size = len(source)
        prefix = bytes(source[:8])
    else:
        if not Path(source).is_file():
            raise AdapterFormatError(f"{path}: adapter file not found")
        size = Path(source).stat().st_size
        with open(source, "rb") as stream:
            prefix = stream.read(8)
    _require(len(prefix) == 8, path, "truncated: shorter than a safetensors header (not an adapter file?)")
    (header_length,) = struct.unpack("<Q", prefix)
    if prefix[:2] == b"PK" or prefix[:1] == b"\x80":
        raise _fail(path, "this is a pickle/zip (torch.save) file; adapters are only read from safetensors files")
    _require(
        0 < header_length <= MAX_HEADER_BYTES,
        path,
        f"header length {header_length} is outside 1..{MAX_HEADER_BYTES} bytes: not a safetensors file, or corrupt",
    )
    _require(header_length + 8 <= size, path, "truncated: the header runs past the end of the file")
    if isinstance(source, (bytes, bytearray)):
        raw = bytes(source[8 : 8 + header_length])
    else:
        with open(source, "rb") as stream:
            stream.seek(8)
            raw = stream.read(header_length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise _fail(path, f"corrupt header (not JSON: {type(error).__name__})") from None
    _require(isinstance(header, dict), path, "corrupt header (not a JSON object)")
    header_metadata = header.pop("__metadata__", None)
    _require(isinstance(header_metadata, dict), path, "no m4oe metadata: a safetensors file, but not an m4oe adapter")
    _require(
        header_metadata.get("format") == FORMAT,
        path,
        "no m4oe metadata: a safetensors file, but not an m4oe adapter (a PEFT folder? use import_peft)",
    )
    document = header_metadata.get("m4oe")
    _require(isinstance(document, str), path, "metadata field 'm4oe' missing")
    try:
        metadata = json.loads(document)
    except (json.JSONDecodeError, RecursionError):
        raise _fail(path, "metadata field 'm4oe' is not valid JSON") from None
    validate_metadata(metadata, path)
    _require(len(header) <= MAX_TENSORS, path, f"too many tensors ({len(header)})")
    data_length = size - 8 - header_length
    covered = 0
    for name, entry in header.items():
        _require(isinstance(entry, dict), path, f"tensor {name!r}: bad header entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        _require(
            isinstance(dtype, str) and dtype in SAFETENSORS_DTYPES,
            path,
            f"tensor {name!r}: dtype {str(dtype)[:40]!r} is not F32, F16 or BF16",
        )
        _require(
            isinstance(shape, list) and len(shape) <= 8 and all(isinstance(s, int) and 0 <= s < 2**31 for s in shape),
            path,
            f"tensor {name!r}: bad shape {shape!r}",
        )
        _require(
            isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets),
            path,
            f"tensor {name!r}: bad data offsets",
        )
        start, end = offsets
        _require(0 <= start <= end <= data_length, path, f"tensor {name!r}: data outside the file (truncated?)")
        _require(
            end - start == math.prod(shape) * SAFETENSORS_DTYPES[dtype],
            path,
            f"tensor {name!r}: {end - start} bytes for shape {shape} {dtype}",
        )
        covered += end - start
    _require(covered == data_length, path, "tensor data does not fill the file exactly (truncated or padded)")
    return metadata, header


def read_adapter(source: str | Path | bytes, name: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Metadata and tensors of an adapter (a path or the file's bytes), fully validated: header, metadata schema,
    tensor names, finite values. Every failure is an :class:`AdapterFormatError` naming the file."""
    path = _source_name(source, name)
    metadata, header = read_header(source, name)
    import safetensors.torch

    try:
        if isinstance(source, (bytes, bytearray)):
            tensors = safetensors.torch.load(bytes(source))
        else:
            tensors = safetensors.torch.load_file(str(source))
    except Exception as error:  # safetensors raises its own and Python errors for corrupt data: all mean corrupt
        raise _fail(path, f"corrupt tensor data ({type(error).__name__}: {str(error)[:200]})") from None
    if set(tensors) != set(header):
        raise _fail(path, "tensor table and tensor data disagree")
    dtypes = {tensor.dtype for tensor in tensors.values()}
    if len(dtypes) > 1:
        raise _fail(path, f"mixed tensor dtypes {sorted(str(d) for d in dtypes)}; an adapter has one dtype")
    for tensor_name, tensor in tensors.items():
        if not (tensor_name.startswith(EXPERT_PREFIX) or tensor_name.startswith(DECODER_PREFIX)):
            raise _fail(path, f"unexpected tensor {tensor_name!r} (expected experts.* or decoder.*)")
        if not bool(torch.isfinite(tensor).all()):
            raise _fail(path, f"tensor {tensor_name!r} holds NaN or Inf values: the adapter is corrupt")
    return metadata, tensors


# ------------------------------------------------------------------------------------------------- save / load
def save_adapter(
    model: SegmentationModel, modality: str, path: str | Path, *, dtype: str = "fp32"
) -> Path:
    """Write everything ``modality`` needs beyond the backbone to one safetensors file, atomically.

    Args:
        dtype: ``"fp32"`` (default), ``"fp16"`` or ``"bf16"`` for the stored tensors.

    Returns: the path written.
    """
    import safetensors.torch

    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model._require(modality)
    tensors = {
        key: tensor.detach().to("cpu", DTYPES[dtype]).contiguous()
        for key, tensor in model.modality_tensors(modality).items()
    }
    metadata = build_metadata(model, modality, dtype)
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "m4oe": json.dumps(metadata)}
    return atomic_write(path, lambda temporary: safetensors.torch.save_file(tensors, temporary, metadata=header))


def check_compatible(model: SegmentationModel, metadata: dict[str, Any], tensors, path, force: bool = False) -> None:
    """Refuse an adapter made for another backbone, channel count, layer set, rank or shapes."""
    identity = model.backbone.identity()
    theirs = metadata["backbone"]
    if theirs["fingerprint"] != identity["fingerprint"] and not force:
        raise BackboneMismatchError(
            f"{path}: adapter was trained on backbone {theirs['family']}:{theirs['name']} with fingerprint "
            f"{theirs['fingerprint'][:16]}… (weights {theirs.get('weights')}), but this model's backbone "
            f"{identity['family']}:{identity['name']} has fingerprint {identity['fingerprint'][:16]}… (weights "
            f"{identity['weights']}). Load the backbone the adapter was made for; force=True accepts the same "
            "architecture with other weights (outputs will differ)"
        )
    if metadata["in_chans"] != model.backbone.in_chans:
        raise BackboneMismatchError(
            f"{path}: adapter takes {metadata['in_chans']}-channel images, the backbone takes "
            f"{model.backbone.in_chans}; build the backbone with in_chans={metadata['in_chans']}"
        )
    expert = metadata["expert"]
    if expert["rank"] != model.expert_config.rank or float(expert["alpha"]) != float(model.expert_config.alpha):
        raise BackboneMismatchError(
            f"{path}: adapter has rank {expert['rank']} / alpha {expert['alpha']}, the model uses rank "
            f"{model.expert_config.rank} / alpha {model.expert_config.alpha}; build the model with the adapter's "
            "ExpertConfig (SegmentationModel.from_adapter does)"
        )
    if DecoderConfig.from_dict(metadata["decoder"]) != model.decoder_config:
        raise BackboneMismatchError(
            f"{path}: decoder config {metadata['decoder']} differs from the model's {model.decoder_config.to_dict()}"
        )
    expected = model.expected_tensor_shapes(metadata["num_classes"])
    theirs_layers = {k.rsplit(".", 1)[0] for k in tensors if k.startswith(EXPERT_PREFIX)}
    ours_layers = {k.rsplit(".", 1)[0] for k in expected if k.startswith(EXPERT_PREFIX)}
    if theirs_layers != ours_layers:
        only_theirs = sorted(theirs_layers - ours_layers)[:3]
        only_ours = sorted(ours_layers - theirs_layers)[:3]
        raise BackboneMismatchError(
            f"{path}: adapter layer set differs from the model's ({len(theirs_layers)} vs {len(ours_layers)} layers; "
            f"only in the file: {only_theirs}, only in the model: {only_ours}); the target pattern or backbone differ"
        )
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise BackboneMismatchError(f"{path}: tensors missing {missing[:3]} / unexpected {extra[:3]}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise BackboneMismatchError(
                f"{path}: tensor {key} has shape {tuple(tensors[key].shape)}, this backbone needs {shape}"
            )


def load_adapter(
    model: SegmentationModel, path: str | Path | bytes, *, replace: bool = False, force: bool = False,
    name: str | None = None,
) -> ModalityInfo:
    """Add the modality stored in ``path`` (or the file's bytes) to ``model`` (experts, router keys, decoder,
    head, labels, preset). A refused file leaves the model as it was.

    Args:
        replace: if the modality is already loaded, replace it (otherwise refuse).
        force: accept a backbone with another fingerprint but the same architecture (shapes are still checked).

    Returns: the new modality's :class:`ModalityInfo`.
    """
    metadata, tensors = read_adapter(path, name)
    path = _source_name(path, name)
    check_compatible(model, metadata, tensors, path, force=force)
    name = metadata["modality"]
    if name in model.modalities:
        if not replace:
            raise ConfigError(f"{path}: modality {name!r} is already loaded; pass replace=True to swap it")
        model.remove_modality(name)
    info = model.add_modality(
        name,
        metadata["num_classes"],
        metadata["label_names"],
        preset=metadata["preset"],
        input_size=metadata["input_size"],
    )
    try:
        model.set_modality_tensors(name, tensors)
    except (M4oEError, RuntimeError):
        model.remove_modality(name)
        raise
    info.provenance = dict(metadata.get("provenance", {}))
    info.metrics = dict(metadata.get("metrics", {}))
    return info


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """Metadata, tensor count, parameter count and size of an adapter file (validated, no model needed)."""
    metadata, tensors = read_adapter(path)
    experts = sum(t.numel() for k, t in tensors.items() if k.startswith(EXPERT_PREFIX))
    decoder = sum(t.numel() for k, t in tensors.items() if k.startswith(DECODER_PREFIX))
    return {
        "file": str(path),
        "size_bytes": Path(path).stat().st_size,
        "tensors": len(tensors),
        "parameters": experts + decoder,
        "expert_parameters": experts,
        "decoder_parameters": decoder,
        "expert_layers": len({k.rsplit(".", 1)[0] for k in tensors if k.startswith(EXPERT_PREFIX)}),
        "metadata": metadata,
    }


def model_from_adapter(
    path: str | Path, weights: str | Path | None, *, backbone=None, force: bool = False
) -> SegmentationModel:
    """Build the model an adapter describes (its backbone from ``weights``, its expert/decoder config) and load it.

    Args:
        weights: the backbone checkpoint the adapter was trained on (ignored when ``backbone`` is given).
        backbone: an already loaded backbone to reuse.
    """
    from .backbones import backbone_from_identity

    metadata, _ = read_header(path)
    if backbone is None:
        backbone = backbone_from_identity(metadata["backbone"], weights)
    expert = ExpertConfig.from_dict(metadata["expert"])
    model = SegmentationModel(backbone, expert, DecoderConfig.from_dict(metadata["decoder"]))
    load_adapter(model, path, force=force)
    return model
