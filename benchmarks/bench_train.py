"""Training step time, throughput, peak memory and a per-phase breakdown: on-the-fly TiTok vs cached codes.

One step is what ``Trainer.train_step`` runs for one micro-batch: ``EarlyFusionObjective.prepare`` (TiTok for
pixel rows, joint ids, MMM masks), the device forward (SigLIP + 0.25 x MMM), backward, fused AdamW. Two batch
shapes (``--shape``):

- ``paired``: the official FuseLIP benchmark's shape (the performance anchor: official code, H100, FuseLIP-S
  bf16, 128 pairs, 147.5 ms/step, 10.35 GiB; B 181 ms, 13.4 GiB): *both* sides hold an image and a 20-40-word
  caption, so a step of B pairs encodes 2B fused image+text sequences and runs TiTok on 2B images;
- ``caption``: rocov2-style pairs, an image (with the empty text, as in training) against a caption of
  20-40 words: about half the paired work.

``pixels`` rows carry [B, 3, 256, 256] images, ``cached`` rows the [B, 128] code ids a code cache serves.
Random weights, nothing downloaded; each configuration runs in a fresh process so that its peak memory is its
own (CUDA: max allocated; CPU: the process's peak RSS). ms/step is the median of the timed steps after
warm-up. The phase columns (median ms of host prepare without TiTok, TiTok, forward, backward, optimizer)
come from extra steps with a device synchronisation after each phase, so they add up to a little more than
ms/step. Rows whose model is ``recipe:<name>`` time ``Trainer.train_step`` of that shipped recipe
instead, its data pipeline included (decoding + TiTok vs the code cache). Prints one markdown table, then
for CUDA rows the encoder-only FLOP floor and the MFU:

    encoder FLOPs/step = sum over both sides of 3 x (2 x P x tokens + 4 x layers x L^2 x width x rows)
    (P = 12 x layers x width^2 transformer weights, tokens = rows x L with L the padded length, forward +
    backward = 3 x forward), floor = FLOPs / peak dense bf16 FLOP/s, MFU = floor / measured. The peak of an
    H100 is 790 TFLOP/s, the dense bf16 matmul rate measured on the project's H100s (not the 989 datasheet).

    python benchmarks/bench_train.py                       # CPU (tiny, small) and CUDA (small, base) if present
    python benchmarks/bench_train.py --device cpu --quick  # the smallest setting (tiny model, a few steps)
    python benchmarks/bench_train.py --device cuda --steps 30 --shape paired
    python benchmarks/bench_train.py --device cpu --configs '[["recipe:rocov2_demo", "fp32", "cached", false, 48]]'
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time
from queue import Empty

import torch

WORDS = ("axial coronal sagittal contrast enhanced computed tomography magnetic resonance image of the chest abdomen "
         "pelvis brain showing a small large mass lesion nodule effusion fracture in the left right upper lower lobe "
         "kidney liver with no evidence of metastasis hemorrhage arrow marks finding").split()
PEAK_BF16 = {"H100": 790e12, "H200": 790e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}
SHAPES = ("paired", "caption")
CPU_CONFIGS = [  # (model, precision, codes, compile, batch); each runs in every --shape
    ("tiny", "fp32", "pixels", False, 8), ("tiny", "fp32", "cached", False, 8),
    ("tiny", "bf16", "pixels", False, 8), ("tiny", "bf16", "cached", False, 8),
    ("tiny", "fp32", "cached", True, 8),
    ("small", "fp32", "pixels", False, 8), ("small", "fp32", "cached", False, 8), ("small", "bf16", "cached", False, 8),
    ("recipe:rocov2_demo", "fp32", "pixels", False, 48), ("recipe:rocov2_demo", "fp32", "cached", False, 48),
]
CUDA_CONFIGS = [(size, "bf16", codes, compiled, 128) for size in ("small", "base")
                for codes in ("cached", "pixels") for compiled in (True, False)]
QUICK_CONFIGS = [("tiny", "fp32", "pixels", False, 4), ("tiny", "fp32", "cached", False, 4)]


def captions(count: int, generator: torch.Generator) -> list[str]:
    """Captions of 20-40 random radiology words (the official benchmark's caption lengths)."""
    lengths = torch.randint(20, 41, (count,), generator=generator).tolist()
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=generator).tolist())
            for n in lengths]


def make_batch(model, batch: int, codes: str, shape: str = "caption"):
    """One training batch of ``batch`` pairs (module doc): ``caption`` = image (+ "") against a caption,
    ``paired`` = image + caption on both sides; images as pixels or as cached code ids."""
    from fuselip_med.data.collate import Batch, BatchSide

    generator = torch.Generator().manual_seed(0)
    ones, zeros = torch.ones(batch, dtype=torch.bool), torch.zeros(batch, dtype=torch.bool)
    cached = codes == "cached"

    def side(texts: list[str], with_image: bool) -> BatchSide:
        if not with_image:
            return BatchSide(text_ids=model.tokenizer(texts), has_image=zeros, has_codes=zeros)
        if cached:
            ids = torch.randint(0, model.config.codebook_size, (batch, 128), generator=generator)
            return BatchSide(text_ids=model.tokenizer(texts), has_image=ones, image_ids=ids, has_codes=ones)
        pixels = torch.rand(batch, 3, 256, 256, generator=generator)
        return BatchSide(text_ids=model.tokenizer(texts), has_image=ones, pixels=pixels, has_codes=zeros)

    paired = shape == "paired"
    query = side(captions(batch, generator) if paired else [""] * batch, True)
    target = side(captions(batch, generator), paired)
    return Batch(query=query, target=target, ids=[str(i) for i in range(batch)], groups=[str(i) for i in range(batch)],
                 sources=["bench"] * batch)


def encoder_flops(model, inputs) -> float:
    """Forward + backward FLOPs of the transformer on the padded sequences of both sides (module doc)."""
    config = model.config
    weights = 12 * config.layers * config.width**2
    total = 0.0
    for side in (inputs.query, inputs.target):
        rows, length = side.ids.shape
        total += 3 * (2 * weights * rows * length + 4 * config.layers * length**2 * config.width * rows)
    return total


class PhaseClock:
    """Median ms per phase over instrumented steps (a device synchronisation closes each phase)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.times: dict[str, list[float]] = {}
        self.last = 0.0

    def start(self) -> None:
        self._sync()
        self.last = time.perf_counter()

    def lap(self, phase: str, subtract: float = 0.0) -> None:
        self._sync()
        now = time.perf_counter()
        self.times.setdefault(phase, []).append((now - self.last - subtract) * 1000)
        self.last = now

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def medians(self) -> dict[str, float]:
        return {phase: statistics.median(values) for phase, values in self.times.items()}


def measure(config: tuple, device: str, warmup: int, steps: int, shape: str, queue) -> None:
    """Run one configuration; put {ms, peak, flops, phases} on the queue."""
    from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
    from fuselip_med.core.losses import MaskingConfig
    from fuselip_med.train.objective import EarlyFusionObjective
    from fuselip_med.train.optim import build_optimizer
    from fuselip_med.train.trainer import enable_fast_matmul

    size, precision, codes, compiled, batch_size = config
    torch.manual_seed(0)
    enable_fast_matmul()
    model = FuseLIP(FuseLIPConfig.from_size(size)).to(device)
    if compiled:
        model.transformer.compile(dynamic=True)
    objective = EarlyFusionObjective(model, MaskingConfig.for_model(model.config)).train()
    optimizer = build_optimizer(model, 1e-4, 0.1)
    batch = make_batch(model, batch_size, codes, shape)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")
    cuda = device == "cuda"
    if cuda:
        batch = batch.pin_memory()
    clock = PhaseClock(cuda)
    titok_ms = [0.0]
    tokenize = model.image_codes

    def timed_tokenize(pixels):
        clock._sync()
        start = time.perf_counter()
        codes_out = tokenize(pixels)
        clock._sync()
        titok_ms[0] += time.perf_counter() - start
        return codes_out

    def step(number: int, phases: bool = False):
        if phases:
            titok_ms[0] = 0.0
            model.image_codes = timed_tokenize
            clock.start()
        with autocast:
            inputs = objective.prepare(batch, number).to(device, non_blocking=True)
        if phases:
            clock.lap("prepare", subtract=titok_ms[0])
            clock.times.setdefault("TiTok", []).append(titok_ms[0] * 1000)
            del model.image_codes
        with autocast:
            out = objective(inputs)
        if phases:
            clock.lap("forward")
        out.total.backward()
        if phases:
            clock.lap("backward")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if phases:
            clock.lap("optimizer")
        return inputs

    for number in range(warmup):
        step(number)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for number in range(steps):
        start = time.perf_counter()
        inputs = step(warmup + number)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    for number in range(max(2, steps // 2)):
        step(warmup + steps + number, phases=True)
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    queue.put({"ms": statistics.median(times) * 1000, "peak": peak / 2**20, "flops": encoder_flops(model, inputs),
               "phases": clock.medians()})


def measure_recipe(config: tuple, device: str, warmup: int, steps: int, shape: str, queue) -> None:
    """Time ``Trainer.train_step`` of a shipped recipe (its data pipeline included: decoding and TiTok for
    ``pixels``, the code cache for ``cached``, built before timing; the recipe's own batches, whatever
    ``shape``); put {ms, peak, flops, phases} on the queue."""
    import io
    import tempfile

    from rich.console import Console

    from fuselip_med.recipes import load_recipe
    from fuselip_med.train.trainer import Trainer

    name, codes = config[0].split(":", 1)[1], config[2]
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(name, [
            f"train.steps={warmup + steps}", f"train.image_codes={'cache' if codes == 'cached' else 'pixels'}",
            f"train.code_cache={tmp}/codes", "eval.at_start=false", "eval.at_end=false", "data.eval=[]",
            "checkpoint.every_steps=null", "logging.progress=false", f"output.dir={tmp}/run"])
        trainer = Trainer(recipe, console=Console(file=io.StringIO()))  # the table is this script's only output
        trainer.setup()
        trainer.iterator = iter(trainer.data.loader)
        times = []
        with trainer.out.progress() as trainer.bar:
            trainer.bar_task = trainer.bar.add_task("train", total=warmup + steps, loss=0.0, lr=0.0, rate=0.0)
            for number in range(warmup + steps):
                start = time.perf_counter()
                trainer.train_step()
                trainer.flush()  # reads the loss: the step is finished on the device too
                times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    queue.put({"ms": statistics.median(times[warmup:]) * 1000, "peak": peak / 2**20, "flops": 0.0, "phases": {}})


def peak_flops() -> tuple[float | None, str]:
    """Dense bf16 peak FLOP/s of the visible GPU (None when unknown) and its name."""
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16.items():
        if key in name:
            return flops, name
    return None, name


PHASES = ("prepare", "TiTok", "forward", "backward", "optimizer")


def receive(queue, process, config: tuple) -> dict:
    """The measuring process's result; exits with its exit code when it died first (its error is above)."""
    while True:
        try:
            return queue.get(timeout=5)
        except Empty:
            if not process.is_alive():
                raise SystemExit(f"{list(config)}: the measuring process failed (exit {process.exitcode})") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="all = CPU and, when present, CUDA")
    parser.add_argument("--shape", choices=[*SHAPES, "both"], default="both",
                        help="paired = image+caption on both sides (the official benchmark), caption = image vs "
                             "caption (rocov2), both (default)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 on CPU, 30 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 2 on CPU, 10 on CUDA)")
    parser.add_argument("--quick", action="store_true", help="the smallest setting: tiny model, batch 4, CPU")
    parser.add_argument("--configs", default=None, help="JSON list of [model, precision, codes, compile, batch]")
    args = parser.parse_args()

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    if args.device == "cuda" and not devices:
        parser.error("--device cuda: no CUDA device is visible")
    shapes = SHAPES if args.shape == "both" else (args.shape,)
    context = mp.get_context("spawn")
    print("| device | model | shape | precision | codes | compile | batch | ms/step | pairs/s | peak MiB | "
          + " | ".join(f"{phase} ms" for phase in PHASES) + " | MFU |")
    print("|---|---|---|---|---|---|---:|---:|---:|---:|" + "---:|" * (len(PHASES) + 1))
    floors = []
    for device in devices:
        if args.configs:
            configs = [tuple(c) for c in json.loads(args.configs)]
        elif args.quick:
            configs = QUICK_CONFIGS
        else:
            configs = CPU_CONFIGS if device == "cpu" else CUDA_CONFIGS
        warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2 if device == "cpu" else 10)
        steps = args.steps if args.steps is not None else (2 if args.quick else 5 if device == "cpu" else 30)
        peak, name = peak_flops() if device == "cuda" else (None, "cpu")
        for shape in shapes:
            for config in configs:
                if config[0].startswith("recipe:") and shape != shapes[0]:
                    continue  # a recipe row times the recipe's own batches: once
                queue = context.Queue()
                target = measure_recipe if config[0].startswith("recipe:") else measure
                process = context.Process(target=target, args=(config, device, warmup, steps, shape, queue))
                process.start()
                result = receive(queue, process, config)
                process.join()
                size, precision, codes, compiled, batch = config
                phases = " | ".join(f"{result['phases'][p]:.1f}" if p in result["phases"] else "-" for p in PHASES)
                mfu = "-"
                if peak is not None and result["flops"]:
                    mfu = f"{result['flops'] / peak / (result['ms'] / 1000):.1%}"
                row_shape = "recipe" if size.startswith("recipe:") else shape
                print(f"| {device} | {size} | {row_shape} | {precision} | {codes} | {'on' if compiled else 'off'} | "
                      f"{batch} | {result['ms']:.1f} | {batch / result['ms'] * 1000:.1f} | {result['peak']:.0f} | "
                      f"{phases} | {mfu} |", flush=True)
                if device == "cuda" and result["flops"]:
                    floors.append((config, shape, result))
    if floors:
        peak, name = peak_flops()
        print()
        for (size, precision, codes, compiled, batch), shape, result in floors:
            label = f"{size} {shape} {precision} {codes} compile {'on' if compiled else 'off'} batch {batch}"
            if peak is None:
                print(f"{label}: encoder {result['flops'] / 1e12:.2f} TFLOP/step ({name}: peak unknown, no MFU)")
                continue
            floor_ms = result["flops"] / peak * 1000
            print(f"{label}: encoder-only FLOP floor {floor_ms:.1f} ms ({result['flops'] / 1e12:.2f} TFLOP at "
                  f"{peak / 1e12:.0f} TFLOP/s bf16, {name}), MFU {floor_ms / result['ms']:.1%}")


if __name__ == "__main__":
    main()
