"""Hostile adapter files: thousands of mutated, truncated, oversized and ill-typed variants of a valid file each end
in the library's typed error naming the file (or load, when the mutation is harmless) — never another exception,
never a hang, never a half-loaded model.

``M4OE_FUZZ_EXAMPLES`` (default 10 000) is the number of generated cases, shared between the two properties below.
They run in memory through the same code path as files (``read_adapter``/``load_adapter`` accept the file's bytes);
every case whose metadata reads, and a sample of the refused ones, also goes through ``m4oe inspect`` on a real
file. Run with ``-s`` to see the case counts.
"""
from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import math
import os
import struct
from collections import Counter
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m4oe_adapters import (
    AdapterFormatError,
    BackboneMismatchError,
    ConfigError,
    DecoderConfig,
    ExpertConfig,
    SegmentationModel,
    inspect_adapter,
    load_adapter,
    save_adapter,
)
from m4oe_adapters.adapter_file import read_adapter, read_header
from m4oe_adapters.cli import main

from conftest import tiny_backbone

EXAMPLES = int(os.environ.get("M4OE_FUZZ_EXAMPLES", "10000"))
NAME = "hostile.safetensors"
CLI_SAMPLE = 25  # one refused case in this many also goes through `m4oe inspect` (every readable case does)
# derandomize: the same cases on every run (reproducible counts); deadline: a slow case is a bug, not noise.
FUZZ = dict(deadline=timedelta(seconds=2), derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
COUNTS: Counter = Counter()


def small_model(modality: str) -> SegmentationModel:
    """Rank 2 and a narrow decoder: an 80 KB file, so each case costs well under a millisecond to read."""
    model = SegmentationModel(tiny_backbone(), ExpertConfig(rank=2), DecoderConfig(channels=8, stem_channels=4))
    model.add_modality(modality, 2, ["background", "lesion"], preset={"kind": "ct_window", "center": 40, "width": 400},
                       seed=1)
    with torch.no_grad():
        for layer in model.expert_layers.values():
            layer.lora_B[modality].normal_(0, 0.05)
    model.modalities[modality].provenance = {"sites": ["A", "B"], "num_labelled_images": 5}
    model.modalities[modality].metrics = {"val_dice": 0.81}
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_a_watchdog():
    """One torch thread (tiny tensors; the cores are shared) and a hard stop, with tracebacks, if anything hangs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(900, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> bytes:
    """The valid base file, made once per module."""
    path = save_adapter(small_model("CT"), "CT", tmp_path_factory.mktemp("fuzz") / "ct.safetensors")
    return path.read_bytes()


@pytest.fixture(scope="module")
def target() -> SegmentationModel:
    """The model every mutant is loaded onto (same backbone and configs; already holds another modality)."""
    return small_model("MRI")


@pytest.fixture(scope="module")
def cli_file(tmp_path_factory):
    return tmp_path_factory.mktemp("cli") / NAME


def split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join(header: dict | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def model_state(model: SegmentationModel) -> tuple:
    """What a refused load must leave unchanged (cheap enough to take for every case)."""
    first = next(iter(model.expert_layers.values()))
    return (tuple(model.modalities), model.active_modality, tuple(model.decoders), tuple(first.lora_A),
            float(first.lora_B["MRI"].detach().sum()))


def run_inspect(path) -> tuple[int, str, str]:
    """``m4oe inspect FILE`` in-process, writing to strict UTF-8 streams like a real terminal."""
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8") for _ in range(2))
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["inspect", str(path)])
    out.flush(), err.flush()
    return code, out.buffer.getvalue().decode(), err.buffer.getvalue().decode()


def attempt(target, data: bytes, kind: str, cli_file=None) -> str:
    """Load ``data`` onto ``target``; return "loaded", "refused" (bad file) or "mismatch" (another backbone).

    Any other exception fails the test; so does a refusal that does not name the file or changes the model. With
    ``cli_file``, the case also goes through ``m4oe inspect``, which must agree: it prints a readable file (exit 0)
    and refuses a bad one with one line naming the file (exit 2).
    """
    COUNTS[kind] += 1
    before = model_state(target)
    try:
        info = load_adapter(target, data, name=NAME)
    except (AdapterFormatError, BackboneMismatchError) as error:
        assert NAME in str(error), error
        assert model_state(target) == before, f"{kind}: a refused file changed the model"
        outcome = "refused" if isinstance(error, AdapterFormatError) else "mismatch"
    except ConfigError as error:  # the file is fine but names a modality the model already has
        assert "already loaded" in str(error) and NAME in str(error), error
        assert model_state(target) == before
        outcome = "mismatch"
    else:
        assert info.name in target.modalities
        target.remove_modality(info.name)
        outcome = "loaded"
    COUNTS[f"outcome:{outcome}"] += 1
    if cli_file is not None and (outcome != "refused" or COUNTS[kind] % CLI_SAMPLE == 0):
        cli_file.write_bytes(data)
        code, out, err = run_inspect(cli_file)
        COUNTS["cli:inspect"] += 1
        if outcome == "refused":
            assert code == 2 and NAME in err and err.count("\n") == 1, err
        else:
            assert code == 0 and "parameters" in out and not err, err
    return outcome


# ------------------------------------------------------------------------------------------------ byte level
@settings(max_examples=max(1, EXAMPLES * 2 // 5), **FUZZ)
@given(data=st.data())
def test_byte_level_mutations_end_in_typed_errors(valid, target, cli_file, data):
    blob = bytearray(valid)
    (header_length,) = struct.unpack("<Q", valid[:8])
    body_start = 8 + header_length
    operation = data.draw(st.sampled_from(
        ["truncate", "flip_header", "flip_any", "splice", "length", "append", "float", "float_bits"]))
    expect = None
    if operation == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
        expect = "refused"
    elif operation in ("flip_header", "flip_any"):
        end = body_start if operation == "flip_header" else len(blob)
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, end - 1))] = data.draw(st.integers(0, 255))
    elif operation == "splice":
        start = data.draw(st.integers(0, len(blob)))
        blob[start:start] = data.draw(st.binary(min_size=1, max_size=64))
        expect = "refused"  # the data no longer tiles the file exactly
    elif operation == "length":
        claimed = data.draw(st.sampled_from([0, 1, 7, 2**31, 2**32 + header_length, 2**63, 2**64 - 1, len(blob)]))
        blob[:8] = struct.pack("<Q", claimed)
        expect = "refused"
    elif operation == "append":
        blob += data.draw(st.binary(min_size=1, max_size=64))
        expect = "refused"
    else:  # one float32 inside the tensor data: any finite value loads, NaN/Inf is refused
        position = body_start + 4 * data.draw(st.integers(0, (len(blob) - body_start) // 4 - 1))
        if operation == "float":
            value = data.draw(st.floats(width=32))
            blob[position : position + 4] = struct.pack("<f", value)
        else:
            blob[position : position + 4] = data.draw(st.binary(min_size=4, max_size=4))
            (value,) = struct.unpack("<f", blob[position : position + 4])
        expect = "loaded" if math.isfinite(value) else "refused"
    outcome = attempt(target, bytes(blob), f"bytes:{operation}", cli_file)
    assert expect is None or outcome == expect, (operation, outcome)


# ------------------------------------------------------------------------------------- tensor table, metadata
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)
# Written as raw JSON text, since some are not what json.dumps would produce (NaN, 400-digit integers...).
HOSTILE_JSON = st.sampled_from([
    '"2"', "-1", "0", "1e999", "-1e999", "NaN", "Infinity", "10" + "0" * 12, "1" + "0" * 400, "9" * 5000, "true",
    "false", "null", "2.0", "[]", "{}", '"\\ud800"', '"\\u001b[31mred"', '"\\u0000"', '"' + "x" * 5000 + '"',
    '["a", "b"]', '["a", 1]', "[" * 2000 + "]" * 2000, '{"a": ' * 40 + "1" + "}" * 40, '{"a": 1, "a": 2}',
    '"(((((((((((((((((((((a)))))))))))))))))))))"', '"["', '"' + "(" * 400 + ")" * 400 + '"', "[2, 2]",
    "[224, 224, 224]", "[16, 10000000000]", '"fp64"', '"ct_window"',
])
META_FIELDS = ["format", "format_version", "modality", "num_classes", "label_names", "preset", "in_chans",
               "input_size", "expert", "decoder", "backbone", "provenance", "metrics", "dtype"]
SECTIONS = ["expert", "decoder", "backbone", "preset", "provenance", "metrics"]


def with_raw_value(document: dict, path: tuple[str, ...], raw: str) -> str:
    """``document`` as JSON text with the value at ``path`` replaced by the raw JSON text ``raw``."""
    marker = "\u2603MARK\u2603"
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = marker
    return json.dumps(document).replace(json.dumps(marker), raw)


@settings(max_examples=max(1, EXAMPLES * 3 // 5), **FUZZ)
@given(data=st.data())
def test_tensor_table_and_metadata_mutations_end_in_typed_errors(valid, target, cli_file, data):
    header, body = split(valid)
    tensors = sorted(k for k in header if k != "__metadata__")
    tensor = data.draw(st.sampled_from(tensors))
    meta = json.loads(header["__metadata__"]["m4oe"])
    document = None  # the m4oe JSON text, when written by hand
    raw_header = None  # the whole header JSON text, when written by hand
    expect = "refused"
    operation = data.draw(st.sampled_from([
        "meta_field", "meta_field_raw", "meta_drop", "meta_nested", "meta_nested_raw", "meta_nested_drop",
        "meta_json", "meta_duplicate_key", "dtype", "dtype_all", "shape", "offsets", "overlap", "swap", "drop",
        "rename", "extra_tensor", "entry_type", "duplicate_tensor", "header_type", "no_metadata", "padding",
    ]))
    if operation == "meta_field":
        meta[data.draw(st.sampled_from(META_FIELDS))] = data.draw(JSON_VALUES)
        expect = None
    elif operation == "meta_field_raw":
        document = with_raw_value(meta, (data.draw(st.sampled_from(META_FIELDS)),), data.draw(HOSTILE_JSON))
        expect = None
    elif operation == "meta_drop":
        field = data.draw(st.sampled_from(META_FIELDS))
        del meta[field]
        expect = None if field in ("provenance", "metrics") else "refused"
    elif operation in ("meta_nested", "meta_nested_raw", "meta_nested_drop"):
        section = data.draw(st.sampled_from(SECTIONS))
        key = data.draw(st.sampled_from(sorted(meta[section]) + ["unexpected"]))
        if operation == "meta_nested":
            meta[section][key] = data.draw(JSON_VALUES)
        elif operation == "meta_nested_raw":
            document = with_raw_value(meta, (section, key), data.draw(HOSTILE_JSON))
        else:
            meta[section].pop(key, None)
        expect = None
    elif operation == "meta_json":
        document = data.draw(st.text(max_size=50) | st.sampled_from(["", "[]", "null", '"m4oe"', "{" * 5000]))
    elif operation == "meta_duplicate_key":
        field = data.draw(st.sampled_from(META_FIELDS))
        document = json.dumps(meta)[:-1] + f", {json.dumps(field)}: {json.dumps(meta[field])}}}"
    elif operation == "dtype":
        header[tensor]["dtype"] = data.draw(st.sampled_from(["F64", "I64", "U8", "BOOL", "F16", "BF16", "f32", "x"])
                                            | JSON_VALUES)
    elif operation == "dtype_all":  # every tensor F16, same byte counts: a consistent file, but not the metadata's
        for name in tensors:
            header[name]["dtype"] = "F16"
            header[name]["shape"] = header[name]["shape"][:-1] + [header[name]["shape"][-1] * 2]
    elif operation == "shape":
        header[tensor]["shape"] = data.draw(st.lists(st.integers(-5, 2**40) | JSON_VALUES, max_size=5))
        expect = None
    elif operation == "offsets":
        header[tensor]["data_offsets"] = data.draw(st.lists(st.integers(-5, 2**40) | JSON_VALUES, max_size=3))
        expect = None
    elif operation in ("overlap", "swap"):
        other = data.draw(st.sampled_from(tensors))
        first, second = header[tensor]["data_offsets"], header[other]["data_offsets"]
        header[tensor]["data_offsets"] = second
        if operation == "swap":
            header[other]["data_offsets"] = first
        same_size = first[1] - first[0] == second[1] - second[0]
        # Swapping two same-sized tensors' data is a valid (if different) file; both may also carry other shapes.
        expect = "refused" if operation == "overlap" and other != tensor else None
        expect = "refused" if not same_size else expect
    elif operation == "drop":
        del header[tensor]
    elif operation == "rename":
        header[data.draw(st.sampled_from(["experts.unknown.lora_A", "backbone.patch_embed.proj.weight", "x",
                                          "decoder.extra", tensor + ".copy"]))] = header.pop(tensor)
        expect = None  # refused by the library or as a mismatch, both fine
    elif operation == "extra_tensor":
        header["decoder.extra"] = {"dtype": "F32", "shape": [2], "data_offsets": [len(body), len(body) + 8]}
        body += struct.pack("<2f", 1.0, 2.0)
        expect = "mismatch"
    elif operation == "entry_type":
        header[tensor] = data.draw(JSON_VALUES)
    elif operation == "duplicate_tensor":
        raw_header = json.dumps(header)[:-1] + f", {json.dumps(tensor)}: {json.dumps(header[tensor])}}}"
    elif operation == "header_type":
        raw_header = data.draw(st.sampled_from(["[]", "null", "1", '"x"', "{", "{}", "[" * 100_000]))
    elif operation == "no_metadata":
        header["__metadata__"] = data.draw(JSON_VALUES)
    else:  # spaces after the JSON, as safetensors itself pads: harmless
        raw_header = json.dumps(header | {"__metadata__": header["__metadata__"] | {"m4oe": json.dumps(meta)}})
        raw_header += " " * data.draw(st.integers(1, 64))
        expect = "loaded"
    if raw_header is None:
        if isinstance(header.get("__metadata__"), dict):
            header["__metadata__"]["m4oe"] = document if document is not None else json.dumps(meta)
        raw_header = json.dumps(header)
    outcome = attempt(target, join(raw_header.encode("utf-8", "surrogatepass"), body), f"table:{operation}", cli_file)
    assert expect is None or outcome == expect, (operation, outcome)


# ------------------------------------------------------------------------------------------- named cases
def test_absurd_sizes_are_refused_before_anything_is_allocated(valid, target, monkeypatch):
    import tracemalloc

    import safetensors.torch

    def never(*args, **kwargs):
        raise AssertionError("safetensors was reached")

    monkeypatch.setattr(safetensors.torch, "load", never)
    header, body = split(valid)
    first = sorted(k for k in header if k != "__metadata__")[0]
    huge_shape = json.loads(json.dumps(header))
    huge_shape[first]["shape"] = [2**20, 2**20]  # 2**40 elements = 4 TiB of float32
    huge_bytes = json.loads(json.dumps(header))
    huge_bytes[first]["data_offsets"] = [0, 2**42]
    cases = {
        "header claiming 2**63 bytes": struct.pack("<Q", 2**63) + valid[8:],
        "header claiming 2**64-1 bytes": struct.pack("<Q", 2**64 - 1) + b"{}",
        "shape claiming 2**40 elements": join(huge_shape, body),
        "offsets claiming 4 TiB": join(huge_bytes, body),
    }
    tracemalloc.start()
    for kind, data in cases.items():
        tracemalloc.reset_peak()
        assert attempt(target, data, f"named:{kind}") == "refused"
        assert tracemalloc.get_traced_memory()[1] < 20 * len(valid), kind  # nothing near the claimed size
    tracemalloc.stop()


def test_deeply_nested_metadata_is_refused_without_recursion_errors(valid, target):
    header, body = split(valid)
    for depth in (33, 1000, 100_000):
        header["__metadata__"]["m4oe"] = "[" * depth + "]" * depth
        assert attempt(target, join(header, body), "named:nested") == "refused"
        header["__metadata__"]["m4oe"] = '{"a":' * depth + "1" + "}" * depth
        assert attempt(target, join(header, body), "named:nested") == "refused"


def test_harmless_value_changes_still_load_but_nan_and_inf_are_refused(valid, target):
    header, body = split(valid)
    for value, expected in [(0.125, "loaded"), (-3e38, "loaded"), (float("nan"), "refused"),
                            (float("inf"), "refused"), (float("-inf"), "refused")]:
        mutated = bytearray(body)
        mutated[-4:] = struct.pack("<f", value)
        assert attempt(target, join(header, bytes(mutated)), "named:value") == expected


def test_terminal_escapes_and_invalid_unicode_in_metadata_are_refused(valid, target):
    header, body = split(valid)
    meta = json.loads(header["__metadata__"]["m4oe"])
    for field, raw in [("label_names", '["\\u001b[2J", "b"]'), ("label_names", '["\\ud800", "b"]'),
                       (("backbone", "name"), '"swin\\u0007"'), (("provenance", "sites"), '["\\udfff"]')]:
        path = (field,) if isinstance(field, str) else field
        header["__metadata__"]["m4oe"] = with_raw_value(json.loads(json.dumps(meta)), path, raw)
        with pytest.raises(AdapterFormatError, match=NAME):
            read_adapter(join(header, body), NAME)


def test_a_failed_replacement_keeps_the_loaded_modality(valid, target, tmp_path, monkeypatch):
    original = save_adapter(target, "MRI", tmp_path / "mri.safetensors")
    header, body = split(valid)
    meta = json.loads(header["__metadata__"]["m4oe"])
    meta["modality"] = "MRI"
    header["__metadata__"]["m4oe"] = json.dumps(meta)
    replacement = join(header, body)
    before = {k: t.clone() for k, t in target.modality_tensors("MRI").items()}
    info_before = target.modalities["MRI"]
    target.set_modality("MRI")
    copy_tensors = target.set_modality_tensors
    calls = []

    def fail_once(name, tensors):  # a failure after the old modality was taken out (e.g. out of memory)
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError("simulated failure while copying")
        copy_tensors(name, tensors)

    monkeypatch.setattr(target, "set_modality_tensors", fail_once)
    for bad in (replacement[:-4], replacement):
        with pytest.raises((AdapterFormatError, RuntimeError)):
            load_adapter(target, bad, name=NAME, replace=True)
        assert target.modalities["MRI"] is info_before and target.active_modality == "MRI"
        assert all(torch.equal(t, before[k]) for k, t in target.modality_tensors("MRI").items())
    assert len(calls) == 2  # the failed copy, then the restore
    monkeypatch.undo()
    load_adapter(target, replacement, name=NAME, replace=True)  # a good replacement keeps the modality active
    assert target.active_modality == "MRI" and target.modalities["MRI"] is not info_before
    load_adapter(target, original, replace=True)  # the fixture is shared
    assert all(torch.equal(t, before[k]) for k, t in target.modality_tensors("MRI").items())


def test_inspect_cli_gives_a_typed_one_line_error_for_truncations(valid, tmp_path):
    for index, cut in enumerate(range(0, len(valid), max(1, len(valid) // 200))):
        path = tmp_path / f"m{index}.safetensors"
        path.write_bytes(valid[:cut])
        code, _, err = run_inspect(path)
        assert code == 2 and path.name in err and err.count("\n") == 1
        COUNTS["cli:truncate"] += 1


def test_read_adapter_accepts_bytes_and_paths_alike(valid, tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(valid)
    from_bytes, from_path = read_adapter(valid), read_adapter(path)
    assert from_bytes[0] == from_path[0] and from_bytes[0] == read_header(path)[0]
    assert all(torch.equal(from_bytes[1][k], from_path[1][k]) for k in from_path[1])
    assert inspect_adapter(path)["tensors"] == len(from_path[1])


def test_zz_report_fuzz_counts(valid, target, cli_file, capsys):
    if not any(kind.startswith(("bytes:", "table:")) for kind in COUNTS):
        # Run alone (-k): generate the cases here, so the count is checked rather than skipped.
        test_byte_level_mutations_end_in_typed_errors(valid=valid, target=target, cli_file=cli_file)
        test_tensor_table_and_metadata_mutations_end_in_typed_errors(valid=valid, target=target, cli_file=cli_file)
    generated = sum(n for kind, n in COUNTS.items() if kind.startswith(("bytes:", "table:")))
    total = sum(n for kind, n in COUNTS.items() if not kind.startswith("outcome:"))
    with capsys.disabled():
        print(f"\nhostile adapter cases: {total} ({generated} generated, "
              f"{COUNTS['cli:inspect'] + COUNTS['cli:truncate']} through `m4oe inspect`)")
        print(json.dumps(dict(sorted(COUNTS.items())), indent=None))
    assert generated >= EXAMPLES - 1
