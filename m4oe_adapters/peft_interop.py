"""PEFT interop: a modality's backbone experts are plain LoRA, so they export to (and import from) a standard PEFT
LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) that
``peft.PeftModel.from_pretrained(<the family's own backbone model>, folder)`` loads.

Only the backbone experts travel this way; the decoder, head, labels and router keys have no PEFT equivalent and stay
in the m4oe adapter file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import AdapterFormatError, BackboneMismatchError, ConfigError
from .model import SegmentationModel

PEFT_PREFIX = "base_model.model."
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
EXPORT_MARK = "m4oe_export"  # safetensors metadata key: this folder's weights were written by export_peft


def _written_by_export(folder: Path) -> bool:
    """Whether ``folder`` holds only the two PEFT files and its weights carry :data:`EXPORT_MARK`."""
    import safetensors

    if {entry.name for entry in folder.iterdir()} != set(PEFT_FILES):
        return False
    try:
        with safetensors.safe_open(str(folder / PEFT_FILES[1]), "pt") as handle:
            return EXPORT_MARK in (handle.metadata() or {})
    except Exception:  # unreadable or not safetensors: not ours
        return False


def export_peft(model: SegmentationModel, modality: str, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``modality``'s backbone experts as a PEFT LoRA folder (``adapter_config.json`` +
    ``adapter_model.safetensors``).

    Module names are those of ``model.backbone.model`` (the plain timm / transformers / MONAI module).

    Nothing of the user's is deleted: a new folder is built aside and renamed into place (atomic); an existing folder
    is replaced only when it holds nothing but an earlier export's two files. Any other existing, non-empty folder is
    refused with a :class:`~m4oe_adapters.errors.ConfigError` unless ``overwrite=True``, which writes the two files
    into it (each atomically) and leaves every other file there untouched.
    """
    import peft
    import safetensors.torch

    from .adapter_file import atomic_write

    model._require(modality)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder}: exists and is not a folder; give a folder path for the PEFT adapter")
    existing = sorted(entry.name for entry in folder.iterdir()) if folder.is_dir() else []
    replace_whole = bool(existing) and _written_by_export(folder)
    if existing and not replace_whole and not overwrite:
        shown = ", ".join(existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise ConfigError(
            f"{folder}: folder exists and holds files m4oe did not write ({shown}); choose a new or empty folder, "
            f"or pass --overwrite (overwrite=True) to write {' and '.join(PEFT_FILES)} into it (other files are kept)"
        )
    config = peft.LoraConfig(
        r=model.expert_config.rank,
        lora_alpha=model.expert_config.alpha,
        lora_dropout=0.0,
        target_modules=list(model.expert_layers),
        bias="none",
    )
    tensors = {}
    for name, layer in model.expert_layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[modality].detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[modality].detach().cpu().contiguous()
    metadata = {"format": "pt", EXPORT_MARK: modality}
    # What config.save_pretrained writes (PEFT's own to_dict), so both paths below write the same bytes.
    text = json.dumps({key: (sorted(value) if isinstance(value, set) else value)
                       for key, value in config.to_dict().items()}, indent=2, sort_keys=True)
    if existing:
        # Into the existing folder, file by file (weights first, so a crash never leaves a config without weights);
        # nothing else in the folder is touched.
        atomic_write(folder / PEFT_FILES[1],
                     lambda temporary: safetensors.torch.save_file(tensors, temporary, metadata=metadata))
        atomic_write(folder / PEFT_FILES[0], lambda temporary: Path(temporary).write_text(text))
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0o700 would hide the folder from other users
        (staging / PEFT_FILES[0]).write_text(text)
        safetensors.torch.save_file(tensors, str(staging / PEFT_FILES[1]), metadata=metadata)
        os.replace(staging, folder)  # a new or empty folder: one atomic rename
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def read_peft_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``adapter_config.json`` and ``{layer name: (A, B)}``-style raw tensors of a PEFT LoRA folder."""
    import safetensors.torch

    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    weights_path = folder / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterFormatError(
            f"{folder}: not a PEFT adapter folder (needs adapter_config.json and adapter_model.safetensors; "
            ".bin pickles are not read)"
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterFormatError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterFormatError(f"{config_path}: peft_type must be LORA")
    try:
        tensors = safetensors.torch.load_file(str(weights_path))
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise AdapterFormatError(f"{weights_path}: cannot read it ({str(error)[:200]})") from None
    return config, tensors


def _pattern_key(pattern: dict, layer_name: str) -> str:
    """PEFT's rule for ``rank_pattern``/``alpha_pattern`` keys: the first key that matches the end of the layer
    name (``(.*\\.)?KEY$``); the layer name itself when none does."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", layer_name):
            return key
    return layer_name


@torch.no_grad()
def import_peft(
    model: SegmentationModel,
    folder: str | Path,
    modality: str,
    *,
    num_classes: int = 2,
    label_names: list[str] | None = None,
) -> None:
    """Use a PEFT LoRA folder as ``modality``'s backbone experts.

    If the modality is not loaded it is added (with a fresh decoder to train). The PEFT rank may be lower than the
    model's (zero-padding ``A`` and ``B`` keeps ``B A`` unchanged); its ``lora_alpha / r`` scaling (or rsLoRA's
    ``lora_alpha / sqrt(r)``) is folded into ``B``. ``rank_pattern`` and ``alpha_pattern`` are applied per layer
    with PEFT's own matching rule, so the imported experts compute what PEFT's forward computes. Layers the folder
    does not cover keep an identity expert.

    Refused with :class:`~m4oe_adapters.errors.AdapterFormatError` (an expert is plain LoRA and cannot hold them):
    DoRA (``use_dora``), trained biases (``bias`` other than ``"none"``, ``lora_bias``), ``fan_in_fan_out``,
    ``modules_to_save`` and any tensor other than ``lora_A``/``lora_B`` weights.
    """
    config, tensors = read_peft_folder(folder)
    config_path = Path(folder) / "adapter_config.json"
    unsupported = [
        (bool(config.get("use_dora")), "use_dora: DoRA scales each output by a learned magnitude"),
        (config.get("bias", "none") not in (None, "none"), f"bias={config.get('bias')!r}: trained biases"),
        (bool(config.get("lora_bias")), "lora_bias: a bias on lora_B"),
        (bool(config.get("fan_in_fan_out")), "fan_in_fan_out: transposed (Conv1D) weights"),
        (bool(config.get("modules_to_save")), f"modules_to_save={config.get('modules_to_save')}: fully trained modules"),
    ]
    for refused, what in unsupported:
        if refused:
            raise AdapterFormatError(
                f"{config_path}: {what} - not representable as an m4oe expert (plain LoRA); export a plain LoRA "
                "adapter from PEFT, or merge this one into the backbone with PEFT's merge_and_unload()"
            )
    rank = int(config.get("r", 0))
    alpha = float(config.get("lora_alpha", rank))
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for kind in ("lora_A", "lora_B"):
            for suffix in (f".{kind}.weight", f".{kind}.default.weight"):
                if name.endswith(suffix):
                    pairs.setdefault(name[: -len(suffix)], {})[kind] = tensor
                    break
            else:
                continue
            break
        else:
            raise AdapterFormatError(
                f"{Path(folder) / 'adapter_model.safetensors'}: tensor {key!r} is not a LoRA A/B weight (DoRA "
                "magnitude, bias or a saved module?); only plain LoRA can be imported as an expert"
            )
    unknown = sorted(set(pairs) - set(model.expert_layers))
    if unknown or not pairs:
        raise BackboneMismatchError(
            f"{folder}: LoRA layers {unknown[:3] or '(none)'} are not expert layers of this backbone "
            f"({len(model.expert_layers)} layers, e.g. {next(iter(model.expert_layers))})"
        )
    layer_ranks = {name: int(rank_pattern.get(_pattern_key(rank_pattern, name), rank)) for name in pairs}
    for name, layer_rank in layer_ranks.items():
        if not 1 <= layer_rank <= model.expert_config.rank:
            raise BackboneMismatchError(
                f"{folder}: PEFT rank {layer_rank} (layer {name}) cannot be imported into experts of rank "
                f"{model.expert_config.rank}; build the model with ExpertConfig(rank={layer_rank}) or more"
            )
    if modality not in model.modalities:
        model.add_modality(modality, num_classes, label_names)
    for name, pair in pairs.items():
        layer = model.expert_layers[name]
        rank = layer_ranks[name]
        layer_alpha = float(alpha_pattern.get(_pattern_key(alpha_pattern, name), alpha))
        scaling = layer_alpha / rank**0.5 if config.get("use_rslora") else layer_alpha / rank
        lora_a, lora_b = pair.get("lora_A"), pair.get("lora_B")
        if lora_a is None or lora_b is None:
            raise AdapterFormatError(f"{folder}: layer {name} lacks lora_A or lora_B")
        if lora_a.shape != (rank, layer.in_features) or lora_b.shape != (layer.out_features, rank):
            raise BackboneMismatchError(
                f"{folder}: layer {name} has A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}; the backbone needs "
                f"A [{rank}, {layer.in_features}], B [{layer.out_features}, {rank}]"
            )
        padded_a = torch.zeros_like(layer.lora_A[modality])
        padded_b = torch.zeros_like(layer.lora_B[modality])
        padded_a[:rank] = lora_a.float()
        padded_b[:, :rank] = lora_b.float() * (scaling / layer.scaling)
        layer.lora_A[modality].copy_(padded_a)
        layer.lora_B[modality].copy_(padded_b)
