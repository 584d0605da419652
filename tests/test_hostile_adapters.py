"""Hostile adapter files: thousands of mutated, truncated, oversized and ill-typed variants of a valid file each end
in the library's typed error (or load, when the mutation is harmless) — never another exception, never a hang.

The number of generated cases is ``M4OE_FUZZ_EXAMPLES`` per property (default 5 000, so 10 000 in all); they run in memory through
the same code path as files (``read_adapter``/``load_adapter`` accept the file's bytes).
"""
from __future__ import annotations

import json
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m4oe_adapters import AdapterError, ConfigError, inspect_adapter, load_adapter, save_adapter
from m4oe_adapters.adapter_file import read_adapter

from conftest import tiny_model

EXAMPLES = int(os.environ.get("M4OE_FUZZ_EXAMPLES", "5000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
COUNTS: dict[str, int] = {}


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    model = tiny_model(rank=2, modalities=("CT",))
    path = save_adapter(model, "CT", tmp_path_factory.mktemp("fuzz") / "ct.safetensors")
    return path.read_bytes()


@pytest.fixture(scope="module")
def target():
    return tiny_model(rank=2, modalities=("MRI",))


def split(data: bytes):
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def attempt(target, data: bytes, kind: str) -> str:
    """Load ``data``; return "loaded" or "refused". Any other exception fails the test."""
    COUNTS[kind] = COUNTS.get(kind, 0) + 1
    try:
        info = load_adapter(target, data, name="fuzz.safetensors", force=True)
    except (AdapterError, ConfigError) as error:
        assert "fuzz.safetensors" in str(error) or isinstance(error, ConfigError)
        assert "CT" not in target.modalities  # a refused file leaves the model as it was
        return "refused"
    target.remove_modality(info.name)
    return "loaded"


@FUZZ
@given(data=st.data())
def test_byte_level_mutations_end_in_typed_errors(valid, target, data):
    blob = bytearray(valid)
    operation = data.draw(st.sampled_from(["truncate", "flip", "splice", "length", "append"]))
    if operation == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif operation == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            position = data.draw(st.integers(0, len(blob) - 1))
            blob[position] = data.draw(st.integers(0, 255))
    elif operation == "splice":
        start = data.draw(st.integers(0, len(blob)))
        blob[start:start] = data.draw(st.binary(min_size=1, max_size=64))
    elif operation == "length":
        blob[:8] = struct.pack("<Q", data.draw(st.sampled_from([0, 1, 2**63, 2**64 - 1, len(blob), 10**9])))
    else:
        blob += data.draw(st.binary(min_size=1, max_size=64))
    attempt(target, bytes(blob), f"bytes:{operation}")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)
META_FIELDS = ["format_version", "modality", "num_classes", "label_names", "preset", "in_chans", "input_size",
               "expert", "decoder", "backbone", "provenance", "metrics", "dtype", "format"]


@FUZZ
@given(data=st.data())
def test_metadata_and_table_mutations_end_in_typed_errors(valid, target, data):
    header, body = split(valid)
    operation = data.draw(st.sampled_from(["meta_field", "meta_nested", "dtype", "shape", "offsets", "drop",
                                           "meta_json", "rename"]))
    tensor = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    meta = json.loads(header["__metadata__"]["m4oe"])
    if operation == "meta_field":
        meta[data.draw(st.sampled_from(META_FIELDS))] = data.draw(JSON_VALUES)
    elif operation == "meta_nested":
        section = data.draw(st.sampled_from(["expert", "decoder", "backbone", "preset"]))
        key = data.draw(st.sampled_from(sorted(meta[section]) or ["x"]))
        meta[section][key] = data.draw(JSON_VALUES)
    elif operation == "dtype":
        header[tensor]["dtype"] = data.draw(st.sampled_from(["F64", "I64", "U8", "BOOL", "F16", "BF16", "x"]))
    elif operation == "shape":
        header[tensor]["shape"] = data.draw(st.lists(st.integers(-5, 2**40), max_size=5))
    elif operation == "offsets":
        header[tensor]["data_offsets"] = data.draw(st.lists(st.integers(-5, 2**40), min_size=0, max_size=3))
    elif operation == "drop":
        del header[tensor]
    elif operation == "meta_json":
        header["__metadata__"]["m4oe"] = data.draw(st.text(max_size=50))
        meta = None
    else:
        header["experts.unknown.lora_A"] = header.pop(tensor)
    if meta is not None:
        header["__metadata__"]["m4oe"] = json.dumps(meta)
    attempt(target, join(header, body), f"table:{operation}")


def test_deeply_nested_or_huge_headers_are_refused_without_blowing_up(valid, target):
    header, body = split(valid)
    header["__metadata__"]["m4oe"] = "[" * 100_000 + "]" * 100_000
    assert attempt(target, join(header, body), "nested") == "refused"
    header, body = split(valid)
    key = sorted(k for k in header if k != "__metadata__")[0]
    header[key]["shape"] = [2**31 - 1, 2**31 - 1]  # claims 16 EB: refused before any allocation
    assert attempt(target, join(header, body), "huge-shape") == "refused"
    assert attempt(target, struct.pack("<Q", 2**62) + b"{}", "huge-length") == "refused"


def test_harmless_value_changes_still_load_but_nan_is_refused(valid, target):
    header, body = split(valid)
    mutated = bytearray(body)
    mutated[0:4] = struct.pack("<f", 0.125)
    assert attempt(target, join(header, bytes(mutated)), "harmless") == "loaded"
    mutated[0:4] = struct.pack("<f", float("nan"))
    assert attempt(target, join(header, bytes(mutated)), "nan") == "refused"


def test_inspect_cli_gives_a_typed_one_line_error_for_mutants(valid, tmp_path, capsys):
    from m4oe_adapters.cli import main

    for index, cut in enumerate(range(0, len(valid), max(1, len(valid) // 200))):
        path = tmp_path / f"m{index}.safetensors"
        path.write_bytes(valid[:cut])
        assert main(["inspect", str(path)]) == 2
        assert path.name in capsys.readouterr().err
    COUNTS["cli:truncate"] = index + 1


def test_report_fuzz_counts(capsys):
    total = sum(COUNTS.values())
    with capsys.disabled():
        print(f"\nhostile adapter cases: {total} ({json.dumps(COUNTS, sort_keys=True)})")
    assert total >= 2 * EXAMPLES


def test_read_adapter_accepts_bytes_and_paths_alike(valid, tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(valid)
    from_bytes, from_path = read_adapter(valid), read_adapter(path)
    assert from_bytes[0] == from_path[0] and set(from_bytes[1]) == set(from_path[1])
    assert inspect_adapter(path)["tensors"] == len(from_path[1])
