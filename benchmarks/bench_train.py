"""Training step time, throughput and peak memory: on-the-fly TiTok (pixels) vs cached image codes.

One step is what ``Trainer.train_step`` runs for one micro-batch: ``EarlyFusionObjective.prepare`` on the host
(TiTok for pixel rows, joint ids, MMM masks), the device forward (SigLIP + 0.25 x MMM), backward, fused
AdamW. Batches are rocov2-style pairs: an image (with the empty text, as in training) against a caption of
20-40 words; ``pixels`` rows carry [B, 3, 256, 256] images, ``cached`` rows the [B, 128] code ids a code cache
serves. Random weights, nothing downloaded; each configuration runs in a fresh process so that its peak
memory is its own (CUDA: max allocated; CPU: the process's peak RSS). ms/step is the median of the timed
steps after warm-up. Rows whose model is ``recipe:<name>`` time ``Trainer.train_step`` of that shipped recipe
instead, its data pipeline included (decoding + TiTok vs the code cache). Prints one markdown table, then
for CUDA rows the encoder-only FLOP floor and the MFU:

    encoder FLOPs/step = sum over both sides of 3 x (2 x P x tokens + 4 x layers x L^2 x width x rows)
    (P = 12 x layers x width^2 transformer weights, tokens = rows x L with L the padded length, forward +
    backward = 3 x forward), floor = FLOPs / peak dense bf16 FLOP/s of the GPU, MFU = floor / measured.

    python benchmarks/bench_train.py                       # CPU (tiny, small) and CUDA (small, base) if present
    python benchmarks/bench_train.py --device cpu --quick  # the smallest setting (tiny model, a few steps)
    python benchmarks/bench_train.py --device cuda --steps 30
    python benchmarks/bench_train.py --device cpu --configs '[["recipe:rocov2_demo", "fp32", "cached", false, 48]]'
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time

import torch

WORDS = ("axial coronal sagittal contrast enhanced computed tomography magnetic resonance image of the chest abdomen "
         "pelvis brain showing a small large mass lesion nodule effusion fracture in the left right upper lower lobe "
         "kidney liver with no evidence of metastasis hemorrhage arrow marks finding").split()
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}
CPU_CONFIGS = [  # (model, precision, codes, compile, batch)
    ("tiny", "fp32", "pixels", False, 8), ("tiny", "fp32", "cached", False, 8),
    ("tiny", "bf16", "pixels", False, 8), ("tiny", "bf16", "cached", False, 8),
    ("tiny", "fp32", "cached", True, 8),
    ("small", "fp32", "pixels", False, 8), ("small", "fp32", "cached", False, 8), ("small", "bf16", "cached", False, 8),
    ("recipe:rocov2_demo", "fp32", "pixels", False, 48), ("recipe:rocov2_demo", "fp32", "cached", False, 48),
]
CUDA_CONFIGS = [(size, precision, codes, compiled, 128) for size in ("small", "base")
                for precision in ("bf16", "fp32") for codes in ("pixels", "cached") for compiled in (False, True)
                if precision == "bf16" or not compiled]
QUICK_CONFIGS = [("tiny", "fp32", "pixels", False, 4), ("tiny", "fp32", "cached", False, 4)]


def captions(count: int, generator: torch.Generator) -> list[str]:
    """Captions of 20-40 random radiology words (the official benchmark's caption lengths)."""
    lengths = torch.randint(20, 41, (count,), generator=generator).tolist()
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=generator).tolist())
            for n in lengths]


def make_batch(model, batch: int, codes: str):
    """A rocov2-style training batch: query = image (+ ""), target = caption; pixels or cached code ids."""
    from fuselip_med.data.collate import Batch, BatchSide

    generator = torch.Generator().manual_seed(0)
    ones, zeros = torch.ones(batch, dtype=torch.bool), torch.zeros(batch, dtype=torch.bool)
    cached = codes == "cached"
    image_ids = torch.randint(0, model.config.codebook_size, (batch, 128), generator=generator)
    query = BatchSide(text_ids=model.tokenizer([""] * batch), has_image=ones,
                      pixels=None if cached else torch.rand(batch, 3, 256, 256, generator=generator),
                      image_ids=image_ids if cached else None, has_codes=ones if cached else zeros)
    target = BatchSide(text_ids=model.tokenizer(captions(batch, generator)), has_image=zeros, has_codes=zeros)
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


def measure(config: tuple, device: str, warmup: int, steps: int, queue) -> None:
    """Run one configuration; put {ms, peak, flops} on the queue."""
    from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
    from fuselip_med.core.losses import MaskingConfig
    from fuselip_med.train.objective import EarlyFusionObjective
    from fuselip_med.train.optim import build_optimizer

    size, precision, codes, compiled, batch_size = config
    torch.manual_seed(0)
    model = FuseLIP(FuseLIPConfig.from_size(size)).to(device)
    if compiled:
        model.transformer.compile(dynamic=True)
    objective = EarlyFusionObjective(model, MaskingConfig.for_model(model.config)).train()
    optimizer = build_optimizer(model, 1e-4, 0.1)
    batch = make_batch(model, batch_size, codes)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")
    cuda = device == "cuda"
    if cuda:
        batch = batch.pin_memory()

    def step(number: int):
        inputs = objective.prepare(batch, number).to(device, non_blocking=True)
        with autocast:
            out = objective(inputs)
        out.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
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
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    queue.put({"ms": statistics.median(times) * 1000, "peak": peak / 2**20, "flops": encoder_flops(model, inputs)})


def measure_recipe(config: tuple, device: str, warmup: int, steps: int, queue) -> None:
    """Time ``Trainer.train_step`` of a shipped recipe (its data pipeline included: decoding and TiTok for
    ``pixels``, the code cache for ``cached``, built before timing); put {ms, peak, flops} on the queue."""
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
    queue.put({"ms": statistics.median(times[warmup:]) * 1000, "peak": peak / 2**20, "flops": 0.0})


def peak_flops() -> tuple[float | None, str]:
    """Dense bf16 peak FLOP/s of the visible GPU (None when unknown) and its name."""
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16.items():
        if key in name:
            return flops, name
    return None, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="all = CPU and, when present, CUDA")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 on CPU, 30 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 2 on CPU, 10 on CUDA)")
    parser.add_argument("--quick", action="store_true", help="the smallest setting: tiny model, batch 4, CPU")
    parser.add_argument("--configs", default=None, help="JSON list of [model, precision, codes, compile, batch]")
    args = parser.parse_args()

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    if args.device == "cuda" and not devices:
        parser.error("--device cuda: no CUDA device is visible")
    context = mp.get_context("spawn")
    print("| device | model | precision | codes | compile | batch | ms/step | pairs/s | peak MiB |")
    print("|---|---|---|---|---|---:|---:|---:|---:|")
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
        for config in configs:
            queue = context.Queue()
            target = measure_recipe if config[0].startswith("recipe:") else measure
            process = context.Process(target=target, args=(config, device, warmup, steps, queue))
            process.start()
            result = queue.get()
            process.join()
            size, precision, codes, compiled, batch = config
            print(f"| {device} | {size} | {precision} | {codes} | {'on' if compiled else 'off'} | {batch} | "
                  f"{result['ms']:.1f} | {batch / result['ms'] * 1000:.1f} | {result['peak']:.0f} |", flush=True)
            if device == "cuda" and result["flops"]:
                floors.append((config, result))
    if floors:
        peak, name = peak_flops()
        print()
        for (size, precision, codes, compiled, batch), result in floors:
            label = f"{size} {precision} {codes} compile {'on' if compiled else 'off'} batch {batch}"
            if peak is None:
                print(f"{label}: encoder {result['flops'] / 1e12:.2f} TFLOP/step ({name}: peak unknown, no MFU)")
                continue
            floor_ms = result["flops"] / peak * 1000
            print(f"{label}: encoder-only FLOP floor {floor_ms:.1f} ms ({result['flops'] / 1e12:.2f} TFLOP at "
                  f"{peak / 1e12:.0f} TFLOP/s bf16, {name}), MFU {floor_ms / result['ms']:.1%}")


if __name__ == "__main__":
    main()
