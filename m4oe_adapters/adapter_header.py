"""The torch-free half of the adapter file format: header parsing and validation, and :func:`inspect_adapter`.

Everything here reads an adapter's bytes with the standard library, numpy and safetensors' own parser only, so the
commands that only look at files (``m4oe inspect``, ``m4oe zoo list``) start without importing torch. The rest of
the format (writing, loading into a model) is :mod:`m4oe_adapters.adapter_file`, which re-exports every name below.

Reading never unpickles: the header is bounded, parsed as strict JSON and checked by hand (metadata types and
ranges, one dtype, offsets tiling the data exactly) before safetensors touches the bytes, and every failure becomes
an :class:`~m4oe_adapters.errors.AdapterFormatError` naming the file (``docs/reliability.md``: what was tried).
"""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from .config import MODALITY_NAME, DecoderConfig, ExpertConfig
from .errors import AdapterFormatError, ConfigError
from .presets import validate_preset

FORMAT = "m4oe-adapter"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 8 * 1024 * 1024
MAX_TENSORS = 100_000
SAFETENSORS_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}  # bytes per element
SAFETENSORS_NAMES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
MAX_METADATA_DEPTH = 32
EXPERT_PREFIX = "experts."
DECODER_PREFIX = "decoder."
SIGNATURE_PREFIX = "signature."
SIGNATURE_TENSORS = ("mean", "components", "eigenvalues", "residual", "calibration")
SIGNATURE_NAMES = tuple(f"{SIGNATURE_PREFIX}{name}" for name in SIGNATURE_TENSORS)
# Every training mode writes this container. ``experts``/``decoder``: a modality of a SegmentationModel (tensors
# ``experts.*``/``decoder.*``, and its routing signature ``signature.*``). The baselines (``lora``, ``full``,
# ``scratch``) are not expert mixtures: their trained state dict is stored under ``model.`` (see
# segmenter_file.py); ``scratch`` has no backbone (metadata ``null``).
ADAPTER_MODES = ("experts", "decoder")
BASELINE_MODES = ("lora", "full", "scratch")
BASELINE_PREFIX = "model."


# ------------------------------------------------------------------------------------------------- metadata
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
        _require(isinstance(dtype, str) and dtype in SAFETENSORS_NAMES, path, f"dtype must be one of {sorted(SAFETENSORS_NAMES)}")
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
    _require(isinstance(dtype, str) and dtype in SAFETENSORS_NAMES, path, f"dtype must be one of {sorted(SAFETENSORS_NAMES)}")
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


def read_checked_bytes(source: str | Path | bytes, name: str | None = None) -> tuple[str, bytes, dict, dict]:
    """The bytes of an adapter (a path or the file's bytes) and their checked header.

    A file's header is checked before the file is read whole (a foreign or oversized file is refused unread), then
    the bytes read are checked exactly like bytes: one code path, and no memory map that another process could
    truncate under us.

    Returns:
        ``(path, data, metadata, tensor_entries)``: the name used in error messages, the bytes and
        :func:`read_header`'s result for them.
    """
    path = _source_name(source, name)
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        read_header(source, name)  # refuses a foreign or oversized file before reading it whole
        data = _read_file(source)
    metadata, header = read_header(data, path)
    return path, data, metadata, header


def _values(raw: memoryview, dtype: str) -> np.ndarray:
    """Little-endian safetensors values as a numpy array (BF16 widened exactly to float32: its bits are the top
    half of a float32's)."""
    if dtype == "BF16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, "<f4" if dtype == "F32" else "<f2")


def check_tensor_data(data: bytes, header: dict[str, Any], path: str | Path) -> None:
    """What :func:`~m4oe_adapters.adapter_file.read_adapter` checks after :func:`read_header`, without torch:
    safetensors' own parser accepts ``data`` and agrees with ``header`` on names and shapes, and every value is
    finite. Failures are the same :class:`AdapterFormatError` messages, naming ``path``."""
    import safetensors  # its parser alone (the Rust extension): safetensors.torch would import torch

    try:
        parsed = safetensors.deserialize(data)  # what safetensors.torch.load parses, before it wraps the bytes
    except Exception as error:  # safetensors raises its own and Python errors for corrupt data: all mean corrupt
        raise _fail(path, f"corrupt tensor data ({type(error).__name__}: {str(error)[:200]})") from None
    if {key: list(view["shape"]) for key, view in parsed} != {key: entry["shape"] for key, entry in header.items()}:
        raise _fail(path, "tensor table and tensor data disagree")
    # The tensors tile the data section exactly in one dtype (read_header), so one isfinite covers them all; names
    # are looked up only on failure.
    spans = sorted((entry["data_offsets"][0], entry["data_offsets"][1], key) for key, entry in header.items())
    if not spans:
        return
    dtype = header[spans[0][2]]["dtype"]
    section = memoryview(data)[len(data) - spans[-1][1] :]
    if not np.isfinite(_values(section, dtype)).all():
        bad = next(key for start, end, key in spans if not np.isfinite(_values(section[start:end], dtype)).all())
        raise _fail(path, f"tensor {bad!r} holds NaN or Inf values: the adapter is corrupt")


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """Metadata, tensor count, parameter count and size of an adapter file (no model needed).

    The file is validated exactly as :func:`~m4oe_adapters.adapter_file.read_adapter` validates it (header,
    metadata, safetensors' parse, every value finite), with the same errors, but without torch: the counts come from
    the checked tensor table.
    """
    name, data, metadata, header = read_checked_bytes(path)
    check_tensor_data(data, header, name)
    sizes = {key: math.prod(entry["shape"]) for key, entry in header.items()}
    return {
        "file": str(path),
        "size_bytes": len(data),
        "tensors": len(header),
        "parameters": sum(sizes.values()),  # baselines: their whole stored state dict
        "expert_parameters": sum(n for key, n in sizes.items() if key.startswith(EXPERT_PREFIX)),
        "decoder_parameters": sum(n for key, n in sizes.items() if key.startswith(DECODER_PREFIX)),
        "expert_layers": len({key.rsplit(".", 1)[0] for key in header if key.startswith(EXPERT_PREFIX)}),
        "routing_signature_bytes": sum(entry["data_offsets"][1] - entry["data_offsets"][0]
                                       for key, entry in header.items() if key.startswith(SIGNATURE_PREFIX)),
        "metadata": metadata,
    }
