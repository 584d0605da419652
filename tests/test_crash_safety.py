"""A process killed (SIGKILL) in the middle of writing an adapter or a checkpoint never damages the file already
there and never leaves a partial file under the final name.

The writer runs in a separate Python process (``WRITER`` below), started once per test: it builds what it writes,
measures how long one save takes and when its write begins (save_adapter first checks the bytes it will write),
then for each round forks a child that saves once over the file while the test SIGKILLs it at a random moment of
the write (after its temporary file appears; for checkpoints, which write at once, a random moment of the save). The writer process sets one torch thread before
any work, so forking it is safe. ``M4OE_CRASH_KILLS`` sets the number of kills per test (default 30).
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from m4oe_adapters.adapter_file import atomic_write, cleanup_stale_temporaries, read_adapter

KILLS = int(os.environ.get("M4OE_CRASH_KILLS", "30"))
pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"), reason="needs POSIX")
TESTS = Path(__file__).parent

WRITER = textwrap.dedent('''
    import os, sys, time
    import torch
    torch.set_num_threads(1)  # before any work: the process forks below
    sys.path.insert(0, sys.argv[3])
    from m4oe_adapters.adapter_file import atomic_write, save_adapter

    mode, path = sys.argv[1], sys.argv[2]
    if mode == "adapter":
        from conftest import tiny_backbone
        torch.set_num_threads(1)  # conftest sets 2 on import; a forked child of a multi-threaded parent can hang
        from m4oe_adapters import DecoderConfig, ExpertConfig, SegmentationModel

        def version(value):  # about 75 MB: a save takes 100+ ms, so kills land mid-write
            model = SegmentationModel(tiny_backbone(), ExpertConfig(rank=64), DecoderConfig(channels=720))
            model.add_modality("CT", 2, seed=0)
            with torch.no_grad():
                for layer in model.expert_layers.values():
                    layer.lora_B["CT"].fill_(value)
            return lambda target: save_adapter(model, "CT", target)
    else:
        def version(value):  # a checkpoint-like state of about 80 MB
            state = {"step": int(value), "weights": torch.full((20_000_000,), float(value))}
            return lambda target: atomic_write(target, lambda t: torch.save(state, t))

    # save_adapter checks the serialised bytes with the reader before it writes: note when the write itself
    # begins (atomic_write is called), so the kills can be aimed at the writing, not at the checking before it.
    import m4oe_adapters.adapter_file as adapter_file
    marks = []
    unpatched = adapter_file.atomic_write
    def noted(target, write):
        marks.append(time.perf_counter())
        return unpatched(target, write)
    adapter_file.atomic_write = noted

    old, new = version(1), version(2)
    old(path)
    durations, write_starts = [], []
    for index in range(3):
        marks.clear()
        start = time.perf_counter()
        new(path + ".timing")
        durations.append(time.perf_counter() - start)
        write_starts.append((marks[0] - start) if marks else 0.0)
    os.unlink(path + ".timing")
    old(path)
    print("ready", min(durations), min(write_starts), flush=True)
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                new(path)
            finally:
                os._exit(0)
        print(pid, flush=True)
        sys.stdin.readline()  # the test has killed it (or let it finish)
        _, status = os.waitpid(pid, 0)
        print("killed" if os.WIFSIGNALED(status) else "finished", flush=True)
''')


def kill_writes(tmp_path: Path, mode: str, path: Path, check) -> dict[str, int]:
    """Run ``KILLS`` rounds of (fork a save over ``path``, SIGKILL it at a random moment, ``check(previous)``)."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    writer = subprocess.Popen([sys.executable, str(script), mode, str(path), str(TESTS)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, bufsize=1)
    rng = random.Random(0)
    counts = {"kills": 0, "mid-write": 0, "before the temporary": 0, "after the rename": 0}
    try:
        ready, duration, write_start = writer.stdout.readline().split()
        assert ready == "ready"
        counts["save_ms"] = round(float(duration) * 1000)
        counts["write_starts_ms"] = round(float(write_start) * 1000)
        previous = path.read_bytes()
        for _ in range(KILLS):
            writer.stdin.write("go\n")
            pid = int(writer.stdout.readline())
            if float(write_start) > 0:  # wait for the write to begin (its temporary file), then kill during it
                deadline = time.perf_counter() + 30
                while not any(p.name.endswith(".tmp") for p in path.parent.iterdir()) and time.perf_counter() < deadline:
                    time.sleep(0.0005)
                time.sleep(rng.uniform(0.0, float(duration) - float(write_start)))
            else:
                time.sleep(rng.uniform(0.0, float(duration)))
            os.kill(pid, signal.SIGKILL)
            writer.stdin.write("reaped?\n")
            how = writer.stdout.readline().strip()
            counts["kills"] += 1
            check(previous)
            left = cleanup_stale_temporaries(path.parent)
            if how == "finished" or path.read_bytes() != previous:
                counts["after the rename"] += 1
            else:
                counts["mid-write" if left else "before the temporary"] += 1
            previous = path.read_bytes()
    finally:
        writer.stdin.close()
        writer.wait(timeout=60)
    print(f"\n{mode}: {counts}")
    return counts


def test_killing_save_adapter_mid_write_keeps_a_loadable_file(tmp_path):
    path = tmp_path / "ct.safetensors"

    def check(previous: bytes):
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
            "ct.safetensors", "writer.py"]  # nothing partial under a final name
        current = path.read_bytes()
        if current != previous:  # then it must be the complete new file
            _, tensors = read_adapter(path)
            assert all(float(t.flatten()[0]) == 2.0 for k, t in tensors.items() if k.endswith("lora_B"))
        read_adapter(path)  # loadable either way

    counts = kill_writes(tmp_path, "adapter", path, check)
    assert counts["kills"] == KILLS and counts["mid-write"] >= KILLS // 4, counts


def test_killing_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"

    def check(previous: bytes):
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
            "checkpoint.pt", "writer.py"]
        state = torch.load(path, weights_only=True)
        assert state["step"] in (1, 2) and float(state["weights"][-1]) == state["step"]
        assert path.read_bytes() == previous or state["step"] == 2

    counts = kill_writes(tmp_path, "checkpoint", path, check)
    assert counts["kills"] == KILLS and counts["mid-write"] >= KILLS // 4, counts


def test_stale_temporary_files_are_ignored_and_cleaned(tmp_path):
    import safetensors.torch

    from m4oe_adapters import save_adapter
    from conftest import tiny_model

    path = save_adapter(tiny_model(rank=2, modalities=("CT",)), "CT", tmp_path / "ct.safetensors")
    stale = tmp_path / ".ct.safetensors.0123abcd.tmp"
    stale.write_bytes(path.read_bytes()[:1000])  # what a killed save leaves
    unrelated = tmp_path / ".notes.tmp"
    unrelated.write_text("not ours")
    read_adapter(path)  # readers only ever open final names
    assert cleanup_stale_temporaries(tmp_path, older_than_seconds=3600) == 0  # too recent: maybe still written
    assert cleanup_stale_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "ct.safetensors"]
    assert safetensors.torch.load_file(str(path))  # still a plain safetensors file


def test_written_files_get_the_usual_permissions_not_private_temporary_ones(tmp_path):
    from m4oe_adapters import save_adapter
    from conftest import tiny_model

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    usual = plain.stat().st_mode & 0o777
    written = atomic_write(tmp_path / "atomic.txt", lambda t: Path(t).write_text("x"))
    adapter = save_adapter(tiny_model(rank=2, modalities=("CT",)), "CT", tmp_path / "ct.safetensors")
    assert written.stat().st_mode & 0o777 == usual and adapter.stat().st_mode & 0o777 == usual


def test_a_failing_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = atomic_write(tmp_path / "state.txt", lambda t: Path(t).write_text("old"))

    def broken(temporary):
        Path(temporary).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.txt"]
