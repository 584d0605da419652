"""The adapter file format: one safetensors file per modality.

Tensors (fixed prefixes, keyed by the backbone's own layer names)::

    experts.<layer>.lora_A      [r, in]     experts.<layer>.lora_B   [out, r]     experts.<layer>.router_key  [in]
    decoder.<param>             the modality's decoder and head

Header metadata (safetensors ``__metadata__``, strings only): ``format`` = ``m4oe-adapter``, ``format_version``,
and ``m4oe``: one JSON document with the modality, label names, class count, preprocessing preset, input channels
and size, expert config (rank/alpha/targets), decoder config, backbone identity (family, name, fingerprint) and
provenance/metrics. See :func:`validate_metadata` for the checks applied on read.

Reading never unpickles: the header is bounded, parsed as strict JSON and checked by hand (metadata types and
ranges, one dtype, offsets tiling the data exactly) before safetensors touches the bytes, and every failure becomes
an :class:`~m4oe_adapters.errors.AdapterFormatError` naming the file (``docs/reliability.md``: what was tried). Writing goes to a temporary
file in the same folder, is fsync'ed, then renamed over the target, so a crash leaves the old file intact.

The checks that need no torch (header, metadata, :func:`inspect_adapter`) live in
:mod:`m4oe_adapters.adapter_header` and are re-exported here.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

import torch

from .adapter_header import (  # noqa: F401 - re-exported: the torch-free half of the format lives there
    ADAPTER_MODES,
    BASELINE_MODES,
    BASELINE_PREFIX,
    DECODER_PREFIX,
    EXPERT_PREFIX,
    FORMAT,
    FORMAT_VERSION,
    MAX_HEADER_BYTES,
    MAX_LABEL_CHARACTERS,
    MAX_METADATA_DEPTH,
    MAX_TENSORS,
    SAFETENSORS_DTYPES,
    SAFETENSORS_NAMES,
    SIGNATURE_NAMES,
    SIGNATURE_PREFIX,
    SIGNATURE_TENSORS,
    _fail,
    _source_name,
    check_tensor_data,
    inspect_adapter,
    label_names_problem,
    read_checked_bytes,
    read_header,
    validate_metadata,
)
from .config import DecoderConfig, ExpertConfig
from .decoder import PackedDecoder, stored_dtype
from .errors import AdapterError, AdapterFormatError, BackboneMismatchError, ConfigError
from .model import ModalityInfo, SegmentationModel
from .signatures import CALIBRATION_POINTS, ImageSignature

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------- atomic write
def atomic_write(path: str | Path, write: Any) -> Path:
    """Call ``write(temporary_path)``, fsync it, then rename it to ``path`` (same folder, so the rename is atomic).

    On any failure, and after a crash or SIGKILL at any moment, ``path`` holds its previous content or the new
    complete content, never a mix; a killed writer may leave a temporary ``.<name>.<random>.tmp`` next to it (see
    :func:`cleanup_stale_temporaries`). Generic: adapters, checkpoints and reports all go through it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Mode 0o666 minus the umask, like a plain open(): tempfile.mkstemp (and safetensors' own writer) use 0o600,
    # which would leave adapters unreadable to the service account of a deployment.
    while True:
        temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        mode = temporary.stat().st_mode & 0o777
        write(str(temporary))
        os.chmod(temporary, mode)  # the writer may have replaced the file with a private one
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; best effort, some file systems cannot fsync a folder
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError:
        pass
    return path


TEMPORARY_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


def cleanup_stale_temporaries(folder: str | Path, older_than_seconds: float = 0.0) -> int:
    """Remove temporary files (``.<name>.<8 hex digits>.tmp``) that a killed :func:`atomic_write` left in
    ``folder``; returns how many.

    They never carry a final name, so readers never see them; this only reclaims the space. While another process
    may be writing into ``folder``, pass ``older_than_seconds`` (e.g. 3600) so its in-progress file is kept.
    """
    removed = 0
    now = time.time()
    for path in Path(folder).glob(".*.tmp"):
        try:
            if TEMPORARY_NAME.fullmatch(path.name) and now - path.lstat().st_mtime >= older_than_seconds:
                path.unlink()
                removed += 1
        except FileNotFoundError:  # its writer finished or cleaned up meanwhile
            continue
    return removed


# ------------------------------------------------------------------------------------------------- metadata
def build_metadata(model: SegmentationModel, modality: str, dtype: str) -> dict[str, Any]:
    info = model.modalities[modality]
    signatures = getattr(model, "signatures", {})  # baseline files (segmenter_file) are not routed: none
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
        "mode": info.provenance.get("mode", "experts"),
    } | ({"routing": signatures[modality].metadata()} if modality in signatures else {})



def read_adapter(source: str | Path | bytes, name: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Metadata and tensors of an adapter (a path or the file's bytes), fully validated: header, metadata schema,
    tensor names, finite values. Every failure is an :class:`AdapterFormatError` naming the file.

    A file is read into memory once and then checked exactly like bytes (:func:`read_checked_bytes`).
    :func:`inspect_adapter` applies the same checks without torch (:func:`check_tensor_data`).
    """
    path, data, metadata, header = read_checked_bytes(source, name)
    import safetensors.torch

    try:
        tensors = safetensors.torch.load(data)  # safetensors' own parser of these bytes, not torch.load: no pickle
    except Exception as error:  # safetensors raises its own and Python errors for corrupt data: all mean corrupt
        raise _fail(path, f"corrupt tensor data ({type(error).__name__}: {str(error)[:200]})") from None
    if set(tensors) != set(header) or any(list(t.shape) != header[k]["shape"] for k, t in tensors.items()):
        raise _fail(path, "tensor table and tensor data disagree")
    # One isfinite over everything (per-tensor calls cost far more on small tensors); names only on failure.
    if tensors and not bool(torch.isfinite(torch.cat([t.reshape(-1) for t in tensors.values()])).all()):
        bad = next(k for k, t in tensors.items() if not bool(torch.isfinite(t).all()))
        raise _fail(path, f"tensor {bad!r} holds NaN or Inf values: the adapter is corrupt")
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
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model._require(modality)
    tensors = {
        key: tensor.detach().to("cpu", DTYPES[dtype]).contiguous()
        for key, tensor in model.modality_tensors(modality).items()
    }
    if modality in model.signatures:
        tensors |= {key: tensor.to(DTYPES[dtype]) for key, tensor in model.signatures[modality].tensors().items()}
    metadata = build_metadata(model, modality, dtype)
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "m4oe": json.dumps(metadata)}
    return write_checked(path, tensors, header)


def write_checked(path: str | Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> Path:
    """Serialise ``tensors`` with safetensors ``header`` metadata, check the bytes with the reader's own rules
    (:func:`read_adapter`), then write them atomically: a writer must never produce a file its reader refuses.

    Raises:
        AdapterFormatError: what :func:`load_adapter` would say about the file, prefixed with "refusing to write".
    """
    import safetensors.torch

    data = safetensors.torch.save(tensors, metadata=header)
    try:
        read_adapter(data, str(path))
    except AdapterFormatError as error:
        raise AdapterFormatError(f"refusing to write an adapter m4oe could not read back: {error}") from None
    return atomic_write(path, lambda temporary: Path(temporary).write_bytes(data))


def _require_expert_mode(metadata: dict[str, Any], path) -> None:
    if metadata["mode"] not in ADAPTER_MODES:
        raise AdapterFormatError(
            f"{path}: a {metadata['mode']}-mode file (a baseline, not a modality of an expert model); load it with "
            "m4oe_adapters.load_segmenter (m4oe eval --adapter / predict / inspect accept it)"
        )


def sign_adapter(path: str | Path, signature: ImageSignature, output: str | Path, *, overwrite: bool = False) -> Path:
    """Write a copy of adapter ``path`` with ``signature`` as its routing signature (replacing any old one).

    Every other tensor and metadata field is copied unchanged (same bytes), so the experts, decoder and backbone
    binding stay identical. ``output`` may be ``path`` itself only with ``overwrite=True``; an existing ``output``
    is never replaced without it.
    """

    output = Path(output)
    if output.exists() and not overwrite:
        raise AdapterError(f"{output} exists; pass overwrite=True (--overwrite) to replace it")
    metadata, tensors = read_adapter(path)
    dtype = DTYPES[metadata["dtype"]]
    tensors = {key: tensor for key, tensor in tensors.items() if not key.startswith(SIGNATURE_PREFIX)}
    tensors |= {key: tensor.to(dtype) for key, tensor in signature.tensors().items()}
    metadata["routing"] = signature.metadata()
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "m4oe": json.dumps(metadata)}
    return write_checked(output, tensors, header)


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
            "ExpertConfig (model_from_adapter(file, weights) does)"
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
    signature_keys = {key for key in tensors if key.startswith(SIGNATURE_PREFIX)}
    check_signature(metadata, tensors, signature_keys, path)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected) - signature_keys)
    if missing or extra:
        raise BackboneMismatchError(f"{path}: tensors missing {missing[:3]} / unexpected {extra[:3]}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise BackboneMismatchError(
                f"{path}: tensor {key} has shape {tuple(tensors[key].shape)}, this backbone needs {shape}"
            )


def check_signature(metadata: dict[str, Any], tensors, signature_keys: set[str], path) -> None:
    """A routing signature is all or nothing: metadata and the three tensors, with the shapes of this version's
    descriptor (a signature of another descriptor version is refused: re-sign the adapter with ``m4oe sign``)."""
    from .signatures import FEATURE_VERSION, descriptor_size

    routing = metadata.get("routing")
    if routing is None and not signature_keys:
        return
    if routing is None or signature_keys != set(SIGNATURE_NAMES):
        raise AdapterFormatError(f"{path}: incomplete routing signature (metadata and tensors {SIGNATURE_NAMES} "
                                 "must all be present); re-sign the adapter with `m4oe sign`")
    if routing["feature"] != FEATURE_VERSION:
        raise AdapterFormatError(f"{path}: routing signature of descriptor {routing['feature']!r}; this version "
                                 f"reads {FEATURE_VERSION!r}: re-sign the adapter with `m4oe sign`")
    size = descriptor_size()
    components = tensors[f"{SIGNATURE_PREFIX}components"].shape
    if len(components) != 2 or not 1 <= components[0] <= 64:
        raise AdapterFormatError(f"{path}: signature.components has shape {tuple(components)}, expected [k, {size}]")
    shapes = {"mean": (size,), "components": (components[0], size), "eigenvalues": (components[0],),
              "residual": (size,), "calibration": (CALIBRATION_POINTS,)}
    for name, shape in shapes.items():
        tensor = tensors[f"{SIGNATURE_PREFIX}{name}"]
        if tuple(tensor.shape) != shape:
            raise AdapterFormatError(f"{path}: signature.{name} has shape {tuple(tensor.shape)}, expected {shape}")
    for name in ("eigenvalues", "residual"):
        if not bool((tensors[f"{SIGNATURE_PREFIX}{name}"].float() > 0).all()):
            raise AdapterFormatError(f"{path}: signature.{name} must be positive; re-sign the adapter")
    calibration = tensors[f"{SIGNATURE_PREFIX}calibration"].float()
    if not bool((calibration[1:] >= calibration[:-1]).all()) or float(calibration[0]) < 0:
        raise AdapterFormatError(f"{path}: signature.calibration must be non-negative and sorted; re-sign the adapter")


def load_adapter(
    model: SegmentationModel, path: str | Path | bytes, *, replace: bool = False, force: bool = False,
    name: str | None = None, keep_dtype: bool = False,
) -> ModalityInfo:
    """Add the modality stored in ``path`` (or the file's bytes) to ``model`` (experts, router keys, decoder,
    head, labels, preset). A refused file leaves the model as it was.

    Args:
        replace: if the modality is already loaded, replace it (otherwise refuse).
        force: accept a backbone with another fingerprint but the same architecture (shapes are still checked).
        keep_dtype: store the experts and decoder in the file's dtype (fp16/bf16 files: half the memory, the same
            outputs: they are cast to the backbone's dtype at use) and the decoder packed in one buffer
            (:class:`~m4oe_adapters.decoder.PackedDecoder`); for serving, not for training.

    Returns: the new modality's :class:`ModalityInfo`.
    """
    metadata, tensors = read_adapter(path, name)
    path = _source_name(path, name)
    _require_expert_mode(metadata, path)
    check_compatible(model, metadata, tensors, path, force=force)
    name = metadata["modality"]
    active, chosen = model.active_modality, model._modality_chosen
    previous = None
    if name in model.modalities:
        if not replace:
            raise ConfigError(f"{path}: modality {name!r} is already loaded; pass replace=True to swap it")
        # Kept until the new one is in place, so even a failure after this point leaves the model as it was.
        previous = (model.modalities[name], {k: t.detach().clone() for k, t in model.modality_tensors(name).items()},
                    model.signatures.get(name), model.decoders[name])
        model.remove_modality(name)
    try:
        info = model.add_modality(
            name,
            metadata["num_classes"],
            metadata["label_names"],
            preset=metadata["preset"],
            input_size=metadata["input_size"],
            dtype=DTYPES[metadata["dtype"]] if keep_dtype else None,
            packed=keep_dtype,
        )
        try:
            model.set_modality_tensors(name, tensors)
        except BaseException:
            model.remove_modality(name)
            raise
    except BaseException:
        if previous is not None:
            old_info, old_tensors, old_signature, old_decoder = previous
            model.add_modality(name, old_info.num_classes, old_info.label_names, dtype=stored_dtype(old_decoder),
                               packed=isinstance(old_decoder, PackedDecoder))
            model.set_modality_tensors(name, old_tensors)
            model.modalities[name] = old_info
            model.set_signature(name, old_signature)
            model.active_modality, model._modality_chosen = active, chosen
        raise
    if active is not None:
        model.active_modality, model._modality_chosen = active, chosen  # replacing the active one keeps it active
    if "routing" in metadata:
        model.set_signature(name, ImageSignature.from_file(metadata["routing"], tensors))
    info.provenance = dict(metadata.get("provenance", {}))
    info.metrics = dict(metadata.get("metrics", {}))
    return info


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
    _require_expert_mode(metadata, path)
    if backbone is None:
        backbone = backbone_from_identity(metadata["backbone"], weights)
    expert = ExpertConfig.from_dict(metadata["expert"])
    model = SegmentationModel(backbone, expert, DecoderConfig.from_dict(metadata["decoder"]))
    load_adapter(model, path, force=force)
    return model
