"""How much the "every backbone tensor came from the file" check adds to loading a backbone.

Times, warm (imports done, median of 5), the whole ``load_backbone`` and the part of it that is the check (wrapper
prefix matching, shape split, key accounting, completeness test; not the tensor copy, which any load does) on the
reference backbone (``adapters_zoo/backbone``) and on a Swin-T-sized random checkpoint written to a temporary folder
(safetensors, and a DDP ``.pth`` inside a ``state_dict`` container).

    python examples/backbone_check_cost.py
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import safetensors.torch
import timm
import torch

from m4oe_adapters.backbones import load_backbone, timm_swin

ZOO = Path(__file__).resolve().parent.parent / "adapters_zoo" / "backbone"
timers = {"check": 0.0}


def timed(function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        timers["check"] += time.perf_counter() - start
        return result

    return wrapper


def main() -> None:
    for name in ("unwrap", "split_by_shape", "check_complete"):
        setattr(timm_swin, name, timed(getattr(timm_swin, name)))
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        state = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0).state_dict()
        plain, wrapped = Path(folder) / "swin_t.safetensors", Path(folder) / "swin_t_ddp.pth"
        safetensors.torch.save_file({key: value.contiguous() for key, value in state.items()}, str(plain))
        torch.save({"state_dict": {f"module.{key}": value for key, value in state.items()}, "epoch": 1}, wrapped)
        cases = [("reference backbone (timm hub folder)", "timm:", ZOO),
                 ("Swin-T random, safetensors", "timm:swin_tiny_patch4_window7_224", plain),
                 ("Swin-T random, DDP .pth in state_dict", "timm:swin_tiny_patch4_window7_224", wrapped)]
        for label, spec, path in cases:
            if not Path(path).exists():
                print(f"{label}: {path} missing, skipped")
                continue
            load_backbone(spec, path)  # warm
            totals, checks = [], []
            for _ in range(5):
                timers["check"] = 0.0
                start = time.perf_counter()
                backbone = load_backbone(spec, path)
                totals.append(time.perf_counter() - start)
                checks.append(timers["check"])
            total, check = statistics.median(totals), statistics.median(checks)
            print(f"{label}: load {total * 1000:.0f} ms, check {check * 1000:.2f} ms ({100 * check / total:.3f} %); "
                  f"{backbone.load_report.summary()}")


if __name__ == "__main__":
    main()
