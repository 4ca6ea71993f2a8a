"""The training loop on Accelerate: one process, several GPUs or several machines, same code.

Each optimizer step: set the scheduled learning rate, run ``grad_accum`` micro-batches through the
``FuseLIPObjective`` (sigmoid + MMM loss), skip the step if the loss is not finite, clip, step, clamp the
logit scale. Evaluation, checkpoints and logging happen on the main process at their cadences. Everything
random in a step derives from (seed, step), so a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import collections
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fuselip_med.core.checkpoints import build_model, save_pretrained
from fuselip_med.core.losses import MaskingConfig, clamp_logit_scale
from fuselip_med.data.adapters import DatasetEmptyError
from fuselip_med.data.collate import SkipCounter
from fuselip_med.recipes import Recipe, recipe_to_yaml
from fuselip_med.train import checkpointing as ckpt
from fuselip_med.train.data import DataSetupError, TrainData, build_source, build_train_data, seed_everything
from fuselip_med.train.image_codes import attach_image_codes
from fuselip_med.train.lora import adapter_parameter_count, apply_lora, save_adapter
from fuselip_med.train.model_card import write_model_card
from fuselip_med.train.objective import FuseLIPObjective
from fuselip_med.train.optim import WarmupCosine, build_optimizer, set_learning_rate
from fuselip_med.train.tracking import build_trackers

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class TrainingStopped(RuntimeError):
    """Training ended early for a reason the user must act on (e.g. the loss kept diverging)."""


@dataclass
class TrainResult:
    """What a run produced: where, how far, and the evaluation before and after."""

    run_dir: Path
    final_dir: Path | None
    steps: int
    losses: list[float] = field(default_factory=list)
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False


def flatten_metrics(report: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """metrics.json content -> flat {"eval/<task>/<metric>": value} for trackers and summaries."""
    flat = {}
    for task, result in report.get("tasks", {}).items():
        for name, value in (result.get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{prefix}/{task}/{name}"] = float(value)
    return flat


class Trainer:
    """Runs a recipe: builds data and model, trains, evaluates, checkpoints, and saves the final model."""

    def __init__(self, recipe: Recipe, *, resume: str | bool | None = None, from_scratch: bool = False,
                 console: Console | None = None):
        self.recipe = recipe
        self.resume = resume
        self.from_scratch = from_scratch
        self.console = console or Console()
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=False)]
        # cpu=True on machines without CUDA lets `accelerate launch --multi_gpu`/torchrun run several gloo
        # processes there (Accelerate's own --cpu launcher needs MPI for more than one process).
        self.accelerator = Accelerator(mixed_precision=PRECISION[recipe.train.precision], kwargs_handlers=handlers,
                                       cpu=not torch.cuda.is_available())
        self.run_dir = recipe.run_dir()
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.skips = SkipCounter()
        self.bad_steps_total = 0

    # ------------------------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        if self.accelerator.is_main_process:
            self.console.print(message, highlight=False)

    def _build_model(self):
        recipe = self.recipe
        init = None if self.from_scratch else recipe.model.init
        seed_everything(recipe.train.seed)
        model = build_model(recipe.model.size, init=init)
        lora = recipe.model.lora
        if lora.enabled:
            model = apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.targets, lora.train_logit_params)
        return model, init

    def _eval_data(self) -> dict[str, Any]:
        data = {}
        for spec in self.recipe.data.eval:
            data[spec.id or f"{spec.name}_{spec.split}"] = build_source(self.recipe, spec)
        return data

    def evaluate(self, objective: FuseLIPObjective, data: dict[str, Any], step: int, tag: str) -> dict[str, float]:
        """Run the recipe's eval tasks on the main process; other processes wait."""
        from fuselip_med.eval.runner import run_evaluation

        metrics: dict[str, float] = {}
        if self.accelerator.is_main_process and data:
            fuselip = _unwrap_fuselip(objective)
            was_training = fuselip.training
            fuselip.eval()
            report = run_evaluation(
                fuselip, self.recipe.eval.tasks, data, self.run_dir / "eval" / tag,
                seed=self.recipe.train.seed, pool_size=self.recipe.eval.pool_size, n_pools=self.recipe.eval.n_pools,
                batch_size=self.recipe.eval.batch_size, progress=False, model_id=f"{self.recipe.name}@{step}",
            )
            fuselip.train(was_training)
            metrics = flatten_metrics(report)
        self.accelerator.wait_for_everyone()
        return metrics

    # ------------------------------------------------------------------------------------------------
    def _save_checkpoint(self, objective, optimizer, data: TrainData, step: int, batches_done: int, extra: dict) -> Path | None:
        acc = self.accelerator
        tmp = ckpt.temporary_dir(self.checkpoint_dir, step)
        if acc.is_main_process:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        acc.wait_for_everyone()
        ckpt.write_process_files(tmp, acc.process_index)
        acc.wait_for_everyone()
        final = None
        if acc.is_main_process:
            state = {
                "step": step,
                "sampler": data.sampler.state_dict(batches_done=batches_done),
                "bad_steps_total": self.bad_steps_total,
                "skips": self.skips.as_dict(),
                "world_size": acc.num_processes,
                **extra,
            }
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            unwrapped = acc.unwrap_model(objective)
            ckpt.write_main_files(tmp, unwrapped.model.state_dict(), optimizer.state_dict(), scaler, state,
                                  recipe_to_yaml(self.recipe), unwrapped.fuselip.config.to_dict())
            final = ckpt.commit(tmp, self.checkpoint_dir, step)
            ckpt.prune(self.checkpoint_dir, self.recipe.checkpoint.keep_last)
        acc.wait_for_everyone()
        return final

    def _move_previous_run_aside(self) -> None:
        """A new run in a directory that already holds one keeps the old one, renamed, instead of mixing them."""
        if self.run_dir.is_dir() and any(self.run_dir.iterdir()):
            aside = self.run_dir.with_name(f"{self.run_dir.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
            self.run_dir.rename(aside)
            self.say(f"{self.run_dir} held an earlier run; moved it to {aside} (use --resume to continue a run).")

    def _resume_path(self) -> Path | None:
        if not self.resume:
            return None
        if isinstance(self.resume, str) and self.resume not in ("auto", "latest"):
            path = Path(self.resume)
            if (path / "trainer_state.json").is_file():
                return path
            found = ckpt.latest_checkpoint(path / "checkpoints") or ckpt.latest_checkpoint(path)
            if found is None:
                raise DataSetupError(f"--resume {path}: no complete checkpoint there.")
            return found
        found = ckpt.latest_checkpoint(self.checkpoint_dir)
        if found is None:
            self.say(f"[yellow]No checkpoint under {self.checkpoint_dir}; starting from the beginning.[/]")
        return found

    # ------------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        recipe, acc = self.recipe, self.accelerator
        try:
            data = build_train_data(recipe, _tokenizer(), acc.process_index, acc.num_processes, pin_memory=acc.device.type == "cuda")
            eval_data = self._eval_data()
        except (DatasetEmptyError, FileNotFoundError) as error:
            raise DataSetupError(str(error)) from None
        resume_from = self._resume_path()
        if acc.is_main_process:
            if resume_from is None:
                self._move_previous_run_aside()
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(self.checkpoint_dir)
        acc.wait_for_everyone()
        model, init = self._build_model()
        masking = MaskingConfig.for_model(_fuselip_of(model).config, probability=recipe.train.mlm_probability)
        objective = FuseLIPObjective(model, masking, recipe.train.mmm_weight, recipe.train.seed)
        optimizer = build_optimizer(objective.model, recipe.train.lr, recipe.train.weight_decay, recipe.train.betas,
                                    recipe.train.eps, recipe.train.decay_embeddings)
        objective, optimizer = acc.prepare(objective, optimizer)
        attach_image_codes(data, recipe, _unwrap_fuselip(objective), rank=acc.process_index,
                           world=acc.num_processes, barrier=acc.wait_for_everyone, say=self.say)
        accum = recipe.train.grad_accum
        per_epoch = data.sampler.batches_per_epoch()
        total_steps = recipe.train.steps or max(1, math.ceil(recipe.train.epochs * per_epoch / accum))
        schedule = WarmupCosine(recipe.train.lr, recipe.train.warmup_steps, total_steps, recipe.train.min_lr)

        step, batches_done, result_losses = 0, 0, []
        if resume_from is not None:
            step, batches_done = self._load_checkpoint(resume_from, objective, optimizer, data)
            self.say(f"Resumed from {resume_from} at step {step}.")
        else:
            data.set_epoch(0)

        trackers = None
        if acc.is_main_process:
            trackers = build_trackers(recipe.logging.trackers, recipe.log_dir(), project=recipe.logging.wandb_project,
                                      run_name=recipe.name, config=recipe.model_dump(mode="json"),
                                      wandb_mode=recipe.logging.wandb_mode, say=self.say)
        self._print_plan(data, objective, total_steps, init, resume_from)
        eval_before: dict[str, float] = {}
        if recipe.eval.at_start and resume_from is None and eval_data:
            eval_before = self.evaluate(objective, eval_data, step, "start")
            if trackers:
                trackers.log(eval_before, step)
            self._print_metrics("Before training", eval_before)

        interrupted = False
        previous_handler = _install_sigterm_as_interrupt()
        iterator = iter(data.loader)
        consecutive_bad = 0
        started = time.perf_counter()
        samples_seen = 0
        progress = self._progress(total_steps, step)
        try:
            with progress:
                task = progress.add_task("train", total=total_steps, completed=step, loss=float("nan"), lr=0.0, rate=0.0)
                while step < total_steps:
                    lr = schedule(step)
                    set_learning_rate(optimizer, lr)
                    objective.train()
                    totals = collections.defaultdict(float)
                    finite = True
                    for micro in range(accum):
                        batch, iterator, batches_done = self._next_batch(data, iterator, batches_done)
                        self.skips.update(batch)
                        samples_seen += len(batch) * acc.num_processes
                        inputs = acc.unwrap_model(objective).prepare(batch, step * accum + micro)
                        inputs = inputs.to(acc.device, non_blocking=True)
                        sync = acc.no_sync(objective) if micro < accum - 1 else _nullcontext()
                        with sync, acc.autocast():
                            out = objective(inputs)
                        loss = out.total / accum
                        finite = finite and _all_finite(loss)
                        if finite:
                            acc.backward(loss)
                        for name in ("total", "contrastive", "mmm"):
                            totals[name] += float(acc.reduce(getattr(out, name).detach(), "mean")) / accum
                    if not finite:
                        optimizer.zero_grad(set_to_none=True)
                        consecutive_bad += 1
                        self.bad_steps_total += 1
                        self.say(f"[yellow]step {step}: non-finite loss, step skipped ({consecutive_bad} in a row).[/]")
                        if consecutive_bad >= recipe.train.max_bad_steps:
                            raise TrainingStopped(
                                f"The loss was not finite for {consecutive_bad} steps in a row (at step {step}); training "
                                f"stopped. The last good checkpoint in {self.checkpoint_dir} is intact: lower train.lr or "
                                "use precision fp32/bf16, then --resume."
                            )
                        continue
                    consecutive_bad = 0
                    if recipe.train.grad_clip is not None:
                        acc.clip_grad_norm_(objective.parameters(), recipe.train.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    clamp_logit_scale(_unwrap_fuselip(objective).logit_scale, recipe.train.max_logit_scale)
                    step += 1
                    result_losses.append(totals["total"])
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    rate = samples_seen / elapsed
                    progress.update(task, completed=step, loss=totals["total"], lr=lr, rate=rate)
                    if trackers and (step % recipe.train.log_every == 0 or step == total_steps):
                        trackers.log({"train/loss": totals["total"], "train/contrastive": totals["contrastive"],
                                      "train/mmm": totals["mmm"], "train/lr": lr, "train/samples_per_s": rate,
                                      "train/logit_scale": float(_unwrap_fuselip(objective).logit_scale.detach().exp()),
                                      "train/epoch": data.sampler.epoch}, step)
                    if recipe.eval.every_steps and step % recipe.eval.every_steps == 0 and step < total_steps and eval_data:
                        metrics = self.evaluate(objective, eval_data, step, f"step_{step:06d}")
                        if trackers:
                            trackers.log(metrics, step)
                    if recipe.checkpoint.every_steps and step % recipe.checkpoint.every_steps == 0:
                        self._save_checkpoint(objective, optimizer, data, step, batches_done, {"losses_tail": result_losses[-10:]})
        except KeyboardInterrupt:
            interrupted = True
            self.say("[yellow]Interrupted: writing a checkpoint before exiting...[/]")
            path = self._save_checkpoint(objective, optimizer, data, step, batches_done, {"interrupted": True})
            self.say(f"Checkpoint written: {path}. Continue with --resume.")
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            if self.skips.total:
                self.say(f"Skipped samples: {self.skips.summary()}")

        final_dir, eval_after = None, {}
        if not interrupted:
            if recipe.checkpoint.every_steps:
                self._save_checkpoint(objective, optimizer, data, step, batches_done, {"final": True})
            if recipe.eval.at_end and eval_data:
                eval_after = self.evaluate(objective, eval_data, step, "final")
                if trackers:
                    trackers.log(eval_after, step)
            final_dir = self._save_final(objective, init, eval_before, eval_after, step)
        if trackers:
            trackers.close()
        result = TrainResult(self.run_dir, final_dir, step, result_losses, eval_before, eval_after, interrupted)
        self._print_summary(result, time.perf_counter() - started, samples_seen, data)
        return result

    # ------------------------------------------------------------------------------------------------
    def _next_batch(self, data: TrainData, iterator, batches_done: int):
        """The next batch; at the end of an epoch the next epoch starts (new shuffle and crops)."""
        while True:
            try:
                return next(iterator), iterator, batches_done + 1
            except StopIteration:
                if self.skips.total:
                    self.say(f"End of epoch {data.sampler.epoch}: skipped samples so far: {self.skips.summary()}")
                data.set_epoch(data.sampler.epoch + 1)
                iterator, batches_done = iter(data.loader), 0

    def _load_checkpoint(self, path: Path, objective, optimizer, data: TrainData) -> tuple[int, int]:
        acc = self.accelerator
        loaded = ckpt.read_checkpoint(path, acc.process_index)
        state = loaded["trainer_state"]
        if state.get("world_size", acc.num_processes) != acc.num_processes:
            self.say(f"[yellow]Checkpoint was written with {state['world_size']} processes; resuming with "
                     f"{acc.num_processes} (same global batches, RNG of rank 0 reused).[/]")
        acc.unwrap_model(objective).model.load_state_dict(loaded["model"], strict=True)
        optimizer.load_state_dict(loaded["optimizer"])
        if loaded["scaler"] is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(loaded["scaler"])
        rng = loaded["rng"] or ckpt.read_checkpoint(path, 0)["rng"]
        if rng is not None:
            ckpt.restore_rng_state(rng)
        sampler_state = state["sampler"]
        data.sampler.load_state_dict(sampler_state)
        data.mixture.set_epoch(sampler_state["epoch"])
        self.bad_steps_total = int(state.get("bad_steps_total", 0))
        return int(state["step"]), int(sampler_state["batches_done"])

    def _save_final(self, objective, init: str | None, before: dict, after: dict, step: int) -> Path | None:
        acc = self.accelerator
        final_dir = self.run_dir / "final"
        if acc.is_main_process:
            model = acc.unwrap_model(objective).model
            if self.recipe.model.lora.enabled:
                save_adapter(model, final_dir, init)
            else:
                save_pretrained(model, final_dir)
            write_model_card(final_dir, self.recipe, init, step, before, after)
        acc.wait_for_everyone()
        return final_dir

    # ------------------------------------------------------------------------------------------------
    def _progress(self, total: int, start: int) -> Progress:
        enabled = self.accelerator.is_main_process and self.recipe.logging.progress
        return Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("lr {task.fields[lr]:.2e}"),
            TextColumn("{task.fields[rate]:.1f} samples/s"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, disable=not enabled, transient=False,
        )

    def _print_plan(self, data: TrainData, objective, total_steps: int, init: str | None, resume_from) -> None:
        if not self.accelerator.is_main_process:
            return
        recipe = self.recipe
        model = self.accelerator.unwrap_model(objective).model
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        table = Table(title=f"fuselip-med: {recipe.name}", show_header=False)
        table.add_row("model", f"{recipe.model.size} from {init or 'scratch'}"
                      + (f" + LoRA r={recipe.model.lora.r} ({adapter_parameter_count(model):,} adapter weights)" if recipe.model.lora.enabled else ""))
        table.add_row("trainable parameters", f"{trainable:,}")
        for label, size, weight in data.describe():
            table.add_row(f"data: {label}", f"{size:,} samples, weight {weight:g}")
        if data.load_skips:
            table.add_row("skipped while loading", ", ".join(f"{k}: {v}" for k, v in data.load_skips.items()))
        table.add_row("steps", f"{total_steps:,} ({data.sampler.batches_per_epoch():,} batches per epoch, global batch "
                      f"{recipe.train.batch_size} x accumulation {recipe.train.grad_accum})")
        table.add_row("optimisation", f"AdamW lr {recipe.train.lr:g}, wd {recipe.train.weight_decay:g}, warmup "
                      f"{recipe.train.warmup_steps}, {recipe.train.precision}, {self.accelerator.num_processes} process(es) on {self.accelerator.device}")
        table.add_row("run directory", str(self.run_dir) + (f" (resuming {resume_from})" if resume_from else ""))
        self.console.print(table)

    def _print_metrics(self, title: str, metrics: dict[str, float]) -> None:
        if not self.accelerator.is_main_process or not metrics:
            return
        table = Table(title=title)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in metrics.items():
            table.add_row(key.removeprefix("eval/"), f"{value:.4f}")
        self.console.print(table)

    def _print_summary(self, result: TrainResult, seconds: float, samples: int, data: TrainData) -> None:
        if not self.accelerator.is_main_process:
            return
        table = Table(title="Summary", show_header=False)
        table.add_row("steps", str(result.steps) + (" (interrupted)" if result.interrupted else ""))
        table.add_row("time", f"{seconds:.1f} s ({samples / max(seconds, 1e-9):.1f} samples/s)")
        if result.losses:
            table.add_row("loss first -> last", f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
        table.add_row("skipped steps (non-finite loss)", str(self.bad_steps_total))
        table.add_row("skipped samples", self.skips.summary() if self.skips.total else "0")
        for key in sorted(set(result.eval_before) | set(result.eval_after)):
            if key.split("/")[-1] in SUMMARY_METRICS:
                before = result.eval_before.get(key)
                after = result.eval_after.get(key)
                table.add_row(key.removeprefix("eval/"), f"{_fmt(before)} -> {_fmt(after)}")
        table.add_row("final model", str(result.final_dir) if result.final_dir else "not written")
        table.add_row("checkpoints", str(self.checkpoint_dir))
        self.console.print(table)


SUMMARY_METRICS = {"image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10", "text_to_image_R@1",
                   "text_to_image_R@5", "text_to_image_R@10", "accuracy", "macro_f1", "mean"}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _all_finite(loss: torch.Tensor) -> bool:
    """True on every process only if the loss is finite on every process (so all skip together)."""
    flag = torch.tensor(float(torch.isfinite(loss.detach()).all()), device=loss.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _install_sigterm_as_interrupt():
    """Treat SIGTERM (cluster pre-emption, docker stop) like Ctrl-C: checkpoint, then exit."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        return signal.getsignal(signal.SIGTERM)


def _fuselip_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _unwrap_fuselip(objective):
    return (objective.module if hasattr(objective, "module") else objective).fuselip


def _tokenizer():
    from fuselip_med.core.text_tokenizer import TextTokenizer

    return TextTokenizer()
