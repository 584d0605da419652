"""One safetensors file per modality: round trip, metadata, sizes, and typed refusals of bad files."""
from __future__ import annotations

import json
import math
import pickle
import struct

import pytest
import torch

from m4oe_adapters import (
    AdapterFormatError,
    BackboneMismatchError,
    ConfigError,
    ExpertConfig,
    SegmentationModel,
    inspect_adapter,
    load_adapter,
    model_from_adapter,
    save_adapter,
)

from m4oe_adapters.adapter_file import DTYPES, read_adapter, read_header
from m4oe_adapters.decoder import ModalityDecoder, PackedDecoder

from conftest import tiny_backbone, tiny_model


def test_saved_modality_reloads_onto_a_fresh_model_with_identical_outputs(model, tmp_path):
    path = save_adapter(model, "MRI", tmp_path / "mri.safetensors")
    fresh = SegmentationModel(tiny_backbone(), ExpertConfig(rank=4))
    info = load_adapter(fresh, path)
    fresh.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x, "MRI"), model(x, "MRI"))
    assert info.num_classes == 3 and info.label_names[0] == "background"


def test_several_adapters_load_onto_one_backbone_and_mix_in_a_batch(model, tmp_path):
    fresh = SegmentationModel(tiny_backbone(), ExpertConfig(rank=4)).eval()
    for name in ("CT", "MRI"):
        load_adapter(fresh, save_adapter(model, name, tmp_path / f"{name}.safetensors"))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, ["MRI", "CT"]), model(x, ["MRI", "CT"]))


def test_file_metadata_holds_everything_a_deployment_needs(model, tmp_path):
    model.modalities["CT"].preset = {"kind": "ct_window", "center": 40, "width": 400}
    model.modalities["CT"].provenance = {"sites": ["A"], "num_labelled_images": 5}
    model.modalities["CT"].metrics = {"val_dice": 0.8}
    report = inspect_adapter(save_adapter(model, "CT", tmp_path / "ct.safetensors"))
    meta = report["metadata"]
    assert meta["format"] == "m4oe-adapter" and meta["format_version"] == 1
    assert meta["modality"] == "CT" and meta["num_classes"] == 2 and len(meta["label_names"]) == 2
    assert meta["preset"]["width"] == 400 and meta["in_chans"] == 1 and meta["input_size"] == [224, 224]
    assert meta["expert"]["rank"] == 4 and meta["expert"]["target_pattern"]
    assert meta["backbone"]["fingerprint"] == model.backbone.fingerprint() and meta["backbone"]["pretrained"] is False
    assert meta["provenance"]["sites"] == ["A"] and meta["metrics"]["val_dice"] == 0.8
    assert report["parameters"] == model.parameter_count("CT") and report["expert_layers"] == 20


def test_half_precision_files_are_half_the_size_and_load(model, tmp_path):
    full = save_adapter(model, "CT", tmp_path / "fp32.safetensors")
    half = save_adapter(model, "CT", tmp_path / "fp16.safetensors", dtype="fp16")
    assert half.stat().st_size < 0.6 * full.stat().st_size
    fresh = SegmentationModel(tiny_backbone(), ExpertConfig(rank=4)).eval()
    load_adapter(fresh, half)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, "CT"), model(x, "CT"), atol=1e-2, rtol=1e-2)


def test_fp16_adapters_kept_in_fp16_take_half_the_memory_and_give_identical_outputs(model, tmp_path):
    """load_adapter(keep_dtype=True): experts and decoder stay fp16 in memory and are cast to fp32 at use, so every
    routing mode gives exactly what the same fp16 file widened to fp32 at load gives; training it is refused."""
    files = []
    for name in ("CT", "MRI"):
        files.append(save_adapter(model, name, tmp_path / f"{name}.safetensors", dtype="fp16"))
    wide, narrow = tiny_model(modalities=()), tiny_model(modalities=())
    for path in files:
        load_adapter(wide, path)
        load_adapter(narrow, path, keep_dtype=True)

    def stored_bytes(target):
        return sum(t.numel() * t.element_size() for name in ("CT", "MRI")
                   for key, t in target.modality_tensors(name).items() if "router_key" not in key)

    assert stored_bytes(narrow) * 2 == stored_bytes(wide)
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        for case in (dict(modality="CT"), dict(modality=["CT", "MRI", "CT"]),
                     dict(modality=["CT", "MRI", "MRI"], routing="soft")):
            assert torch.equal(narrow(x, **case), wide(x, **case)), case
        wide.merge("MRI"), narrow.merge("MRI")
        assert torch.equal(narrow(x, "MRI"), wide(x, "MRI"))
        narrow.unmerge()
    # untouched by the forwards, and the decoder held as one buffer with the unpacked decoder's keys and values
    assert {t.dtype for t in narrow.modality_tensors("CT").values() if t.dim() > 1} == {torch.float16}
    assert isinstance(narrow.decoders["CT"], PackedDecoder)
    assert narrow.decoders["CT"].state_dict().keys() == wide.decoders["CT"].state_dict().keys()
    for key, value in narrow.decoders["CT"].state_dict().items():
        assert torch.equal(value.float(), wide.decoders["CT"].state_dict()[key]), key
    with pytest.raises(ConfigError, match="keep_dtype"):
        narrow.train_only("CT")


def test_a_packed_decoder_survives_a_failed_replacement_packed_with_its_values(model, tmp_path, monkeypatch):
    """load_adapter(keep_dtype=True, replace=True) that fails puts back the old modality as it was held: packed, in
    its dtype, with its values."""
    path = save_adapter(model, "CT", tmp_path / "CT.safetensors", dtype="fp16")
    served = tiny_model(modalities=())
    load_adapter(served, path, keep_dtype=True)
    before = {k: t.clone() for k, t in served.modality_tensors("CT").items()}
    monkeypatch.setattr(served, "set_modality_tensors", failing_once(served.set_modality_tensors))
    with pytest.raises(RuntimeError, match="simulated"):
        load_adapter(served, path, replace=True, keep_dtype=True)
    assert isinstance(served.decoders["CT"], PackedDecoder) and served.decoders["CT"].flat.dtype == torch.float16
    after = served.modality_tensors("CT")
    assert after.keys() == before.keys() and all(torch.equal(after[k], t) for k, t in before.items())


def failing_once(function):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("simulated failure while copying")
        return function(*args, **kwargs)
    return wrapper


def test_a_packed_decoder_loads_state_dicts_as_strictly_as_the_module_it_packs():
    shape = ((8, 16, 32, 64), 1, 3, 16, 8)
    reference, packed = ModalityDecoder(*shape), PackedDecoder(*shape)
    state = reference.state_dict()
    packed.load_state_dict(state)
    assert packed.state_dict().keys() == state.keys()
    assert all(torch.equal(packed.state_dict()[key], value) for key, value in state.items())
    with pytest.raises(RuntimeError, match="Unexpected key.*extra"):
        packed.load_state_dict({**state, "extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="Missing key.*head.bias"):
        packed.load_state_dict({key: value for key, value in state.items() if key != "head.bias"})


def test_packed_decoders_run_concurrently_without_swapping_each_others_values():
    """Each thread runs packed decoders through its own weightless template, so two threads decoding with different
    values at once each get exactly their own result."""
    import threading

    shape = ((8, 16, 32, 64), 1, 3, 16, 8)
    features = [torch.randn(2, c, 32 // s, 32 // s) for c, s in zip(shape[0], (4, 8, 16, 32))]
    images = torch.randn(2, 1, 32, 32)
    decoders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        reference = ModalityDecoder(*shape)
        packed = PackedDecoder(*shape)
        packed.load_state_dict(reference.state_dict())
        with torch.no_grad():
            decoders.append((packed, reference(features, images)))
    results, errors = {0: [], 1: []}, []
    barrier = threading.Barrier(2)

    def run(index):
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(30):
                    results[index].append(decoders[index][0](features, images))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
    threads = [threading.Thread(target=run, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for index, (_, expected) in enumerate(decoders):
        assert all(torch.equal(output, expected) for output in results[index])


def test_model_from_adapter_rebuilds_backbone_and_config(model, tmp_path, timm_checkpoint):
    trained = tiny_model(weights=timm_checkpoint)
    path = save_adapter(trained, "CT", tmp_path / "ct.safetensors")
    rebuilt = model_from_adapter(path, timm_checkpoint).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x, "CT"), trained(x, "CT"))


def test_adapter_for_another_backbone_is_refused_naming_both(model, tmp_path):
    path = save_adapter(model, "CT", tmp_path / "ct.safetensors")
    other = SegmentationModel(tiny_backbone(seed=1), ExpertConfig(rank=4))
    with pytest.raises(BackboneMismatchError) as error:
        load_adapter(other, path)
    message = str(error.value)
    assert "ct.safetensors" in message
    assert model.backbone.fingerprint()[:16] in message and other.backbone.fingerprint()[:16] in message
    assert "CT" not in other.modalities
    load_adapter(other, path, force=True)  # same architecture: allowed on request
    assert "CT" in other.modalities


def test_adapter_with_other_rank_or_channels_is_refused(model, tmp_path):
    path = save_adapter(model, "CT", tmp_path / "ct.safetensors")
    with pytest.raises(BackboneMismatchError, match="rank"):
        load_adapter(SegmentationModel(tiny_backbone(), ExpertConfig(rank=8)), path)
    with pytest.raises(BackboneMismatchError):
        load_adapter(SegmentationModel(tiny_backbone(in_chans=3), ExpertConfig(rank=4)), path, force=True)


def test_adapter_with_another_layer_set_is_refused(model, tmp_path):
    path = save_adapter(model, "CT", tmp_path / "ct.safetensors")
    attention_only = SegmentationModel(tiny_backbone(), ExpertConfig(rank=4, target_pattern=r".*attn\.qkv"))
    with pytest.raises(BackboneMismatchError, match="layer set"):
        load_adapter(attention_only, path)


def rewrite_metadata(path, change):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    meta = json.loads(header["__metadata__"]["m4oe"])
    change(meta)
    header["__metadata__"]["m4oe"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


def test_unknown_format_version_is_refused(model, tmp_path):
    path = save_adapter(model, "CT", tmp_path / "ct.safetensors")
    rewrite_metadata(path, lambda meta: meta.update(format_version=99))
    with pytest.raises(AdapterFormatError, match="unknown format version 99"):
        inspect_adapter(path)


def test_label_count_must_match_class_count(model, tmp_path):
    path = save_adapter(model, "CT", tmp_path / "ct.safetensors")
    rewrite_metadata(path, lambda meta: meta.update(label_names=["a", "b", "c"]))
    with pytest.raises(AdapterFormatError, match="3 label names for 2 classes"):
        load_adapter(model, path)


def test_truncated_file_is_refused(model, tmp_path):
    path = save_adapter(model, "CT", tmp_path / "ct.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(AdapterFormatError, match="ct.safetensors"):
        load_adapter(model, path)


def test_pickle_file_is_refused_and_never_unpickled(tmp_path, monkeypatch, model):
    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, ("touch EXPLOITED",))

    monkeypatch.chdir(tmp_path)
    for name, payload in [("a.safetensors", pickle.dumps(Exploit())), ("b.pt", None)]:
        path = tmp_path / name
        if payload is None:
            torch.save({"experts": Exploit()}, path)
        else:
            path.write_bytes(payload)
        with pytest.raises(AdapterFormatError, match=name):
            load_adapter(model, path)
    assert not (tmp_path / "EXPLOITED").exists()


def test_plain_safetensors_without_m4oe_metadata_is_refused(tmp_path, model):
    import safetensors.torch

    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(AdapterFormatError, match="not an m4oe adapter"):
        inspect_adapter(path)


def test_nan_tensor_is_refused_on_read_and_never_written(model, tmp_path):
    import safetensors
    import safetensors.torch

    path = save_adapter(model, "CT", tmp_path / "ct.safetensors")
    with safetensors.safe_open(str(path), "pt") as stream:
        header, tensors = stream.metadata(), {key: stream.get_tensor(key) for key in stream.keys()}
    key = next(k for k in tensors if k.endswith("lora_A"))
    tensors[key][0, 0] = float("nan")
    safetensors.torch.save_file(tensors, str(path), metadata=header)  # a file corrupted by someone else
    with pytest.raises(AdapterFormatError, match="NaN"):
        inspect_adapter(path)
    with torch.no_grad():
        next(iter(model.expert_layers.values())).lora_A["CT"][0, 0] = float("nan")
    with pytest.raises(AdapterFormatError, match="refusing to write.*NaN"):
        save_adapter(model, "CT", tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()


def torch_report(path) -> dict:
    """What ``inspect_adapter`` reported when it read the file with torch (``read_adapter``): the reference."""
    metadata, tensors = read_adapter(path)

    def total(prefix: str, size=torch.Tensor.numel) -> int:
        return sum(size(t) for k, t in tensors.items() if k.startswith(prefix))

    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "tensors": len(tensors),
        "parameters": total(""),
        "expert_parameters": total("experts."),
        "decoder_parameters": total("decoder."),
        "expert_layers": len({k.rsplit(".", 1)[0] for k in tensors if k.startswith("experts.")}),
        "routing_signature_bytes": total("signature.", lambda t: t.numel() * t.element_size()),
        "metadata": metadata,
    }


def refusals(path) -> tuple[str | None, str | None]:
    """The messages of ``read_adapter`` and ``inspect_adapter`` for ``path`` (``None``: read)."""
    messages = []
    for read in (read_adapter, inspect_adapter):
        try:
            read(path)
            messages.append(None)
        except AdapterFormatError as error:
            messages.append(str(error))
    return tuple(messages)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_inspect_reads_without_torch_exactly_what_read_adapter_reads(model, tmp_path, dtype):
    path = save_adapter(model, "CT", tmp_path / f"{dtype}.safetensors", dtype=dtype)
    assert inspect_adapter(path) == torch_report(path)
    valid = path.read_bytes()
    metadata, header = read_header(path)
    body = len(valid) - max(entry["data_offsets"][1] for entry in header.values())
    key = sorted(k for k in header if k.endswith("lora_A"))[3]  # a tensor in the middle of the data
    size = torch.finfo(DTYPES[dtype]).bits // 8
    position = body + header[key]["data_offsets"][0] + 5 * size
    largest = torch.finfo(DTYPES[dtype]).max
    for value in (float("nan"), float("inf"), -float("inf"), largest, -largest):
        data = bytearray(valid)
        data[position : position + size] = bytes(torch.tensor([value], dtype=DTYPES[dtype]).view(torch.uint8))
        path.write_bytes(bytes(data))
        by_torch, by_numpy = refusals(path)
        assert by_numpy == by_torch, value
        if math.isfinite(value):
            assert by_numpy is None and inspect_adapter(path) == torch_report(path)
        else:
            assert by_numpy == f"{path}: tensor {key!r} holds NaN or Inf values: the adapter is corrupt"
    # A header this reader accepts but safetensors' own parser refuses (a non-string metadata value) is refused by
    # both paths alike: inspect runs the same parser.
    (length,) = struct.unpack("<Q", valid[:8])
    table = json.loads(valid[8 : 8 + length])
    table["__metadata__"]["extra"] = 5
    raw = json.dumps(table).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + valid[8 + length :])
    read_header(path)
    by_torch, by_numpy = refusals(path)
    assert by_numpy == by_torch and "corrupt tensor data" in by_numpy


def test_inspect_reports_the_shipped_adapters_as_the_torch_reader_did():
    from m4oe_adapters.zoo import default_zoo

    files = sorted(default_zoo().glob("*.safetensors"))
    if not files:
        pytest.skip("no adapters_zoo/ in this checkout")
    for path in files:  # fp16 files with routing signatures
        assert inspect_adapter(path) == torch_report(path)


def test_failed_write_keeps_the_previous_file_and_leaves_no_partial_file(model, tmp_path, monkeypatch):
    import pathlib

    path = save_adapter(model, "CT", tmp_path / "ct.safetensors")
    before = path.read_bytes()

    def broken_write(self, data):
        with open(self, "wb") as stream:
            stream.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_bytes", broken_write)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, "CT", path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.safetensors"]


def test_swin_t_rank_8_file_is_at_most_5_mb_and_a_twentieth_of_the_full_model(tmp_path):
    import safetensors.torch

    from m4oe_adapters import load_backbone

    model = SegmentationModel(load_backbone("timm:swin_tiny_patch4_window7_224", None, in_chans=3), ExpertConfig(rank=8))
    model.add_modality("fundus", 2)
    size = save_adapter(model, "fundus", tmp_path / "fundus.safetensors").stat().st_size
    # A fully fine-tuned model ships the whole backbone plus the same decoder and head.
    full_state = {f"backbone.{k}": v for k, v in model.backbone.model.state_dict().items() if "lora_" not in k}
    full_state |= {f"decoder.{k}": v for k, v in model.decoders["fundus"].state_dict().items()}
    full_state = {k: v for k, v in full_state.items() if "router_key" not in k}
    full = tmp_path / "full.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in full_state.items()}, str(full))
    print(f"adapter {size / 1e6:.2f} MB, full model {full.stat().st_size / 1e6:.1f} MB")
    assert size <= 5 * 1024 * 1024
    assert size * 20 <= full.stat().st_size


def test_force_never_accepts_another_architecture(model, tmp_path):
    from m4oe_adapters import load_backbone

    from conftest import TIMM_NAME, TINY_TIMM

    path = save_adapter(model, "CT", tmp_path / "ct.safetensors")
    wider = load_backbone(f"timm:{TIMM_NAME}", None, in_chans=1, img_size=64, model_args=TINY_TIMM | {"embed_dim": 24})
    other = SegmentationModel(wider, ExpertConfig(rank=4))
    with pytest.raises(BackboneMismatchError) as error:
        load_adapter(other, path, force=True)  # force waives the fingerprint, never the shapes
    assert "ct.safetensors" in str(error.value) and "shape" in str(error.value)
    assert "CT" not in other.modalities and not other.decoders


def test_channel_and_layer_set_refusals_name_both_sides(model, tmp_path):
    path = save_adapter(model, "CT", tmp_path / "ct.safetensors")
    with pytest.raises(BackboneMismatchError, match=r"ct\.safetensors.*1-channel.*takes 3"):
        load_adapter(SegmentationModel(tiny_backbone(in_chans=3), ExpertConfig(rank=4)), path, force=True)
    attention_only = SegmentationModel(tiny_backbone(), ExpertConfig(rank=4, target_pattern=r".*attn\.qkv"))
    with pytest.raises(BackboneMismatchError, match=r"20 vs 5 layers; only in the file: \[.*mlp.*\], only in the mod"):
        load_adapter(attention_only, path)
    assert not attention_only.modalities


def _with_header_length(data: bytes, wanted_low_bytes: bytes) -> bytes:
    """The same adapter with its header padded by spaces (valid JSON whitespace, as safetensors pads) to a length
    whose little-endian bytes, i.e. the file's first bytes, start with ``wanted_low_bytes``."""
    length = struct.unpack("<Q", data[:8])[0]
    header, body = data[8 : 8 + length].rstrip(b" "), data[8 + length :]
    modulus, target = 256 ** len(wanted_low_bytes), int.from_bytes(wanted_low_bytes, "little")
    padded = len(header) + (target - len(header)) % modulus
    return struct.pack("<Q", padded) + header + b" " * (padded - len(header)) + body


def test_every_header_length_low_byte_round_trips_including_pickle_and_zip_lookalikes(model, tmp_path):
    """The first byte of a safetensors file is its header length's low byte: 0x80 (pickle PROTO) and "PK" (zip)
    are valid lengths, and such adapters must load (issue 17: 1 adapter in 256 was refused as a pickle)."""
    x = torch.randn(1, 1, 64, 64)
    expected = model(x, "CT")
    saved = save_adapter(model, "CT", tmp_path / "saved.safetensors").read_bytes()
    path = tmp_path / "ct.safetensors"
    fresh = tiny_model(modalities=()).eval()
    for low in [bytes([value]) for value in range(256)] + [b"PK"]:
        path.write_bytes(_with_header_length(saved, low))
        assert path.read_bytes()[: len(low)] == low
        assert read_header(path)[0]["modality"] == "CT"  # the header check that refused 1 file in 256
        if low in (b"\x80", b"PK", b"\x00", b"\xff"):  # and the whole path inspect, predict and eval take
            assert inspect_adapter(path)["metadata"]["modality"] == "CT"
            load_adapter(fresh, path, replace=True)
            assert torch.allclose(fresh(x, "CT"), expected, atol=1e-6), f"first bytes {low!r}"


def test_save_writes_files_whose_header_length_starts_with_0x80_and_reads_them(model, tmp_path):
    """The writer's side of the same bug: the safetensors writer pads headers to 8 bytes, so a save whose header
    is 0x..80 bytes long happens once in 32 saves; provenance padding makes one on purpose."""
    path = tmp_path / "ct.safetensors"
    info = model.modalities["CT"]
    for padding in range(0, 256, 8):
        info.provenance = {"note": "x" * padding}
        save_adapter(model, "CT", path)
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    fresh = tiny_model(modalities=())
    assert load_adapter(fresh, path).provenance["note"] == info.provenance["note"]


def test_real_pickle_and_zip_files_are_still_named_as_such(tmp_path, model):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(3)}, path)  # a zip file
    with pytest.raises(AdapterFormatError, match="pickle/zip"):
        load_adapter(model, path)
    path.write_bytes(pickle.dumps({"w": 1}, protocol=4))
    with pytest.raises(AdapterFormatError, match="pickle/zip"):
        load_adapter(model, path)


def test_save_refuses_what_load_would_refuse_and_leaves_no_file(model, tmp_path):
    model.modalities["CT"].label_names = ["background", "x" * 129]
    path = tmp_path / "ct.safetensors"
    with pytest.raises(AdapterFormatError, match="refusing to write.*at most 128 characters"):
        save_adapter(model, "CT", path)
    assert not path.exists() and not list(tmp_path.iterdir())
