"""A process killed (SIGKILL) in the middle of writing an adapter or a checkpoint never damages the file already
there and never leaves a partial file under the final name."""
from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch

from m4oe_adapters import DecoderConfig, ExpertConfig, SegmentationModel, save_adapter
from m4oe_adapters.adapter_file import atomic_write, cleanup_stale_temporaries, read_adapter

from conftest import tiny_backbone

KILLS = int(os.environ.get("M4OE_CRASH_KILLS", "40"))
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def big_model(seed: int) -> SegmentationModel:
    """About 10 MB per file, so a save takes tens of milliseconds and kills land mid-write."""
    model = SegmentationModel(tiny_backbone(), ExpertConfig(rank=64), DecoderConfig(channels=256))
    model.add_modality("CT", 2, seed=seed)
    with torch.no_grad():
        for layer in model.expert_layers.values():
            layer.lora_B["CT"].fill_(seed)
    return model


def kill_repeatedly(write, check, kills: int) -> dict[str, int]:
    """Fork a child that calls ``write()`` in a loop, SIGKILL it after a random delay, then ``check()``."""
    rng = random.Random(0)
    outcomes = {"killed": 0}
    for _ in range(kills):
        pid = os.fork()
        if pid == 0:  # child: write forever until killed
            try:
                torch.set_num_threads(1)
                while True:
                    write()
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 0.06))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        outcomes["killed"] += 1
        check()
    return outcomes


def test_killing_save_adapter_mid_write_keeps_a_loadable_file(tmp_path):
    path = tmp_path / "ct.safetensors"
    save_adapter(big_model(1), "CT", path)
    new = big_model(2)
    seen = set()

    mid_write = []

    def check():
        _, tensors = read_adapter(path)  # raises if damaged
        seen.add(float(tensors[next(k for k in tensors if k.endswith("lora_B"))].flatten()[0]))
        assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["ct.safetensors"]
        mid_write.append(cleanup_stale_temporaries(tmp_path))  # a partial temporary = killed while writing

    outcomes = kill_repeatedly(lambda: save_adapter(new, "CT", path), check, KILLS)
    print(f"\n{outcomes['killed']} kills, {sum(1 for m in mid_write if m)} of them in the middle of a write")
    assert outcomes["killed"] == KILLS and sum(1 for m in mid_write if m) > 0
    assert seen <= {1.0, 2.0}  # always the old complete file or the new complete file


def test_killing_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    old = {"step": 1, "weights": torch.zeros(1_500_000)}
    atomic_write(path, lambda t: torch.save(old, t))
    new = {"step": 2, "weights": torch.ones(1_500_000)}

    def check():
        state = torch.load(path, weights_only=True)
        assert state["step"] in (1, 2) and float(state["weights"][0]) == state["step"] - 1

    kill_repeatedly(lambda: atomic_write(path, lambda t: torch.save(new, t)), check, KILLS // 2)


def test_stale_temporary_files_are_ignored_and_cleaned(tmp_path):
    path = save_adapter(big_model(1), "CT", tmp_path / "ct.safetensors")
    (tmp_path / ".ct.safetensors.abc123.tmp").write_bytes(b"partial")
    read_adapter(path)
    assert cleanup_stale_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.safetensors"]
