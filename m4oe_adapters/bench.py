"""``m4oe bench``: speed, memory and size of modality experts against PEFT LoRA, full fine-tuning and a frozen
backbone, measured in one run on the same backbone, batch and image size.

Timing: every configuration of a group is run round-robin (A B C A B C ...) after warm-up and the median of the
repeats is kept, so slow drifts of a shared machine hit all configurations alike; ratios are the headline figures.

Memory (CPU has no allocator statistics): the bytes a training step must hold, counted exactly, in two parts:
*activations saved for backward* (every tensor autograd keeps, through ``saved_tensors_hooks``, each storage counted
once; parameters saved by reference are not activations and are left out) and *state* (parameters + gradients of
trainable parameters + AdamW's two moments). Their sum is the step's peak memory apart from transient workspace.
Why not the process's RSS high-water mark: on a shared machine it needs a fresh process per configuration, and the
allocator's caching blurs differences of a few percent; the count above is exact and repeatable.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward (matmuls and convolutions), divided by
the measured step time and set against a plain ``torch.mm`` on the same machine, so the distance to the limit shows.
That counted step is also each configuration's warm-up.

Runs where users run (issue 13): the same expert training step in bf16 autocast (time, activation bytes) and with
gradient checkpointing (time; saved bytes = what autograd keeps outside the checkpointed blocks + the inputs the
checkpointed blocks keep, counted by a pre-hook on each block; the one block recomputed at a time during backward is
transient and not counted); with ``compile=True`` the hard-routed model under ``torch.compile`` (inductor): compile
time, latency against eager, and the number of recompilations while switching through the modalities and a mixed
batch after warm-up. The modality switch is timed as forward passes that alternate modalities against passes that
repeat one (the cost a user sees), and the start-up time of ``m4oe inspect`` in a fresh process.
"""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter_file import load_adapter, save_adapter
from .backbones import load_backbone
from .config import DecoderConfig, ExpertConfig
from .checkpointing import checkpointed_modules, set_gradient_checkpointing
from .model import SegmentationModel
from .runtime import autocast, resolve_device
from .segmenters import BackboneSegmenter, ModalitySegmenter

SWIN_T = "timm:swin_tiny_patch4_window7_224"
TINY_ARGS = {"embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 1, 2, 2], "window_size": 4}

TARGETS = {
    "experts_k4_vs_lora_time": 1.10,
    "experts_k4_vs_lora_memory": 1.10,
    "experts_vs_full_memory": 0.90,
    "merged_vs_base_latency": 1.02,
    "unmerged_vs_base_latency": 1.15,
    "mixed4_vs_single_latency": 1.20,
    "routed_vs_mixed_latency": 1.05,  # image-level routing adds at most 5 % to a mixed batch
    "routed_vs_mixed_latency_batch_1": 1.05,  # ... and to a single image
    "switch_ms": 5.0,
    "checkpointed_vs_plain_activations": 0.5,
    "checkpointed_vs_plain_time": 1.4,
    "adapter_load_ms": 100.0,
    "file_vs_full": 1 / 20,
}


def synchronize() -> None:
    """Wait for queued GPU work, so a timer measures it (no-op on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_round_robin(functions: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, called round-robin ``repeats`` times after ``warmup`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_index in range(warmup + repeats):
        for name, function in functions.items():
            synchronize()
            started = time.perf_counter()
            function()
            synchronize()
            elapsed = time.perf_counter() - started
            if round_index >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


class SavedActivations:
    """Context manager: bytes of the distinct storages autograd saves for backward inside it (``.bytes``).

    Storages of ``parameters`` are left out: a frozen weight saved for the input's gradient costs no memory beyond the
    weight itself, which :func:`state_bytes` counts.
    """

    def __init__(self, parameters: list[torch.Tensor], checkpointed_blocks: list[nn.Module] = ()) -> None:
        self.owned = {parameter.untyped_storage().data_ptr() for parameter in parameters}
        self.storages: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        # A checkpointed block keeps its inputs outside autograd's saved tensors: count them where they enter.
        self.blocks = list(checkpointed_blocks)
        self.handles: list = []

    def _block_inputs(self, module, args) -> None:
        if torch.is_grad_enabled():
            for value in args:  # a decoder's input is a list of feature maps
                for tensor in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(tensor, torch.Tensor):
                        self._pack(tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.layout == torch.strided and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self.owned:
                self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self) -> "SavedActivations":
        self.hooks.__enter__()
        self.handles = [block.register_forward_pre_hook(self._block_inputs) for block in self.blocks]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.hooks.__exit__(*exc)


def state_bytes(module: nn.Module, parameters: list[nn.Parameter]) -> int:
    """Parameters + gradients and AdamW moments of the trainable ones."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    trainable = sum(p.numel() * p.element_size() for p in parameters)
    return total + 3 * trainable


class TrainCase:
    """One training configuration: a module, its trainable parameters and an AdamW step on a fixed batch."""

    def __init__(self, name: str, module: nn.Module, parameters: list[nn.Parameter], images, labels,
                 precision: str = "32", checkpointed_blocks: list[nn.Module] = ()) -> None:
        self.name, self.module, self.parameters = name, module, parameters
        self.images, self.labels = images, labels
        self.precision, self.checkpointed_blocks = precision, list(checkpointed_blocks)
        self.optimizer = torch.optim.AdamW(parameters, lr=1e-4)
        self.module.train()

    def loss(self) -> torch.Tensor:
        with autocast(self.images.device, self.precision):
            logits = self.module(self.images)
        return nn.functional.cross_entropy(logits.float(), self.labels)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()

    def profile(self) -> dict[str, int]:
        """One counted training step (it doubles as the warm-up): FLOPs of forward + backward, and the memory the
        step holds (saved activations + state)."""
        from torch.utils.flop_counter import FlopCounterMode

        self.optimizer.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as counter:
            with SavedActivations(list(self.module.parameters()), self.checkpointed_blocks) as saved:
                loss = self.loss()
            loss.backward()
        self.optimizer.step()
        state = state_bytes(self.module, self.parameters)
        return {"saved_activation_bytes": saved.bytes, "state_bytes": state, "total_bytes": saved.bytes + state,
                "flops": int(counter.get_total_flops())}


def build_backbone(spec: str, weights, img_size: int, model_args):
    return load_backbone(spec, weights, in_chans=3, img_size=img_size, model_args=model_args)


def expert_model(backbone_factory, rank: int, modalities: int) -> SegmentationModel:
    model = SegmentationModel(backbone_factory(), ExpertConfig(rank=rank), DecoderConfig())
    for index in range(modalities):
        model.add_modality(f"m{index}", 2, seed=index)
        with torch.no_grad():  # non-zero experts, as after training
            for layer in model.expert_layers.values():
                layer.lora_B[f"m{index}"].normal_(0, 0.01)
    return model


def matmul_peak_gflops(size: int = 2048, repeats: int = 5, device: torch.device | str = "cpu") -> float:
    """GFLOP/s of a plain square ``torch.mm`` on this machine (the ceiling a training step's FLOP rate is held to)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    seconds = median_round_robin({"mm": lambda: torch.mm(a, b)}, repeats, warmup=2)["mm"]
    return 2 * size**3 / seconds / 1e9


def run_benchmark(
    *,
    backbone: str = SWIN_T,
    weights: str | None = None,
    model_args: dict | None = None,
    img_size: int = 224,
    batch: int = 8,
    rank: int = 8,
    experts: tuple[int, ...] = (1, 4, 8),
    repeats: int = 3,
    quick: bool = False,
    compile: bool = False,
    device: str = "auto",
    training: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure everything in the module docstring; returns a JSON-able report.

    ``training=False`` skips the training steps (most of the run time) and measures inference, routing, switching,
    loading and sizes only; the ratios that need training steps are then absent."""
    if quick:
        model_args = model_args or TINY_ARGS
        img_size, batch, repeats, experts = 64, 2, 1, (1, 4)
    device = resolve_device(device)
    factory = lambda: build_backbone(backbone, weights, img_size, model_args).to(device)  # noqa: E731
    torch.manual_seed(0)
    images = torch.randn(batch, 3, img_size, img_size).to(device)
    labels = torch.randint(0, 2, (batch, img_size, img_size)).to(device)
    k_many = 4 if 4 in experts else max(experts)
    report: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "setup": {"backbone": backbone, "weights": str(weights) if weights else "none (random initialisation)",
                  "weights_given": weights is not None, "img_size": img_size,
                  "batch": batch, "rank": rank, "experts": list(experts), "repeats": repeats, "quick": quick,
                  "device": str(device), "compile": compile, "training": training},
    }
    if training:
        report |= training_benchmark(factory, images, labels, rank, experts, k_many, repeats, quick, device, log)
    # ------------------------------------------------------------------ inference latency
    log("timing inference")
    model = expert_model(factory, rank, 4)
    model.eval()
    base = factory().eval()
    merged = expert_model(factory, rank, 1).eval()
    merged.merge("m0")
    inference = {}
    from .signatures import ImageSignature

    generator = torch.Generator().manual_seed(0)
    for index in range(4):  # image-level routing signatures (fitted on noise: only their cost is measured here)
        thumbnails = torch.rand(8, 3, 160, 160, generator=generator) * (0.4 + 0.2 * index)
        model.set_signature(f"m{index}", ImageSignature.fit(thumbnails, views=2, seed=index))
    for size in (1, batch):
        # smooth random images (noise upsampled 8x): routing refuses pixel noise before any signature scores it
        x = F.interpolate(torch.randn(size, 3, img_size // 8, img_size // 8), size=(img_size, img_size),
                          mode="bilinear", align_corners=False).to(device)
        mixed = [f"m{i % 4}" for i in range(size)] if size >= 4 else ["m0"] * size
        with torch.no_grad():
            routed = [d.modality for d in model.route(x, min_confidence=0.0)]  # the router's choice for these images
            functions = {
                "frozen_base": lambda: model.decoders["m0"](base(x), x),
                "merged": lambda: merged(x, "m0"),
                "unmerged_hard": lambda: model(x, "m0"),
                "mixed_4_modalities": lambda: model(x, mixed),
                # What model(images) without a modality does: route each image, then the same mixed forward.
                "routed_4_modalities": lambda: model(x, [d.modality for d in model.route(x, min_confidence=0.0)]),
                "route_only": lambda: model.route(x, min_confidence=0.0),
                "forward_of_routed": lambda: model(x, routed),  # the same forward, modalities given
                "soft_gate": lambda: model(x, "m0", routing="soft"),
            }
            # Batch 1 is cheap: more repeats for a steadier median.
            inference[f"batch_{size}"] = median_round_robin(functions, 3 * repeats if size == 1 else repeats)
    report["inference_seconds"] = inference
    # ------------------------------------------------------------------ switching, loading, building, sizes
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        adapter = save_adapter(model, "m1", folder / "m1.safetensors")
        one_image = torch.randn(1, 3, img_size, img_size).to(device)
        switch_seconds, repeat_seconds = modality_switch_times(model, one_image, rounds=3 * repeats)
        loads = []
        for _ in range(max(repeats, 5)):
            model.remove_modality("m1")
            started = time.perf_counter()
            load_adapter(model, adapter)
            loads.append(time.perf_counter() - started)
        import safetensors.torch

        full_state = {f"backbone.{k}": v.contiguous() for k, v in base.model.state_dict().items()}
        full_state |= {f"decoder.{k}": v.contiguous() for k, v in model.decoders["m1"].state_dict().items()}
        full_file = folder / "full.safetensors"
        safetensors.torch.save_file(full_state, str(full_file))
        checkpoint = folder / "backbone.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in base.model.state_dict().items()}, str(checkpoint))
        started = time.perf_counter()
        rebuilt = SegmentationModel(build_backbone(backbone, checkpoint, img_size, model_args), ExpertConfig(rank=rank))
        build_seconds = time.perf_counter() - started
        del rebuilt
        report["switch_ms"] = (switch_seconds - repeat_seconds) * 1000
        report["switch_detail_ms"] = {"forward_after_a_switch": switch_seconds * 1000,
                                      "forward_same_modality": repeat_seconds * 1000}
        report["inspect_startup_seconds"] = command_startup_seconds(["inspect", str(adapter)])
        report["import_torch_seconds"] = command_startup_seconds(None)
        report["adapter_load_ms"] = statistics.median(loads) * 1000
        report["build_from_checkpoint_ms"] = build_seconds * 1000
        report["file_bytes"] = {"adapter": adapter.stat().st_size, "full_finetuned_model": full_file.stat().st_size}
    if compile:
        log("compiling the hard-routed model (torch.compile, inductor) and timing it")
        report["compile"] = compile_benchmark(factory, rank, batch, img_size, device, repeats)
    report["ratios"] = ratios(report, k_many)
    report["targets"] = {name: {"limit": TARGETS[name], "measured": report["ratios"].get(name),
                                "met": report["ratios"].get(name) is not None and report["ratios"][name] <= TARGETS[name]}
                         for name in TARGETS if name in report["ratios"]}
    return report


def training_benchmark(factory, images, labels, rank: int, experts, k_many: int, repeats: int, quick: bool, device,
                       log) -> dict[str, Any]:
    """Time, memory and FLOPs of one training step per configuration (module docstring)."""
    log("building training configurations")
    cases: dict[str, TrainCase] = {}
    for k in experts:
        model = expert_model(factory, rank, k)
        segmenter = ModalitySegmenter(model, "m0")
        cases[f"experts_hard_k{k}"] = TrainCase(f"experts_hard_k{k}", segmenter, segmenter.trainable_parameters(),
                                                images, labels)
    model = expert_model(factory, rank, 1)
    segmenter = ModalitySegmenter(model, "m0")
    cases["experts_hard_k1_bf16"] = TrainCase("experts_hard_k1_bf16", segmenter, segmenter.trainable_parameters(),
                                              images, labels, precision="bf16")
    model = expert_model(factory, rank, 1)
    set_gradient_checkpointing(model)
    segmenter = ModalitySegmenter(model, "m0")
    cases["experts_hard_k1_checkpointed"] = TrainCase(
        "experts_hard_k1_checkpointed", segmenter, segmenter.trainable_parameters(), images, labels,
        checkpointed_blocks=checkpointed_modules(model))
    soft_model = expert_model(factory, rank, k_many)
    soft_parameters = soft_model.train_only("m0")
    cases[f"experts_soft_k{k_many}"] = TrainCase(
        "soft", _Soft(soft_model, None), soft_parameters, images, labels)
    cases[f"experts_soft_k{k_many}_top2"] = TrainCase("soft_top2", _Soft(soft_model, 2), soft_parameters, images,
                                                      labels)
    expert_config = ExpertConfig(rank=rank)
    lora = BackboneSegmenter(factory(), 2, "lora", expert_config, DecoderConfig())
    cases["peft_lora"] = TrainCase("peft_lora", lora, lora.trainable_parameters(), images, labels)
    full = BackboneSegmenter(factory(), 2, "full", expert_config, DecoderConfig())
    cases["full_finetune"] = TrainCase("full_finetune", full, full.trainable_parameters(), images, labels)
    decoder_only = ModalitySegmenter(expert_model(factory, rank, 1), "m0", mode="decoder")
    cases["decoder_only"] = TrainCase("decoder_only", decoder_only, decoder_only.trainable_parameters(), images,
                                      labels)
    log(f"profiling {len(cases)} training steps (FLOPs, memory; also the warm-up)")
    profiles = {name: case.profile() for name, case in cases.items()}
    log(f"timing them round-robin, {repeats} repeats")
    step_times = median_round_robin({name: case.step for name, case in cases.items()}, repeats, warmup=0)
    peak = matmul_peak_gflops(256 if quick else 2048, device=device)
    training = {}
    for name, case in cases.items():
        profile = profiles[name]
        flops = profile.pop("flops")
        total = sum(p.numel() for p in case.module.parameters())
        trainable = sum(p.numel() for p in case.parameters)
        achieved = flops / step_times[name] / 1e9
        training[name] = {"step_seconds": step_times[name], **profile, "gflop_per_step": flops / 1e9,
                          "achieved_gflops": achieved, "share_of_matmul_peak": achieved / peak,
                          "trainable_parameters": trainable, "trainable_share": trainable / total}
    return {"training": training, "matmul_peak_gflops": peak, "matmul_size": 256 if quick else 2048}


def modality_switch_times(model: SegmentationModel, image: torch.Tensor, rounds: int) -> tuple[float, float]:
    """Median seconds of a batch-1 forward right after switching modality, and of one repeating the modality.

    Each round runs four forwards of one modality, then four that each switch (m0 → m1 → m2 → m3 ...), so a
    "same" forward never follows a switch. The difference is what a switch costs a user (expected: nothing).
    """
    loaded = list(model.modalities)
    switched, repeated = [], []
    with torch.no_grad():
        model(image, loaded[0])
        for round_index in range(rounds):
            for target, name in [(repeated, loaded[0])] * 4 + [(switched, loaded[(i % (len(loaded) - 1)) + 1])
                                                               for i in range(round_index, round_index + 4)]:
                synchronize()
                started = time.perf_counter()
                model.set_modality(name)
                model(image)
                synchronize()
                target.append(time.perf_counter() - started)
            model.set_modality(loaded[0])
            model(image)
    return statistics.median(switched), statistics.median(repeated)


def command_startup_seconds(arguments: list[str] | None, repeats: int = 3) -> float:
    """Median wall seconds of ``m4oe ARGUMENTS`` in a fresh Python process (``None``: ``import torch`` alone)."""
    code = ["-c", "import torch"] if arguments is None else ["-m", "m4oe_adapters.cli", *arguments]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, *code], capture_output=True, check=False)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def compile_benchmark(factory, rank: int, batch: int, img_size: int, device, repeats: int) -> dict[str, Any]:
    """Compile time, latency compiled vs eager (batch ``batch``, hard routing) and recompilations after warm-up
    while switching through four modalities and a mixed batch (goal: 0)."""
    from .compilation import compile_model, recompile_count

    torch._dynamo.reset()
    import copy

    eager = expert_model(factory, rank, 4).eval()
    compiled = copy.deepcopy(eager)  # the same values (expert_model draws B from the global RNG)
    x = torch.randn(batch, 3, img_size, img_size).to(device)
    mixed = [f"m{i % 4}" for i in range(batch)]
    with torch.no_grad():
        compile_model(compiled)
        synchronize()
        started = time.perf_counter()
        compiled(x, "m0")
        synchronize()
        compile_seconds = time.perf_counter() - started
        frames = recompile_count()
        for name in ("m1", "m2", "m3", "m0"):
            compiled(x, name)
        compiled(x, mixed)
        recompiles = recompile_count() - frames
        reference = eager(x, "m2")
        error = ((compiled(x, "m2") - reference).abs().max() / reference.abs().max()).item()
        times = median_round_robin({"eager": lambda: eager(x, "m1"), "compiled": lambda: compiled(x, "m1")},
                                   repeats, warmup=1)
    return {"compile_seconds": compile_seconds, "eager_seconds": times["eager"],
            "compiled_seconds": times["compiled"], "speedup": times["eager"] / times["compiled"],
            "recompiles_after_warmup": recompiles, "max_relative_difference": error}


class _Soft(nn.Module):
    """Soft routing over every loaded expert (gate losses collected, as soft training does)."""

    def __init__(self, model: SegmentationModel, top_k: int | None) -> None:
        super().__init__()
        self.model, self.top_k = model, top_k

    def forward(self, images):
        self.model.routing.collect_aux = True
        logits = self.model(images, "m0", routing="soft", top_k=self.top_k)
        self.model.auxiliary_losses()
        return logits


def ratios(report: dict[str, Any], k: int) -> dict[str, float]:
    """Headline ratios of a report (those of the training steps only when they were measured)."""
    batch = f"batch_{report['setup']['batch']}"
    latency = report["inference_seconds"][batch]
    values = {
        "merged_vs_base_latency": latency["merged"] / latency["frozen_base"],
        "unmerged_vs_base_latency": latency["unmerged_hard"] / latency["frozen_base"],
        "mixed4_vs_single_latency": latency["mixed_4_modalities"] / latency["unmerged_hard"],
        # model(images) without a modality = route, then the forward with the router's choice: the routing time over
        # the mixed forward's. The end-to-end ratio (routed call over the same forward with those modalities
        # given) is also reported; on a shared CPU its noise can exceed the routing work.
        "routed_vs_mixed_latency": 1 + latency["route_only"] / latency["mixed_4_modalities"],
        "routed_vs_mixed_latency_batch_1": 1 + report["inference_seconds"]["batch_1"]["route_only"]
        / report["inference_seconds"]["batch_1"]["mixed_4_modalities"],
        "routed_vs_mixed_latency_end_to_end": latency["routed_4_modalities"] / latency["forward_of_routed"],
        "soft_vs_hard_latency": latency["soft_gate"] / latency["unmerged_hard"],
        "switch_ms": report["switch_ms"],
        **({"compile_speedup": report["compile"]["speedup"],
            "compile_recompiles_after_warmup": report["compile"]["recompiles_after_warmup"]}
           if "compile" in report else {}),
        "adapter_load_ms": report["adapter_load_ms"],
        "file_vs_full": report["file_bytes"]["adapter"] / report["file_bytes"]["full_finetuned_model"],
    }
    if "training" not in report:
        return values
    training = report["training"]
    experts = training[f"experts_hard_k{k}"]
    lora, full = training["peft_lora"], training["full_finetune"]
    plain, bf16 = training["experts_hard_k1"], training["experts_hard_k1_bf16"]
    checkpointed = training["experts_hard_k1_checkpointed"]
    return {
        "experts_k4_vs_lora_time": experts["step_seconds"] / lora["step_seconds"],
        "experts_k4_vs_lora_memory": experts["total_bytes"] / lora["total_bytes"],
        "experts_vs_full_memory": training[f"experts_hard_k{min(report['setup']['experts'])}"]["total_bytes"]
        / full["total_bytes"],
        "lora_vs_full_memory": lora["total_bytes"] / full["total_bytes"],
        "bf16_vs_fp32_time": bf16["step_seconds"] / plain["step_seconds"],
        "bf16_vs_fp32_activations": bf16["saved_activation_bytes"] / plain["saved_activation_bytes"],
        "checkpointed_vs_plain_activations": checkpointed["saved_activation_bytes"] / plain["saved_activation_bytes"],
        "checkpointed_vs_plain_time": checkpointed["step_seconds"] / plain["step_seconds"],
    } | values


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table (what ``m4oe bench`` prints)."""
    setup, machine = report["setup"], report["machine"]
    lines = [f"m4oe bench: {setup['backbone']}, weights: {setup['weights']}, {setup['img_size']} px, "
             f"batch {setup['batch']}, rank {setup['rank']}, median of {setup['repeats']} round-robin repeats, "
             f"{machine['threads']} threads, torch {machine['torch']}"]
    if not setup["weights_given"]:
        lines.append("note: random weights - speed, memory and size do not depend on the values; no accuracy here")
    lines += ["", f"{'training step (AdamW)':<24}{'seconds':>9}{'activ. MB':>11}{'state MB':>10}{'total MB':>10}"
                  f"{'GFLOP':>8}{'GFLOP/s':>9}{'of peak':>9}{'trainable':>11}"]
    if "training" not in report:
        lines.append("(not measured: --skip-training)")
    for name, row in report.get("training", {}).items():
        lines.append(f"{name:<24}{row['step_seconds']:>9.3f}{row['saved_activation_bytes'] / 1e6:>11.1f}"
                     f"{row['state_bytes'] / 1e6:>10.1f}{row['total_bytes'] / 1e6:>10.1f}"
                     f"{row['gflop_per_step']:>8.1f}{row['achieved_gflops']:>9.1f}"
                     f"{row['share_of_matmul_peak'] * 100:>8.0f}%{row['trainable_share'] * 100:>10.2f}%")
    if "training" in report:
        lines.append(f"matmul peak of this machine (torch.mm, {report['matmul_size']}²): "
                     f"{report['matmul_peak_gflops']:.1f} GFLOP/s")
    lines.append("memory = activations autograd saves for backward (exact, each storage once, parameters excluded) + "
                 "state (parameters, gradients, AdamW moments); transient workspace not included")
    lines += ["", f"{'inference seconds':<24}" + "".join(f"{b:>12}" for b in report["inference_seconds"])]
    names = next(iter(report["inference_seconds"].values())).keys()
    for name in names:
        lines.append(f"{name:<24}" + "".join(f"{v[name]:>12.4f}" for v in report["inference_seconds"].values()))
    files = report["file_bytes"]
    detail = report["switch_detail_ms"]
    lines += ["", f"switch modality: {report['switch_ms']:.3f} ms (batch-1 forward right after a switch "
              f"{detail['forward_after_a_switch']:.2f} ms vs same modality {detail['forward_same_modality']:.2f} ms)",
              f"start-up of `m4oe inspect FILE` in a fresh process: {report['inspect_startup_seconds']:.2f} s "
              f"(`python -c 'import torch'` alone: {report['import_torch_seconds']:.2f} s)"]
    if "compile" in report:
        compiled = report["compile"]
        lines.append(f"torch.compile (inductor, hard routing, batch {setup['batch']}): compile "
                     f"{compiled['compile_seconds']:.1f} s, eager {compiled['eager_seconds']:.4f} s vs compiled "
                     f"{compiled['compiled_seconds']:.4f} s (speed-up {compiled['speedup']:.2f}x), "
                     f"{compiled['recompiles_after_warmup']} recompilations while switching through 4 modalities "
                     f"and a mixed batch, max |difference| / max |logit| {compiled['max_relative_difference']:.1e}")
    lines += ["", f"load one adapter file: "
              f"{report['adapter_load_ms']:.1f} ms; build the model from the backbone checkpoint: "
              f"{report['build_from_checkpoint_ms']:.0f} ms",
              f"file per modality: {files['adapter'] / 1e6:.2f} MB vs full fine-tuned model "
              f"{files['full_finetuned_model'] / 1e6:.1f} MB", "", "ratios and targets:"]
    for name, value in report["ratios"].items():
        target = report["targets"].get(name)
        verdict = ("MET " if target["met"] else "MISS") if target else "    "
        limit = f" (target <= {target['limit']:.3g})" if target else ""
        lines.append(f"  {verdict} {name}: {value:.3f}{limit}")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    from .adapter_file import atomic_write

    text = json.dumps(report, indent=2)
    return atomic_write(path, lambda temporary: Path(temporary).write_text(text + "\n"))
