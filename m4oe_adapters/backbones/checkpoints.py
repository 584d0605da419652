"""Reading the Swin checkpoints users have, and proving every backbone tensor came from them.

Three steps, shared by every family:

1. :func:`read_checkpoint` opens a file safely: safetensors natively; ``.pth``/``.pt``/``.bin`` only through
   ``torch.load(weights_only=True)`` with a small allow-list of harmless globals that training scripts put next to
   the weights (numpy scalars and arrays, ``argparse.Namespace``). Anything else is refused with the name of the
   refused global and the one-line command that re-saves the weights alone. No arbitrary unpickling, ever.
2. It then finds the state dict inside the container users save: a bare state dict, or one under ``state_dict``,
   ``model``, ``teacher``/``student`` (DINO-style), ``module``, ``network``, ``net``; optimiser, epoch and metric
   entries are ignored (and listed).
3. :func:`match_prefix` finds the wrapper prefix (``module.``, ``encoder.``, ``backbone.``, ``model.`` or a chain
   of them) under which the file's keys name the model's tensors; keys outside it (a SimMIM ``decoder.*``, a DINO
   ``head.*``) are ignored and listed. After loading, :func:`check_complete` raises :class:`BackboneError` unless
   every backbone tensor came from the file (directly or through a stated transformation), naming the missing and
   unexpected keys and the likely cause. :class:`LoadReport` records what happened, for ``m4oe backbone check``,
   ``m4oe inspect`` and adapter metadata.
"""
from __future__ import annotations

import pickle
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..errors import BackboneError

CONTAINER_KEYS = ("state_dict", "model", "teacher", "student", "module", "network", "net")
WRAPPER_PREFIXES = ("module.", "encoder.", "backbone.", "model.", "swin.", "swinViT.", "swin_vit.")
# Buffers every family recomputes from the architecture; a file may or may not carry them.
DERIVED_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")
SHOWN = 6  # keys shown per list in an error message


# ------------------------------------------------------------------------------------------------- reading
def _allowed_globals() -> list[Any]:
    """Globals that training scripts save next to weights and that build plain data only (no code runs)."""
    import argparse

    allowed: list[Any] = [argparse.Namespace]
    try:
        import numpy as np

        core = np._core if hasattr(np, "_core") else np.core
        allowed += [np.dtype, np.ndarray, core.multiarray.scalar, core.multiarray._reconstruct]
        # Files written under numpy 1.x name these numpy.core.*; numpy 2 writes numpy._core.*.
        allowed += [
            (core.multiarray.scalar, "numpy.core.multiarray.scalar"),
            (core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
            (core.multiarray.scalar, "numpy._core.multiarray.scalar"),
            (core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
        ]
        if hasattr(np, "dtypes"):  # dtype classes of numeric/boolean/string scalars; never object arrays
            allowed += [
                getattr(np.dtypes, name)
                for name in dir(np.dtypes)
                if name.endswith("DType") and name != "ObjectDType"
            ]
    except ImportError:  # pragma: no cover - numpy ships with torch
        pass
    return allowed


def resave_command(path: Path) -> str:
    """One line that re-saves only the weights of a trusted checkpoint as safetensors."""
    out = path.with_suffix(".safetensors")
    return (
        "python -c \"import torch, safetensors.torch as st; c = torch.load('"
        + str(path)
        + "', map_location='cpu', weights_only=False); c = next((c[k] for k in ('state_dict', 'model', 'teacher') "
        "if isinstance(c, dict) and k in c), c); st.save_file({k: v.contiguous() for k, v in c.items() "
        "if isinstance(v, torch.Tensor)}, '"
        + str(out)
        + "')\""
    )


def _refused_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - only used to word the message; the refusal stands either way
        return []


def _load_object(path: Path) -> Any:
    """The file's top-level object, read without running code from it."""
    if path.suffix == ".safetensors":
        import safetensors.torch

        try:
            return safetensors.torch.load_file(str(path))
        except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError
            raise BackboneError(
                f"{path}: not a readable safetensors file ({type(error).__name__}: {str(error)[:200]}); "
                "re-download or re-save it"
            ) from None
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        refused = [name for name in _refused_globals(path) if not name.startswith(("numpy.", "argparse."))]
        what = f"it holds Python objects that are not plain data: {', '.join(refused[:5])}" if refused else (
            "it is not a weights-only torch file"
        )
        raise BackboneError(
            f"{path}: refused to unpickle the checkpoint ({what}). Only tensors, containers, numbers, strings, "
            "numpy scalars/arrays and argparse namespaces are read, because unpickling other objects can run code. "
            f"If you trust the file, re-save its weights once: {resave_command(path)}"
        ) from None
    except (RuntimeError, OSError, ValueError, EOFError, AttributeError) as error:
        raise BackboneError(
            f"{path}: cannot read the checkpoint ({type(error).__name__}: {str(error).splitlines()[0][:300]}). "
            "Give a .safetensors file or a torch state dict saved with torch.save"
        ) from None


def _is_state_dict(value: Any) -> bool:
    if not isinstance(value, Mapping) or not value:
        return False
    tensors = sum(isinstance(item, torch.Tensor) for item in value.values())
    return tensors > 0 and tensors * 2 >= len(value)


@dataclass
class Checkpoint:
    """The state dict found in a file, with where it was found.

    Attributes:
        path: the file.
        tensors: name → tensor, as in the file (prefixes not yet removed).
        container: keys followed to reach the state dict, e.g. ``["state_dict"]`` or ``["teacher"]``.
        ignored_entries: other top-level entries of the container (``epoch``, ``optimizer``...), not read.
    """

    path: Path
    tensors: dict[str, torch.Tensor]
    container: list[str] = field(default_factory=list)
    ignored_entries: list[str] = field(default_factory=list)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Open ``path`` safely and find its state dict (see the module docstring for the accepted containers)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: backbone checkpoint not found (give an existing file, or --weights none)")
    current: Any = _load_object(path)
    container: list[str] = []
    ignored: list[str] = []
    for _ in range(4):
        if _is_state_dict(current):
            break
        if not isinstance(current, Mapping):
            break
        key = next((key for key in CONTAINER_KEYS if _is_state_dict(current.get(key))), None)
        key = key or next((key for key in CONTAINER_KEYS if isinstance(current.get(key), Mapping)), None)
        if key is None:
            candidates = [key for key, value in current.items() if _is_state_dict(value)]
            if len(candidates) != 1:
                break
            key = candidates[0]
        ignored += [f"{'.'.join(container + [str(other)])}" for other in current if other != key]
        container.append(str(key))
        current = current[key]
    if not _is_state_dict(current):
        kind = type(current).__name__
        keys = f" with keys {sorted(map(str, current))[:8]}" if isinstance(current, Mapping) else ""
        raise BackboneError(
            f"{path}: no state dict found in the checkpoint (a {kind}{keys}). Expected tensors, or a container with "
            f"one of {list(CONTAINER_KEYS)} holding them"
        )
    tensors = {str(key): value for key, value in current.items() if isinstance(value, torch.Tensor)}
    return Checkpoint(path=path, tensors=tensors, container=container, ignored_entries=ignored)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from its container (see :func:`read_checkpoint`)."""
    return read_checkpoint(path).tensors


# ------------------------------------------------------------------------------------------------- matching
def strip_prefixes(state_dict: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Remove any of ``prefixes`` from the start of each key, repeatedly (``module.swinViT.x`` → ``x``)."""
    result = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        result[key] = value
    return result


def match_prefix(keys: Iterable[str], model_keys: set[str], depth: int = 3) -> tuple[str, int]:
    """The leading ``a.b.`` (up to ``depth`` components) under which most file keys are model keys.

    Returns ``(prefix, matched)``; ``prefix`` is ``""`` when the keys are bare. Ties go to the shorter prefix.
    """
    counts: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".")
        for cut in range(0, min(depth, len(parts) - 1) + 1):
            if ".".join(parts[cut:]) in model_keys:
                counts[".".join(parts[:cut]) + ("." if cut else "")] += 1
    if not counts:
        return "", 0
    prefix, matched = max(counts.items(), key=lambda item: (item[1], -len(item[0])))
    return prefix, matched


def unwrap(
    state_dict: dict[str, torch.Tensor], model_keys: set[str]
) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Keys under the best wrapper prefix, with it removed; the prefix; the keys outside it (ignored)."""
    prefix, _ = match_prefix(state_dict, model_keys)
    if not prefix:
        return dict(state_dict), "", []
    inside = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    outside = [key for key in state_dict if not key.startswith(prefix)]
    return inside, prefix, outside


def is_derived(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in DERIVED_BUFFERS


def split_by_shape(
    state_dict: dict[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Entries whose shape fits the model, and ``"key: file [..] vs model [..]"`` for those that do not."""
    fitting, mismatched = {}, []
    for key, value in state_dict.items():
        target = model_state.get(key)
        if target is not None and tuple(target.shape) != tuple(value.shape):
            mismatched.append(f"{key}: file {list(value.shape)} vs model {list(target.shape)}")
        else:
            fitting[key] = value
    return fitting, mismatched


# ------------------------------------------------------------------------------------------------- report
@dataclass
class LoadReport:
    """What a checkpoint load did, for the user and for adapter metadata (JSON-able via :meth:`to_dict`).

    Attributes:
        source: the weights path.
        tensors_from_file: backbone tensors (parameters and persistent buffers, recomputed ones excluded) copied
            from the file, directly or through a transformation listed in ``transformed``.
        tensors_in_backbone: backbone tensors the model has; equal to ``tensors_from_file`` after a passed check.
        container: keys followed inside the file to reach the state dict (``["state_dict"]``...).
        prefix: wrapper prefix removed from the file's keys (``"module."``...), ``""`` for none.
        transformed: one line per tensor changed on the way (relative-position table resized, input channels).
        ignored: file tensors not used (outside the prefix, classifier heads, decoder, mask token...).
        ignored_entries: non-weight entries of the container (``epoch``, ``optimizer``...).
    """

    source: str
    tensors_from_file: int
    tensors_in_backbone: int
    container: list[str] = field(default_factory=list)
    prefix: str = ""
    transformed: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    ignored_entries: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.tensors_from_file == self.tensors_in_backbone

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: ``loaded, 173/173 tensors from FILE (under 'state_dict', prefix 'module.' removed)``."""
        where = []
        if self.container:
            where.append(f"under {'/'.join(repr(key) for key in self.container)}")
        if self.prefix:
            where.append(f"prefix {self.prefix!r} removed")
        if self.transformed:
            where.append(f"{len(self.transformed)} transformed")
        if self.ignored:
            where.append(f"{len(self.ignored)} file tensors ignored")
        detail = f" ({', '.join(where)})" if where else ""
        return f"loaded, {self.tensors_from_file}/{self.tensors_in_backbone} tensors from {self.source}{detail}"


def guess_family(keys: Iterable[str]) -> str | None:
    """Which family's key layout the file uses (``timm``, ``transformers``, ``monai``), if recognisable."""
    keys = list(keys)
    if any("embeddings.patch_embeddings" in key for key in keys):
        return "transformers"
    if any(re.search(r"(^|\.)layers[1-4](c)?\.0\.blocks\.", key) for key in keys):
        return "monai"
    if any(re.search(r"(^|\.)layers\.\d+\.blocks\.\d+\.", key) for key in keys):
        return "timm"
    return None


def common_prefix(keys: Iterable[str]) -> str | None:
    """The first key component shared by most keys (``"module"``), to name an unknown wrapper."""
    firsts = Counter(key.split(".", 1)[0] for key in keys if "." in key)
    if not firsts:
        return None
    first, count = firsts.most_common(1)[0]
    return first if count * 2 > sum(firsts.values()) else None


def check_complete(
    report: LoadReport,
    *,
    spec: str,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
    file_keys: Iterable[str],
    family: str,
    file_architecture: str | None = None,
) -> None:
    """Raise :class:`BackboneError` unless every backbone tensor came from the file.

    Args:
        report: the load so far (counts filled in).
        spec: ``FAMILY:NAME`` as built, for the message.
        missing: backbone tensors the file did not provide (recomputed buffers excluded).
        unexpected: file tensors (after prefix removal) the backbone has no place for.
        mismatched: ``"key: file [..] vs model [..]"`` for tensors present in both with other shapes.
        file_keys: the file's own keys (before prefix removal), to guess the cause.
        family: the family that was asked for.
        file_architecture: a description of the architecture read from the file's shapes, if known.
    """
    if not missing and not mismatched:
        return
    file_keys = list(file_keys)
    causes = []
    other = guess_family(file_keys)
    if report.tensors_from_file == 0 and other and other != family:
        causes.append(f"the file uses the {other} key layout: load it with --backbone {other}:...")
    elif report.tensors_from_file == 0:
        first = common_prefix(file_keys)
        if first and not report.prefix:
            causes.append(
                f"its keys start with {first + '.'!r}, which names no backbone tensor: it may be another "
                "architecture, or a wrapper around one (save the backbone's own state_dict)"
            )
        else:
            causes.append("no key of the file names a tensor of this backbone: wrong family or architecture name")
    if mismatched:
        arch = f" (the file holds {file_architecture})" if file_architecture else ""
        causes.append(
            f"{len(mismatched)} tensors have other shapes than {spec} builds{arch}: pick the architecture name or "
            "--model-args (embed_dim, depths, num_heads, window_size) that match the file"
        )
    elif missing and report.tensors_from_file:
        causes.append(
            "the file covers only part of the backbone: a Swin v1 file for a SwinV2 name (or the reverse), other "
            "depths, or a partial/truncated save"
        )
    lines = [
        f"{report.source}: only {report.tensors_from_file} of the {report.tensors_in_backbone} tensors of backbone "
        f"{spec} come from the file; refusing to run with the rest random.",
        "Likely cause: " + "; ".join(causes) + ".",
    ]
    if report.container or report.prefix:
        lines.append(
            f"Read from {'/'.join(report.container) or 'the top level'}"
            + (f" with prefix {report.prefix!r} removed" if report.prefix else "")
            + "."
        )
    if missing:
        lines.append(f"Missing ({len(missing)}): {', '.join(missing[:SHOWN])}{' ...' if len(missing) > SHOWN else ''}")
    if mismatched:
        lines.append(
            f"Shape differs ({len(mismatched)}): {'; '.join(mismatched[:3])}{' ...' if len(mismatched) > 3 else ''}"
        )
    if unexpected:
        lines.append(
            f"In the file but not in the backbone ({len(unexpected)}): {', '.join(unexpected[:SHOWN])}"
            f"{' ...' if len(unexpected) > SHOWN else ''}"
        )
    raise BackboneError("\n".join(lines))


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a first convolution's weight ``[out, C_src, *k]`` to ``in_chans`` inputs by timm's rule
    (``adapt_input_conv`` with ``base_chans = C_src``): the sum over the source channels for one channel, else the
    source channels repeated and cut to ``in_chans``, scaled by ``C_src / in_chans``. Written out here because the
    ``base_chans`` argument only exists from timm 1.0.31 on (1.0.29, on a GPU machine, refused the call), and the
    same rule serves 3D kernels."""
    source = weight.shape[1]
    if source == in_chans:
        return weight
    dtype = weight.dtype
    weight = weight.float()
    if in_chans == 1:
        adapted = weight.sum(dim=1, keepdim=True)
    else:
        repeat = -(-in_chans // source)
        adapted = weight.repeat(1, repeat, *([1] * (weight.dim() - 2)))[:, :in_chans] * (source / in_chans)
    return adapted.to(dtype)
