"""The training loop on Accelerate: one process, several GPUs or several machines, same code.

``run`` = ``setup`` -> ``train_step`` until the step budget -> hooks after each step (``log``, ``evaluate``,
``save_checkpoint`` at their cadences) -> final checkpoint, evaluation and model. A step sets the scheduled
learning rate, runs ``grad_accum`` micro-batches through the objective ``model.arch`` picks once
(``train.objective.create_objective``: host ``prepare``, device ``forward``) under ``accelerator.accumulate``,
clips, and steps a fused AdamW that skips the update on the device if the loss or the gradients were not finite
anywhere (one decision, ``skip_non_finite_step``, which the fp16 GradScaler shares). Nothing in a step reads a
device value on the host: loss values and non-finite flags are kept on the device and read at the
logging/eval/checkpoint cadence (``flush``), where skipped steps are reported and too many in a row stop the
run. Everything random in a step derives from (seed, step), so a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed
from rich.console import Console

from fuselip_med.core.distributed import any_rank
from fuselip_med.core.loading import build_model
from fuselip_med.core.lora import adapter_parameter_count, apply_lora, save_adapter
from fuselip_med.core.losses import clamp_logit_scale
from fuselip_med.core.pretrained import save_pretrained
from fuselip_med.data.adapters import DatasetEmptyError
from fuselip_med.data.collate import SkipCounter
from fuselip_med.errors import UserError
from fuselip_med.eval.report import flatten_metrics
from fuselip_med.recipes import Recipe, recipe_to_yaml
from fuselip_med.train import checkpointing as ckpt
from fuselip_med.train.console import TrainConsole, plan_rows
from fuselip_med.train.data import DataSetupError, build_eval_sources, build_train_data, decode_options
from fuselip_med.train.image_codes import attach_image_codes
from fuselip_med.train.model_card import write_model_card
from fuselip_med.train.objective import Objective, create_objective, objective_class
from fuselip_med.train.optim import WarmupCosine, build_optimizer, set_learning_rate, skip_non_finite_step
from fuselip_med.train.tracking import log_with, start_trackers

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class TrainingStopped(UserError, RuntimeError):
    """Training ended early for a reason the user must act on (e.g. the loss kept diverging)."""


@dataclass
class TrainResult:
    """What a run produced: where, how far, the per-step losses of good steps, the evaluation before and after."""

    run_dir: Path
    final_dir: Path | None
    steps: int
    losses: list[float] = field(default_factory=list)
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False


class Trainer:
    """Runs a recipe: builds data and model, trains, evaluates, checkpoints, and saves the final model."""

    def __init__(self, recipe: Recipe, *, resume: str | bool | None = None, from_scratch: bool = False,
                 console: Console | None = None):
        self.recipe = recipe
        self.resume = resume
        self.from_scratch = from_scratch
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=False),
                    InitProcessGroupKwargs(timeout=timedelta(minutes=recipe.train.dist_timeout_min))]
        # cpu=True on machines without CUDA lets `accelerate launch --multi_gpu`/torchrun run several gloo
        # processes there (Accelerate's own --cpu launcher needs MPI for more than one process).
        self.accelerator = Accelerator(mixed_precision=PRECISION[recipe.train.precision], kwargs_handlers=handlers,
                                       gradient_accumulation_steps=recipe.train.grad_accum,
                                       cpu=not torch.cuda.is_available(), project_dir=recipe.log_dir(),
                                       log_with=log_with(recipe.logging, recipe.log_dir()))
        enable_fast_matmul()
        self.out = TrainConsole(console or Console(), self.accelerator.is_main_process, recipe.logging.progress)
        self.run_dir = recipe.run_dir()
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.skips = SkipCounter()
        self.step = self.batches_done = self.samples_seen = 0
        self.bad_steps_total = self.consecutive_bad = 0
        self.losses: list[float] = []
        self.pending: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []  # (step, lr, losses [3], bad)

    # ---- setup -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Data (fails first, before any model is built), run directory, model, optimizer, codes, resume."""
        recipe, acc = self.recipe, self.accelerator
        try:
            self.data = build_train_data(recipe, _tokenizer(), acc.process_index, acc.num_processes,
                                         pin_memory=acc.device.type == "cuda")
            self.eval_data = build_eval_sources(recipe)
        except (DatasetEmptyError, FileNotFoundError) as error:
            raise DataSetupError(str(error)) from None
        self.resume_from = self._resume_path()
        if acc.is_main_process:
            if self.resume_from is None:
                self._move_previous_run_aside()
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(self.checkpoint_dir)
        acc.wait_for_everyone()

        self.objective, self.optimizer = acc.prepare(*self._build_objective())
        self.trainable = [p for p in self.objective.parameters() if p.requires_grad]
        self.titok_autocast = torch.autocast(acc.device.type, dtype=torch.bfloat16,
                                             enabled=recipe.train.precision == "bf16" and not recipe.train.titok_fp32)
        coder = acc.unwrap_model(self.objective).image_coder
        self.eval_codes = attach_image_codes(self.data, recipe, coder, rank=acc.process_index,
                                             world=acc.num_processes, barrier=acc.wait_for_everyone,
                                             say=self.out.say, eval_sources=self.eval_data).eval_codes
        per_epoch, train = self.data.sampler.batches_per_epoch(), recipe.train
        self.total_steps = train.steps or max(1, math.ceil(train.epochs * per_epoch / train.grad_accum))
        self.schedule = WarmupCosine(train.lr, train.warmup_steps, self.total_steps, train.min_lr)
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)
            self.out.say(f"Resumed from {self.resume_from} at step {self.step}.")
        else:
            self.data.set_epoch(0)
        start_trackers(acc, recipe.logging, recipe.log_dir(), run_name=recipe.name,
                       config=recipe.model_dump(mode="json"), say=self.out.say)
        unwrapped = acc.unwrap_model(self.objective).model
        lora_weights = adapter_parameter_count(unwrapped) if recipe.model.lora.enabled else None
        self.out.plan(plan_rows(recipe, unwrapped, self.data, self.total_steps, self.init, lora_weights, acc,
                                self.run_dir, self.resume_from), title=f"fuselip-med: {recipe.name}")

    def _build_objective(self) -> tuple[Objective, torch.optim.Optimizer]:
        """Model (init checkpoint or scratch; the arch's switches, LoRA), its arch's objective, fused AdamW."""
        recipe, train = self.recipe, self.recipe.train
        self.init = None if self.from_scratch else recipe.model.init
        set_seed(train.seed)
        model = build_model(recipe.model.size, init=self.init, arch=recipe.model.arch)
        objective_class(recipe.model.arch).configure_model(model, train)
        lora = recipe.model.lora
        if lora.enabled:
            model = apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.targets, lora.train_logit_params)
        objective = create_objective(recipe.model.arch, model, train)
        optimizer = build_optimizer(model, train.lr, train.weight_decay, train.betas, train.eps, train.decay_embeddings)
        return objective, optimizer

    @property
    def base_model(self):
        """The model being trained (FuseLIP or a late-fusion baseline), through DDP and PEFT wrappers."""
        return self.accelerator.unwrap_model(self.objective).base_model

    # ---- the loop --------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train the recipe to its step budget; Ctrl-C/SIGTERM (on any process) ends the step under way on every
        process, writes one checkpoint and returns (interrupted).

        The main process holds the run directory's writer lock throughout (``locks.writer_lock``): a second run or
        ``--resume`` into the same directory raises ``FolderBusyError`` naming the running one."""
        from contextlib import ExitStack

        from fuselip_med.io import check_writable
        from fuselip_med.locks import writer_lock

        with ExitStack() as lock:
            if self.accelerator.is_main_process:
                check_writable(self.run_dir)  # before any work: OutputError naming the folder
                lock.enter_context(writer_lock(self.run_dir, "training run"))
            return self._run()

    def _run(self) -> TrainResult:
        self.setup()
        recipe = self.recipe
        eval_before = {}
        if recipe.eval.at_start and self.resume_from is None and self.eval_data:
            eval_before = self.evaluate("start")
            self.out.metrics("Before training", eval_before)
        interrupted = False
        stop = StopRequest()
        self.iterator = iter(self.data.loader)
        self.started = time.perf_counter()
        try:
            with stop, self.out.progress() as self.bar:
                self.bar_task = self.bar.add_task("train", total=self.total_steps, completed=self.step,
                                                  loss=float("nan"), lr=0.0, rate=0.0)
                while self.step < self.total_steps and not interrupted:
                    self.train_step()
                    self.on_step_end()
                    interrupted = any_rank(stop.requested)  # every rank stops after the same step
        except KeyboardInterrupt:  # a second Ctrl-C, or one raised outside the signal handler
            if self.accelerator.num_processes > 1:
                raise  # the other processes stand elsewhere: no collective checkpoint is possible
            interrupted = True
        finally:
            if self.skips.total:
                self.out.say(f"Skipped samples: {self.skips.summary()}")
        final_dir, eval_after = None, {}
        if interrupted:
            self.out.say("[yellow]Interrupted: writing a checkpoint before exiting...[/]")
            path = self.save_checkpoint({"interrupted": True})
            self.out.say(f"Checkpoint written: {path}. Continue with --resume.")
        else:
            if recipe.checkpoint.every_steps:
                self.save_checkpoint({"final": True})
            if recipe.eval.at_end and self.eval_data:
                eval_after = self.evaluate("final")
            final_dir = self._save_final(eval_before, eval_after)
        self.accelerator.end_training()
        seconds = time.perf_counter() - self.started
        self.out.summary(steps=self.step, interrupted=interrupted, seconds=seconds, samples=self.samples_seen,
                         losses=self.losses, bad_steps=self.bad_steps_total,
                         skips=self.skips.summary() if self.skips.total else "0", before=eval_before,
                         after=eval_after, final_dir=final_dir, checkpoints=self.checkpoint_dir)
        return TrainResult(self.run_dir, final_dir, self.step, self.losses, eval_before, eval_after, interrupted)

    def train_step(self) -> None:
        """One optimizer step over ``grad_accum`` micro-batches, without a host synchronisation."""
        acc, train = self.accelerator, self.recipe.train
        lr = self.schedule(self.step)
        set_learning_rate(self.optimizer, lr)
        self.objective.train()
        unwrapped = acc.unwrap_model(self.objective)
        totals = torch.zeros(3, device=acc.device)
        for micro in range(train.grad_accum):
            batch = self._next_batch()
            with self.titok_autocast:  # TiTok in bf16 under bf16 training unless train.titok_fp32 (README)
                inputs = unwrapped.prepare(batch, self.step * train.grad_accum + micro)
            inputs = inputs.to(acc.device, non_blocking=True)
            with acc.accumulate(self.objective), acc.autocast():
                out = self.objective(inputs)
                acc.backward(out.total)  # Accelerate divides by grad_accum
            totals += torch.stack([out.total, out.contrastive, out.mmm]).detach().float() / train.grad_accum
        bad = skip_non_finite_step(acc, self.optimizer, self.trainable, totals, train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        clamp_logit_scale(self.base_model.logit_scale, train.max_logit_scale)
        self.step += 1
        self.pending.append((self.step, lr, totals, bad))
        self.bar.update(self.bar_task, completed=self.step)

    # ---- hooks -----------------------------------------------------------------------------------------
    def on_step_end(self) -> None:
        """Logging, evaluation and checkpoints at their cadences (each reads the pending losses first)."""
        recipe, step = self.recipe, self.step
        if step % recipe.train.log_every == 0 or step == self.total_steps:
            self.log()
        every = recipe.eval.every_steps
        if every and step % every == 0 and step < self.total_steps and self.eval_data:
            self.evaluate(f"step_{step:06d}")
        if recipe.checkpoint.every_steps and step % recipe.checkpoint.every_steps == 0:
            self.save_checkpoint({"losses_tail": self.losses[-10:]})

    def flush(self) -> list[tuple[int, float, list[float]]]:
        """Read the pending steps' losses (mean over processes) and non-finite flags on the host; report
        skipped steps and stop after ``max_bad_steps`` in a row. Returns (step, lr, [total, contrastive, mmm])
        of the good steps."""
        if not self.pending:
            return []
        values = self.accelerator.reduce(torch.stack([p[2] for p in self.pending]), reduction="mean").tolist()
        flags = torch.stack([p[3] for p in self.pending]).tolist()
        good = []
        for (step, lr, _, _), losses, bad in zip(self.pending, values, flags):
            if bad:
                self.consecutive_bad += 1
                self.bad_steps_total += 1
                self.out.say(f"[yellow]step {step}: non-finite loss or gradients, step skipped "
                             f"({self.consecutive_bad} in a row).[/]")
                if self.consecutive_bad >= self.recipe.train.max_bad_steps:
                    self.pending = []
                    raise TrainingStopped(
                        f"The loss was not finite for {self.consecutive_bad} steps in a row (at step {step}); training "
                        f"stopped. The last good checkpoint in {self.checkpoint_dir} is intact: lower train.lr or "
                        "use precision fp32/bf16, then --resume."
                    )
            else:
                self.consecutive_bad = 0
                self.losses.append(losses[0])
                good.append((step, lr, losses))
        self.pending = []
        return good

    def log(self) -> None:
        """Trackers and the progress bar get the newest good step's values."""
        good = self.flush()
        if not good:
            return
        step, lr, (total, contrastive, mmm) = good[-1]
        rate = self.samples_seen / max(time.perf_counter() - self.started, 1e-9)
        self.bar.update(self.bar_task, loss=total, lr=lr, rate=rate)
        if self.accelerator.is_main_process:
            scale = float(self.base_model.logit_scale.detach().exp())
            self.accelerator.log({"train/loss": total, "train/contrastive": contrastive, "train/mmm": mmm,
                                  "train/lr": lr, "train/samples_per_s": rate, "train/logit_scale": scale,
                                  "train/epoch": self.data.sampler.epoch}, step=step)

    def evaluate(self, tag: str) -> dict[str, float]:
        """Run the recipe's eval tasks on every process (each embeds its share, the rows are exchanged, process
        0 writes the report), so no process waits in a collective while another evaluates; log and return
        flat metrics."""
        from fuselip_med.eval.runner import run_evaluation

        self.flush()
        if not self.eval_data:
            return {}
        model, eval_recipe = self.base_model, self.recipe.eval
        was_training = model.training
        model.eval()
        report = run_evaluation(
            model, eval_recipe.tasks, self.eval_data, self.run_dir / "eval" / tag, seed=self.recipe.train.seed,
            pool_size=eval_recipe.pool_size, n_pools=eval_recipe.n_pools, batch_size=eval_recipe.batch_size,
            progress=False, model_id=f"{self.recipe.name}@{self.step}", distributed=True,
            decode_options=decode_options(self.recipe), image_codes=self.eval_codes,
        )
        model.train(was_training)
        metrics = flatten_metrics(report)
        self.accelerator.log(metrics, step=self.step)  # Accelerate logs on the main process only
        return metrics

    def save_checkpoint(self, extra: dict[str, Any]) -> Path | None:
        """Write ``checkpoints/step_<step>`` atomically (every process its RNG state, the main one the rest)."""
        self.flush()
        acc = self.accelerator
        tmp = ckpt.temporary_dir(self.checkpoint_dir, self.step)
        if acc.is_main_process:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        acc.wait_for_everyone()
        ckpt.write_process_files(tmp, acc.process_index)
        acc.wait_for_everyone()
        final = None
        if acc.is_main_process:
            state = {"step": self.step, "sampler": self.data.sampler.state_dict(batches_done=self.batches_done),
                     "bad_steps_total": self.bad_steps_total, "skips": self.skips.as_dict(),
                     "world_size": acc.num_processes, **extra}
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            unwrapped = acc.unwrap_model(self.objective)
            ckpt.write_main_files(tmp, unwrapped.model.state_dict(), self.optimizer.state_dict(), scaler, state,
                                  recipe_to_yaml(self.recipe), unwrapped.base_model.config.to_dict())
            final = ckpt.commit(tmp, self.checkpoint_dir, self.step)
            ckpt.prune(self.checkpoint_dir, self.recipe.checkpoint.keep_last)
        acc.wait_for_everyone()
        return final

    # ---- helpers ---------------------------------------------------------------------------------------
    def _next_batch(self):
        """The next batch (CPU); at the end of an epoch the next epoch starts (new shuffle and views/crops)."""
        while True:
            try:
                batch = next(self.iterator)
                break
            except StopIteration:
                if self.skips.total:
                    self.out.say(f"End of epoch {self.data.sampler.epoch}: skipped samples so far: "
                                 f"{self.skips.summary()}")
                self.data.set_epoch(self.data.sampler.epoch + 1)
                self.iterator, self.batches_done = iter(self.data.loader), 0
        self.batches_done += 1
        self.skips.update(batch)
        self.samples_seen += len(batch) * self.accelerator.num_processes
        return batch

    def _move_previous_run_aside(self) -> None:
        """A new run in a directory that already holds one keeps the old one, renamed, instead of mixing them."""
        if self.run_dir.is_dir() and any(self.run_dir.iterdir()):
            aside = self.run_dir.with_name(f"{self.run_dir.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
            self.run_dir.rename(aside)
            self.out.say(f"{self.run_dir} held an earlier run; moved it to {aside} (use --resume to continue a run).")

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
            self.out.say(f"[yellow]No checkpoint under {self.checkpoint_dir}; starting from the beginning.[/]")
        return found

    def _load_checkpoint(self, path: Path) -> None:
        acc = self.accelerator
        loaded = ckpt.read_checkpoint(path, acc.process_index)
        state = loaded["trainer_state"]
        if state.get("world_size", acc.num_processes) != acc.num_processes:
            self.out.say(f"[yellow]Checkpoint was written with {state['world_size']} processes; resuming with "
                         f"{acc.num_processes} (same global batches, RNG of rank 0 reused).[/]")
        acc.unwrap_model(self.objective).model.load_state_dict(loaded["model"], strict=True)
        self.optimizer.load_state_dict(loaded["optimizer"])
        if loaded["scaler"] is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(loaded["scaler"])
        rng = loaded["rng"] or ckpt.read_checkpoint(path, 0)["rng"]
        if rng is not None:
            ckpt.restore_rng_state(rng)
        sampler_state = state["sampler"]
        self.data.sampler.load_state_dict(sampler_state)
        self.data.mixture.set_epoch(sampler_state["epoch"])
        self.bad_steps_total = int(state.get("bad_steps_total", 0))
        self.step, self.batches_done = int(state["step"]), self.data.sampler.position
        if self.recipe.train.steps is None:  # an epoch budget: what is left of it, in this run's batches and steps
            epochs, sampler = self.recipe.train.epochs, self.data.sampler
            left = sampler.batches_left() + (epochs - sampler.epoch - 1) * sampler.batches_per_epoch(sampler.epoch + 1)
            self.total_steps = self.step + max(0, math.ceil(left / self.recipe.train.grad_accum))
            self.schedule = WarmupCosine(self.recipe.train.lr, self.recipe.train.warmup_steps, self.total_steps,
                                         self.recipe.train.min_lr)

    def _save_final(self, before: dict, after: dict) -> Path | None:
        acc = self.accelerator
        final_dir = self.run_dir / "final"
        if acc.is_main_process:
            model = acc.unwrap_model(self.objective).model
            if self.recipe.model.lora.enabled:
                save_adapter(model, final_dir, self.init)
            else:
                save_pretrained(model, final_dir)
            write_model_card(final_dir, self.recipe, self.init, self.step, before, after)
        acc.wait_for_everyone()
        return final_dir


def enable_fast_matmul() -> None:
    """TF32 tensor-core matmuls and convolutions for float32 work on CUDA (Ampere and later; PyTorch leaves
    matmuls off by default): fp32 training and the parts of a bf16 step that autocast keeps in float32."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


class StopRequest:
    """SIGTERM (cluster pre-emption, docker stop) and Ctrl-C only set ``requested`` while the loop runs; the
    trainer reduces it across processes after every step, so every process stops after the same step and
    they write one checkpoint together (a signal raising inside one process's step would leave the others
    waiting in a collective for good). A second Ctrl-C raises ``KeyboardInterrupt`` as usual."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        for signum in self.SIGNALS:
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not in the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _tokenizer():
    from fuselip_med.core.text_tokenizer import TextTokenizer

    return TextTokenizer()
