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
"""
from __future__ import annotations

import datetime
import json
import math
import os
import re
import secrets
import struct
import time
from pathlib import Path
from typing import Any

import torch

from .config import MODALITY_NAME, DecoderConfig, ExpertConfig
from .errors import AdapterError, AdapterFormatError, BackboneMismatchError, ConfigError, M4oEError
from .model import DECODER_PREFIX, EXPERT_PREFIX, ModalityInfo, SegmentationModel
from .presets import validate_preset
from .signatures import CALIBRATION_POINTS, SIGNATURE_PREFIX, SIGNATURE_TENSORS, ImageSignature

FORMAT = "m4oe-adapter"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 8 * 1024 * 1024
MAX_TENSORS = 100_000
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAFETENSORS_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}  # bytes per element
SAFETENSORS_NAMES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
MAX_METADATA_DEPTH = 32
SIGNATURE_NAMES = tuple(f"{SIGNATURE_PREFIX}{name}" for name in SIGNATURE_TENSORS)
# Every training mode writes this container. ``experts``/``decoder``: a modality of a SegmentationModel (tensors
# ``experts.*``/``decoder.*``, and its routing signature ``signature.*``). The baselines (``lora``, ``full``,
# ``scratch``) are not expert mixtures: their trained state dict is stored under ``model.`` (see
# segmenter_file.py); ``scratch`` has no backbone (metadata ``null``).
ADAPTER_MODES = ("experts", "decoder")
BASELINE_MODES = ("lora", "full", "scratch")
BASELINE_PREFIX = "model."


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


def _fail(path: str | Path, problem: str) -> AdapterFormatError:
    return AdapterFormatError(f"{path}: {problem}")


def _require(condition: bool, path, problem: str) -> None:
    if not condition:
        raise _fail(path, problem)


def _is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON ``true`` arrives as a Python ``int`` subclass)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)


def _shown(value: Any) -> str:
    """A hostile value as it may appear in a message: its repr, cut to 120 characters."""
    return repr(value)[:120]


def _parse_json(raw: bytes | str, path, what: str) -> Any:
    """Strict JSON from an untrusted file: UTF-8, no duplicate keys, no NaN/Infinity, no 4 300-digit integers.

    Python's ``json`` silently keeps the last of duplicate keys and accepts ``NaN``; two readers (ours and
    safetensors') could then disagree about what a file holds, so both are refused.
    """

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            duplicated = next(key for index, (key, _) in enumerate(pairs) if key in dict(pairs[:index]))
            raise ValueError(f"duplicate key {_shown(duplicated)}")
        return result

    def no_constant(name: str) -> None:
        raise ValueError(f"non-standard number {name}")

    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, object_pairs_hook=unique_keys, parse_constant=no_constant)
    except (ValueError, RecursionError) as error:  # ValueError: bad UTF-8, bad JSON, huge integers, the hooks above
        raise _fail(path, f"{what} is not valid JSON ({type(error).__name__}: {str(error)[:100]})") from None


def _check_values(document: Any, path) -> None:
    """Walk the metadata once (no recursion): bounded nesting, finite numbers, integers within ±2**53 (so any
    later ``float()`` is exact and cannot overflow), strings that are valid Unicode (no lone surrogates)."""
    stack = [(document, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            _require(depth < MAX_METADATA_DEPTH, path, f"metadata nested deeper than {MAX_METADATA_DEPTH} levels")
            children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _fail(path, f"metadata string {_shown(value)} is not valid Unicode") from None
        elif isinstance(value, float):
            _require(math.isfinite(value), path, f"metadata holds a non-finite number {value!r}")
        elif _is_int(value):
            _require(abs(value) <= 2**53, path, f"metadata integer {_shown(value)} is out of range")


def _printable(value: Any, limit: int = 1024) -> bool:
    """A string ``m4oe inspect`` can print as is: no control characters (a file must not drive the terminal)."""
    return isinstance(value, str) and len(value) <= limit and value.isprintable()


MAX_LABEL_CHARACTERS = 128


def label_names_problem(labels: Any) -> str | None:
    """Why ``labels`` cannot go into an adapter file (``None``: they can): training checks this before it starts,
    the reader on every file."""
    if not isinstance(labels, (list, tuple)):
        return "label_names must be a list of printable strings"
    for label in labels:
        if not _printable(label, MAX_LABEL_CHARACTERS):
            return (f"label name {_shown(label)} is not a printable string of at most {MAX_LABEL_CHARACTERS} "
                    "characters (label_names must be a list of printable strings, at most 128 characters each)")
    return None


def validate_metadata(metadata: Any, path: str | Path) -> dict[str, Any]:
    """Check types and ranges of an adapter's metadata; return it (expert and decoder configs normalised, so later
    code reads well-typed values) or raise AdapterFormatError naming ``path``."""
    _require(isinstance(metadata, dict), path, "metadata is not a JSON object")
    _check_values(metadata, path)
    _require(metadata.get("format") == FORMAT, path, f"not an m4oe adapter (format {_shown(metadata.get('format'))})")
    version = metadata.get("format_version")
    _require(_is_int(version), path, f"format_version must be an integer, got {_shown(version)}")
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
        f"bad modality name {_shown(modality)} (1-64 letters, digits, '_' or '-')",
    )
    num_classes = metadata.get("num_classes")
    _require(
        _is_int(num_classes) and 1 <= num_classes <= 1024,
        path,
        f"num_classes must be an integer in [1, 1024], got {_shown(num_classes)}",
    )
    labels = metadata.get("label_names")
    _require(isinstance(labels, list), path, "label_names must be a list")
    problem = label_names_problem(labels)
    _require(problem is None, path, str(problem))
    _require(len(labels) == num_classes, path, f"{len(labels)} label names for {num_classes} classes")
    mode = metadata.setdefault("mode", "experts")  # files written before the field are expert adapters
    _require(
        mode in ADAPTER_MODES + BASELINE_MODES,
        path,
        f"unknown training mode {_shown(mode)} (one of {', '.join(ADAPTER_MODES + BASELINE_MODES)})",
    )
    preset = metadata.get("preset")
    _require(isinstance(preset, dict), path, "preset must be an object")
    if preset:
        try:
            validate_preset(preset)
        except (ConfigError, TypeError, ValueError, ArithmeticError) as error:
            raise _fail(path, f"bad preset: {str(error)[:200]}") from None
    in_chans = metadata.get("in_chans")
    _require(_is_int(in_chans) and 1 <= in_chans <= 64, path, f"in_chans must be in [1, 64], got {_shown(in_chans)}")
    size = metadata.get("input_size")
    _require(
        isinstance(size, list) and len(size) == 2 and all(_is_int(s) and 32 <= s <= 8192 for s in size),
        path,
        f"input_size must be [H, W] with 32 <= H, W <= 8192, got {_shown(size)}",
    )
    if mode == "scratch":  # a U-Net of its own: no backbone, experts or shared decoder to describe
        _require(metadata.get("backbone") is None, path, "a scratch-mode file has no backbone (backbone must be null)")
        for key in ("provenance", "metrics"):
            _require(isinstance(metadata.get(key, {}), dict), path, f"{key} must be an object")
        dtype = metadata.get("dtype")
        _require(isinstance(dtype, str) and dtype in DTYPES, path, f"dtype must be one of {sorted(DTYPES)}")
        return metadata
    expert = metadata.get("expert")
    _require(isinstance(expert, dict) and {"rank", "alpha"} <= set(expert), path, "expert config needs rank and alpha")
    decoder = metadata.get("decoder")
    _require(isinstance(decoder, dict), path, "decoder config must be an object")
    # ExpertConfig/DecoderConfig accept bools as integers and leave init_std unchecked: typed here first.
    for section, key, check in (
        (expert, "rank", _is_int), (expert, "alpha", _is_number), (expert, "gate_temperature", _is_number),
        (expert, "init_std", _is_number), (decoder, "channels", _is_int), (decoder, "stem_channels", _is_int),
    ):
        if key in section:
            _require(check(section[key]), path, f"{key} has the wrong type: {_shown(section[key])}")
    _require(expert.get("top_k") is None or _is_int(expert["top_k"]), path, "expert top_k must be an integer or null")
    _require(
        expert.get("target_pattern") is None or _printable(expert["target_pattern"]),
        path,
        "expert target_pattern must be a printable string of at most 1024 characters",
    )
    _require(expert.get("init_std", 0) >= 0, path, "expert init_std must be >= 0")
    try:  # stored back normalised, so later checks read well-typed values
        metadata["expert"] = ExpertConfig.from_dict(expert).to_dict()
        metadata["decoder"] = DecoderConfig.from_dict(decoder).to_dict()
    except (ConfigError, TypeError, ValueError, ArithmeticError, RecursionError) as error:
        raise _fail(path, f"bad expert/decoder config: {type(error).__name__}: {str(error)[:200]}") from None
    backbone = metadata.get("backbone")
    _require(isinstance(backbone, dict), path, "backbone identity missing")
    for key in ("family", "name", "fingerprint"):
        _require(_printable(backbone.get(key), 256), path, f"backbone.{key} must be a printable string")
    _require(
        backbone.get("weights") is None or _printable(backbone["weights"]), path, "backbone.weights must be a string"
    )
    _require(
        backbone.get("in_chans") == in_chans and _is_int(backbone.get("in_chans")),
        path,
        f"backbone.in_chans {_shown(backbone.get('in_chans'))} differs from in_chans {in_chans}",
    )
    for key in ("provenance", "metrics"):
        _require(isinstance(metadata.get(key, {}), dict), path, f"{key} must be an object")
    dtype = metadata.get("dtype")
    _require(isinstance(dtype, str) and dtype in DTYPES, path, f"dtype must be one of {sorted(DTYPES)}")
    routing = metadata.get("routing")
    if routing is not None:
        _require(isinstance(routing, dict), path, "routing must be an object")
        _require(_printable(routing.get("feature"), 64), path, "routing.feature must be a short printable string")
        confidence = routing.get("min_confidence")
        _require(_is_number(confidence) and 0 <= confidence <= 1, path, "routing.min_confidence must be in [0, 1]")
        for key in ("images", "views"):
            _require(_is_int(routing.get(key)) and 0 <= routing[key] <= 10**9, path, f"routing.{key} must be a count")
        hashes = routing.get("image_hashes", [])
        _require(
            isinstance(hashes, list) and all(isinstance(h, str) and re.fullmatch(r"[0-9a-f]{1,64}", h) for h in hashes),
            path, "routing.image_hashes must be a list of hexadecimal strings",
        )
    return metadata


# ------------------------------------------------------------------------------------------------- header
def _source_name(source, name: str | None) -> str:
    return name or ("<bytes>" if isinstance(source, (bytes, bytearray)) else str(source))


def _foreign_file(prefix: bytes) -> str | None:
    """What a file that is not a safetensors adapter looks like, from its first bytes (``None``: no guess). Only
    used once the safetensors header has failed to parse: valid header lengths can begin with the same bytes."""
    if prefix[:1] == b"\x80" and 2 <= prefix[1] <= 5 or prefix[:4] == b"PK\x03\x04":
        return "this is a pickle/zip (torch.save) file; adapters are only read from safetensors files"
    return None


def read_header(source: str | Path | bytes, name: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parse and check a safetensors header by hand: bounded size, strict JSON, valid m4oe metadata, tensors named
    ``experts.*``/``decoder.*`` in the metadata's dtype, shapes and offsets that tile the data exactly.

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
            raise AdapterFormatError(f"{path}: adapter file not found (or not a regular file)")
        try:
            size = Path(source).stat().st_size
            with open(source, "rb") as stream:
                prefix = stream.read(8)
        except OSError as error:
            raise _fail(path, f"cannot be read ({error.strerror or error})") from None
    _require(len(prefix) == 8, path, "truncated: shorter than a safetensors header (not an adapter file?)")
    (header_length,) = struct.unpack("<Q", prefix)
    # The first 8 bytes are the header length, so they may be any bytes: a valid header of 0x4D80 bytes starts
    # with 0x80 (pickle's PROTO opcode), one of 0x4B50 bytes with "PK" (zip). Only a header that cannot be parsed
    # is explained as a pickle/zip file; it is never refused on its first bytes alone.
    # Bounded before anything is allocated: a header claiming 2**63 bytes is refused here.
    _require(
        0 < header_length <= MAX_HEADER_BYTES,
        path,
        _foreign_file(prefix)
        or f"header length {header_length} is outside 1..{MAX_HEADER_BYTES} bytes: not a safetensors file, or corrupt",
    )
    _require(
        header_length + 8 <= size, path, _foreign_file(prefix) or "truncated: the header runs past the end of the file"
    )
    if isinstance(source, (bytes, bytearray)):
        raw = bytes(source[8 : 8 + header_length])
    else:
        try:
            with open(source, "rb") as stream:
                stream.seek(8)
                raw = stream.read(header_length)
        except OSError as error:
            raise _fail(path, f"cannot be read ({error.strerror or error})") from None
    foreign = _foreign_file(prefix)
    if foreign and not raw.lstrip(b" ").startswith(b"{"):  # a safetensors header is a JSON object
        raise _fail(path, foreign)
    header = _parse_json(raw, path, "the header")
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
    metadata = validate_metadata(_parse_json(document, path, "metadata field 'm4oe'"), path)
    _require(len(header) <= MAX_TENSORS, path, f"too many tensors ({len(header)})")
    expected_dtype = SAFETENSORS_NAMES[metadata["dtype"]]
    prefixes = (EXPERT_PREFIX, DECODER_PREFIX) if metadata["mode"] in ADAPTER_MODES else (BASELINE_PREFIX,)
    spans = []
    for tensor_name, entry in header.items():
        _require(
            tensor_name.startswith(prefixes) or (metadata["mode"] in ADAPTER_MODES and tensor_name in SIGNATURE_NAMES),
            path,
            f"unexpected tensor {_shown(tensor_name)} in a {metadata['mode']}-mode file "
            f"(expected {' or '.join(p + '*' for p in prefixes)}"
            f"{' or ' + ', '.join(SIGNATURE_NAMES) if metadata['mode'] in ADAPTER_MODES else ''})",
        )
        _require(isinstance(entry, dict), path, f"tensor {_shown(tensor_name)}: bad header entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        _require(
            isinstance(dtype, str) and dtype in SAFETENSORS_DTYPES,
            path,
            f"tensor {_shown(tensor_name)}: dtype {_shown(dtype)} is not F32, F16 or BF16",
        )
        _require(
            dtype == expected_dtype,
            path,
            f"tensor {_shown(tensor_name)}: dtype {dtype}, but the metadata says {metadata['dtype']} (one dtype per adapter)",
        )
        # Shape entries below 2**31 and a byte count that must match the file: a shape claiming 2**40 elements is
        # refused here, by arithmetic, before safetensors allocates anything.
        _require(
            isinstance(shape, list) and len(shape) <= 8 and all(_is_int(s) and 0 <= s < 2**31 for s in shape),
            path,
            f"tensor {_shown(tensor_name)}: bad shape {_shown(shape)}",
        )
        _require(
            isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets),
            path,
            f"tensor {_shown(tensor_name)}: bad data offsets",
        )
        start, end = offsets
        _require(
            end - start == math.prod(shape) * SAFETENSORS_DTYPES[dtype],
            path,
            f"tensor {_shown(tensor_name)}: {end - start} bytes for shape {shape} {dtype}",
        )
        spans.append((start, end, tensor_name))
    cursor = 0
    for start, end, tensor_name in sorted(spans):
        _require(start == cursor, path, f"tensor {_shown(tensor_name)}: data overlaps another tensor or leaves a gap")
        cursor = end
    _require(cursor == size - 8 - header_length, path, "tensor data does not fill the file exactly (truncated or padded)")
    return metadata, header


def _read_file(path: str | Path) -> bytes:
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except OSError as error:
        raise _fail(path, f"cannot be read ({error.strerror or error})") from None


def read_adapter(source: str | Path | bytes, name: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Metadata and tensors of an adapter (a path or the file's bytes), fully validated: header, metadata schema,
    tensor names, finite values. Every failure is an :class:`AdapterFormatError` naming the file.

    A file is read into memory once and then checked exactly like bytes (one code path; no memory map that another
    process could truncate under us).
    """
    path = _source_name(source, name)
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        read_header(source, name)  # refuses a foreign or oversized file before reading it whole
        data = _read_file(source)
    metadata, header = read_header(data, path)
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
            outputs: they are cast to the backbone's dtype at use); for serving, not for training.

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
                    model.signatures.get(name), next(model.decoders[name].parameters()).dtype)
        model.remove_modality(name)
    try:
        info = model.add_modality(
            name,
            metadata["num_classes"],
            metadata["label_names"],
            preset=metadata["preset"],
            input_size=metadata["input_size"],
            dtype=DTYPES[metadata["dtype"]] if keep_dtype else None,
        )
        try:
            model.set_modality_tensors(name, tensors)
        except BaseException:
            model.remove_modality(name)
            raise
    except BaseException:
        if previous is not None:
            old_info, old_tensors, old_signature, old_dtype = previous
            model.add_modality(name, old_info.num_classes, old_info.label_names, dtype=old_dtype)
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


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """Metadata, tensor count, parameter count and size of an adapter file (validated, no model needed)."""
    metadata, tensors = read_adapter(path)
    signature = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(SIGNATURE_PREFIX))
    experts = sum(t.numel() for k, t in tensors.items() if k.startswith(EXPERT_PREFIX))
    decoder = sum(t.numel() for k, t in tensors.items() if k.startswith(DECODER_PREFIX))
    return {
        "file": str(path),
        "size_bytes": Path(path).stat().st_size,
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),  # baselines: their whole stored state dict
        "expert_parameters": experts,
        "decoder_parameters": decoder,
        "expert_layers": len({k.rsplit(".", 1)[0] for k in tensors if k.startswith(EXPERT_PREFIX)}),
        "routing_signature_bytes": signature,
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
    _require_expert_mode(metadata, path)
    if backbone is None:
        backbone = backbone_from_identity(metadata["backbone"], weights)
    expert = ExpertConfig.from_dict(metadata["expert"])
    model = SegmentationModel(backbone, expert, DecoderConfig.from_dict(metadata["decoder"]))
    load_adapter(model, path, force=force)
    return model
