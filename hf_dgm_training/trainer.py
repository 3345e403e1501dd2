# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""The one training loop of the hf-dgm scripts.

A training script supplies a `TrainingTask`: its data (the batches of an epoch), its step (one optimisation step that
returns its losses as a device tensor) and its evaluation (at the end of every epoch). `TrainingLoop` does the rest
the same way for every model:

- resume from `--resume_from_checkpoint` (exactly: the task's sampler is driven by (seed, epoch), the loop state —
  step, epoch, position in the epoch, the epoch's running loss sums, wall times, counters — travels in the checkpoint);
- `metrics.jsonl` holds one line per step and one per epoch; on resume the lines after the checkpoint are dropped
  first, so the file is the same as that of an uninterrupted run;
- losses stay on the device and are fetched every `--logging_steps` steps (one device sync);
- checkpoints every N steps, every epoch, or every N seconds/minutes of training (`--checkpointing_steps`);
- timing: train seconds (without checkpoints and evaluation), steady rate (without the first steps: compilation,
  CUDA graph capture), seconds per epoch, and the wall seconds of the script's phases (`PhaseTimer`: imports, data,
  model, ..., the loop, saving) from the process's start on;
- `train_results.json` (the transformers name) with the loop's figures and the task's, written atomically.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from .checkpoints import CheckpointManager
from .hub import HubPusher, resolve_hub_token
from .tracking import MetricsLogger, device_description, read_metrics, truncate_metrics, write_json


logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "train_results.json"


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process started (interpreter start-up and imports included), read from /proc as `ps`
    reads it (10 ms resolution); None where there is no /proc (not Linux)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as file:
            fields = file.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        with open("/proc/uptime", encoding="ascii") as file:
            uptime = float(file.read().split()[0])
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5): start time after boot, in ticks
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - started)


class PhaseTimer:
    """Wall seconds of a script's phases, for `train_results.json`: `lap(name)` adds the time since the previous lap
    (or since the timer started) to phase `name`. The first phase, `first_phase`, is the time from the process's start
    to the timer's (when the OS tells it): started first thing in `main`, that is the interpreter and the imports.
    The phases add up to `total()`, the process's wall time so far."""

    def __init__(self, first_phase: str = "imports"):
        self.started = self._last = time.perf_counter()
        before = seconds_since_process_start()
        self.seconds: dict[str, float] = {} if before is None else {first_phase: before}

    def lap(self, name: str) -> float:
        """Ends the current phase as `name` (added to it when it ran before); returns its seconds this time. Waits for
        the GPU first, so that work queued in a phase counts in it (torch not imported yet: nothing is queued)."""
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        return elapsed

    def total(self) -> float:
        """Seconds since the process started (since the timer started where that is not known)."""
        return sum(self.seconds.values()) + time.perf_counter() - self._last


class TrainingTask:
    """What a training script supplies to `TrainingLoop`. Override the methods; the attributes are set in __init__.

    Attributes:
        loss_names: names of the values `train_step` returns, in order (logged every step).
        counter_names: names of extra 0/1 values `train_step` returns after the losses (e.g. a skipped step);
            they are summed over the run and reported in `train_results.json`, not logged per step.
        steps_per_epoch: optimisation steps in one epoch (this process).
        images_per_step: images one step consumes on all processes together (for images/s).
        warmup_steps: steps of this run after which the rate counts as steady (compilation, graph capture behind).
    """

    loss_names: tuple[str, ...] = ()
    counter_names: tuple[str, ...] = ()
    steps_per_epoch: int = 0
    images_per_step: int = 1
    warmup_steps: int = 2

    def start_epoch(self, epoch: int) -> dict:
        """Called before the epoch's first step (also when resuming inside it). Returns values logged with every step
        of the epoch (e.g. `{"lr": ...}`)."""
        return {}

    def epoch_batches(self, epoch: int, first_step: int) -> Iterable:
        """The batches of `epoch` from position `first_step` on."""
        raise NotImplementedError

    def train_step(self, batch):
        """One optimisation step; returns a 1-D device tensor: the losses, then the counters. It may be a CUDA graph's
        static output: the loop copies it before the next step."""
        raise NotImplementedError

    def end_epoch(self, epoch: int, epoch_means: dict[str, float]) -> dict:
        """Evaluation at the end of an epoch; returns metrics to log (keys as logged, e.g.
        "epoch/test_bits_per_dim")."""
        return {}

    def should_stop(self) -> bool:
        """True to end training after the current epoch (early stopping)."""
        return False

    def state_dict(self) -> dict:
        """JSON-serialisable task state kept in checkpoints (e.g. early-stopping counters)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class LoopState:
    """Everything beyond accelerate's state that a resumed run needs to continue as if never interrupted."""

    global_step: int = 0
    epoch: int = 0  # the epoch the next step belongs to
    step_in_epoch: int = 0
    train_seconds: float = 0.0  # over all runs, without checkpoints and evaluation
    epoch_elapsed: float = 0.0  # training seconds of the current epoch so far
    epoch_seconds: list = field(default_factory=list)
    epoch_sums: list = field(default_factory=list)  # running sums of this epoch's losses
    epoch_finite_steps: int = 0  # steps of this epoch whose losses are all finite (the means' denominator)
    counters: dict = field(default_factory=dict)
    task: dict = field(default_factory=dict)


class TrainingLoop:
    """Runs a `TrainingTask` under an `Accelerator` with the flags of `hf_dgm_training.arguments.add_common_args`.

    `phases`: the script's `PhaseTimer`, started first thing in its `main` and lapped after each of its phases; the
    loop laps "resume" and "training_loop", and `finish` laps the rest as "finish" and writes them all
    (`phase_seconds`, adding up to `script_seconds`). Without one, the time before the loop is one phase,
    "before_the_loop".
    """

    def __init__(self, accelerator, args, task: TrainingTask, phases: PhaseTimer | None = None, model_config=None):
        self.accelerator, self.args, self.task = accelerator, args, task
        self.model_config = model_config  # kept in every checkpoint; resuming checks it
        self.phases = phases if phases is not None else PhaseTimer(first_phase="before_the_loop")
        self.checkpoints = CheckpointManager(accelerator, args.output_dir, args.checkpoints_total_limit)
        self.metrics_path = os.path.join(args.output_dir, METRICS_FILE)
        self.pusher = None
        if args.push_to_hub and accelerator.is_main_process:
            self.pusher = HubPusher(args.hub_model_id, resolve_hub_token(args.hub_token), private=args.hub_private_repo)
        self.state = LoopState()
        self.resumed_from_step = 0
        self.steps_this_run = 0
        self.overhead_seconds = 0.0  # checkpoints and evaluation of this run
        self.run_train_seconds = 0.0
        self.warmup = None  # (train seconds, steps) of this run before the rate counts as steady
        self.stopped_early = False
        # False for a loop that trains an auxiliary model inside a run (its steps restart at 1): metrics.jsonl only
        self.log_to_trackers = True

    # ------------------------------------------------------------------------------------------------ resume
    def resume(self) -> LoopState:
        """Loads `--resume_from_checkpoint` (if any) and makes metrics.jsonl end at its step."""
        saved = self.checkpoints.resume(self.args.resume_from_checkpoint, config=self.model_config)
        if saved is not None:
            loop_state = saved.get("extra", {}).get("loop")
            if loop_state is None:  # a checkpoint written before the loop state was kept: position only
                steps = self.task.steps_per_epoch
                loop_state = {"global_step": saved["step"], "epoch": saved["step"] // steps,
                              "step_in_epoch": saved["step"] % steps}
            self.state = LoopState(**loop_state)
            self.resumed_from_step = self.state.global_step
            self.task.load_state_dict(self.state.task)
            logger.info(f"Resumed at step {self.state.global_step} (epoch {self.state.epoch + 1}, step "
                        f"{self.state.step_in_epoch} of it).")
        if self.accelerator.is_main_process:
            truncate_metrics(self.metrics_path, self.state.global_step)
        self.phases.lap("resume")
        return self.state

    # ------------------------------------------------------------------------------------------------ run
    def total_steps(self) -> int:
        total = self.task.steps_per_epoch * self.args.num_train_epochs
        return min(total, self.args.max_train_steps) if self.args.max_train_steps else total

    def run(self) -> LoopState:
        """Trains from the current state to the end (or to --max_train_steps, or until the task stops early)."""
        import torch
        from tqdm.auto import tqdm

        args, task, state, accelerator = self.args, self.task, self.state, self.accelerator
        self._metrics = MetricsLogger(accelerator, self.metrics_path, to_trackers=self.log_to_trackers)
        # Device rows of the steps not fetched yet, and their (step, epoch, extras).
        self._history, self._pending = None, []
        max_steps = self.total_steps()
        self._progress = tqdm(total=max_steps, initial=min(state.global_step, max_steps), desc="training", unit="step",
                              disable=not accelerator.is_local_main_process)
        state.counters = {name: state.counters.get(name, 0) for name in task.counter_names}
        run_start_seconds = state.train_seconds
        self._clock = {"last": time.perf_counter(), "last_save": time.perf_counter()}
        while state.epoch < args.num_train_epochs and state.global_step < max_steps:
            epoch = state.epoch
            extras = task.start_epoch(epoch)
            accelerator.wait_for_everyone()
            self._clock["last"] = time.perf_counter()
            for batch in task.epoch_batches(epoch, state.step_in_epoch):
                self._record_step(task.train_step(batch), epoch, extras)
                if self.steps_this_run == task.warmup_steps:  # compilation and graph capture are behind us
                    self._flush()
                    self._tick()
                    self.warmup = (state.train_seconds - run_start_seconds, self.steps_this_run)
                if state.global_step >= max_steps:
                    break
                if state.step_in_epoch < task.steps_per_epoch and self._checkpoint_due(at_epoch_end=False):
                    self._save_checkpoint()
            self._flush()
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            self._tick()
            if state.step_in_epoch < task.steps_per_epoch:  # stopped by --max_train_steps inside the epoch
                self.stopped_early = True
                if args.checkpointing_steps != "no":
                    self._save_checkpoint()
                break
            stop = self._end_epoch(epoch)
            if self._checkpoint_due(at_epoch_end=True) or (args.checkpointing_steps != "no" and (
                    stop or state.global_step >= max_steps) and not isinstance(args.checkpointing_steps, float)):
                self._save_checkpoint()
            if stop:
                self.stopped_early = True
                logger.info(f"Early stopping after epoch {epoch + 1}.")
                break
        self._progress.close()
        self._metrics.close()
        self.run_train_seconds = state.train_seconds - run_start_seconds
        accelerator.wait_for_everyone()
        self.phases.lap("training_loop")
        return state

    def _record_step(self, values, epoch: int, extras: dict) -> None:
        """Keeps a step's values on the device until the next flush (every --logging_steps steps)."""
        import torch

        state = self.state
        if self._history is None:
            self._history = torch.zeros((self.args.logging_steps, len(values)), device=values.device)
        self._history[len(self._pending)].copy_(values.detach())
        state.global_step += 1
        state.step_in_epoch += 1
        self.steps_this_run += 1
        self._pending.append((state.global_step, epoch, extras))
        self._progress.update(1)
        if len(self._pending) == self.args.logging_steps:
            self._flush()

    def _flush(self) -> None:
        """Fetches the pending steps' values (one device sync), logs them and adds them to the epoch's sums."""
        if not self._pending:
            return
        task, state, accelerator = self.task, self.state, self.accelerator
        rows = self._history[: len(self._pending)]
        if accelerator.num_processes > 1:
            rows = accelerator.reduce(rows.clone(), reduction="mean")
        for (step, epoch, extras), values in zip(self._pending, rows.float().cpu().tolist()):
            losses = dict(zip(task.loss_names, values))
            self._metrics.log({**losses, "epoch": epoch + 1, **extras}, step=step)
            for name, value in zip(task.counter_names, values[len(task.loss_names):]):
                state.counters[name] += int(round(value * accelerator.num_processes))
            if all(math.isfinite(value) for value in losses.values()):
                sums = state.epoch_sums or [0.0] * len(task.loss_names)
                state.epoch_sums = [total + value for total, value in zip(sums, losses.values())]
                state.epoch_finite_steps += 1
        self._progress.set_postfix({name.split("/")[-1]: f"{value:.3f}" for name, value in list(losses.items())[:3]})
        self._pending.clear()

    def _end_epoch(self, epoch: int) -> bool:
        """The epoch's means and the task's evaluation, logged as one line; returns whether to stop early."""
        task, state = self.task, self.state
        state.epoch_seconds.append(round(state.epoch_elapsed, 4))
        sums = state.epoch_sums or [math.nan] * len(task.loss_names)
        means = {name: total / max(1, state.epoch_finite_steps) for name, total in zip(task.loss_names, sums)}
        started = time.perf_counter()
        evaluation = task.end_epoch(epoch, means)
        self._restart_clock(started)
        self._metrics.log({**{f"epoch/{name}": value for name, value in means.items()}, **evaluation,
                           "epoch": epoch + 1}, step=state.global_step)
        state.epoch, state.step_in_epoch, state.epoch_elapsed = epoch + 1, 0, 0.0
        state.epoch_sums, state.epoch_finite_steps = [], 0
        return task.should_stop()

    def _tick(self) -> None:
        """Adds the time since the last tick to the training time (overhead is left out by `_restart_clock`)."""
        now = time.perf_counter()
        self.state.train_seconds += now - self._clock["last"]
        self.state.epoch_elapsed += now - self._clock["last"]
        self._clock["last"] = now

    def _restart_clock(self, overhead_started: float) -> None:
        self._clock["last"] = time.perf_counter()
        self.overhead_seconds += self._clock["last"] - overhead_started

    def _checkpoint_due(self, at_epoch_end: bool) -> bool:
        interval = self.args.checkpointing_steps
        if interval == "no":
            return False
        if isinstance(interval, float):  # a duration of training
            return time.perf_counter() - self._clock["last_save"] >= interval
        if isinstance(interval, int):
            return self.state.global_step % interval == 0
        return at_epoch_end  # "epoch"

    def _save_checkpoint(self) -> None:
        self._flush()
        self._tick()
        started = time.perf_counter()
        state = self.state
        state.task = self.task.state_dict()
        extra = {"loop": asdict(state), "step_in_epoch": state.step_in_epoch}
        if self.model_config is not None:
            extra["model_config"] = self.model_config.to_diff_dict()
        path = self.checkpoints.save(state.global_step, state.epoch, extra)
        if self.pusher is not None:  # uploads in the background; training goes on
            self.pusher.push_folder(path, path_in_repo=f"checkpoints/{os.path.basename(path)}",
                                    commit_message=f"Checkpoint at step {state.global_step}")
        self._restart_clock(started)
        self._clock["last_save"] = time.perf_counter()

    # ------------------------------------------------------------------------------------------------ results
    def results(self) -> dict:
        """The loop's figures for train_results.json (the task adds its own)."""
        import torch

        state, args, task = self.state, self.args, self.task
        steps = self.steps_this_run
        rate = steps / self.run_train_seconds if self.run_train_seconds > 0 else None
        steady = None
        if self.warmup is not None and steps > self.warmup[1] and self.run_train_seconds > self.warmup[0]:
            steady = (steps - self.warmup[1]) / (self.run_train_seconds - self.warmup[0])
        total = task.steps_per_epoch * args.num_train_epochs
        return {
            "completed": state.global_step >= total,
            "stopped_early": self.stopped_early,
            "global_step": state.global_step,
            "total_steps": total,
            "steps_per_epoch": task.steps_per_epoch,
            "epochs_completed": state.epoch,
            "num_train_epochs": args.num_train_epochs,
            "steps_this_run": steps,
            "resumed_from_step": self.resumed_from_step or None,
            "train_seconds": state.train_seconds,
            "train_seconds_this_run": self.run_train_seconds,
            "checkpoint_and_evaluation_seconds": self.overhead_seconds,
            # The first steps of this run (compilation, CUDA graph capture), inside train_seconds_this_run.
            "warmup_seconds": self.warmup[0] if self.warmup else None,
            "warmup_steps": self.warmup[1] if self.warmup else None,
            "epoch_seconds": state.epoch_seconds,
            "steps_per_second": rate,
            "images_per_second": rate * task.images_per_step if rate else None,
            "steady_steps_per_second": steady,
            "steady_images_per_second": steady * task.images_per_step if steady else None,
            **{f"{name}_total": count for name, count in state.counters.items()},
            "num_processes": self.accelerator.num_processes,
            "mixed_precision": args.mixed_precision,
            "device": device_description(self.accelerator.device),
            "torch_version": torch.__version__,
            "args": {key: value for key, value in vars(args).items() if not key.startswith("_") and key != "hub_token"},
        }

    def records(self) -> list[dict]:
        """Every line of metrics.jsonl (one per step and per epoch, the last line of a step winning)."""
        return read_metrics(self.metrics_path)

    def summary(self, results: dict) -> str:
        """The last line of a training script, from what `finish` wrote."""
        rate, steady = results["steps_per_second"], results["steady_steps_per_second"]
        speed = f"{rate:.2f} it/s" if rate else "no steps this run"
        if steady:
            speed += f", steady {steady:.2f} it/s"
        return (f"Training done: {results['global_step']}/{results['total_steps']} steps, "
                f"{results['train_seconds']:.1f} s of training ({speed}), {results['script_seconds']:.1f} s in all. "
                f"Model, metrics and train_results.json in {self.args.output_dir}.")

    def finish(self, results: dict) -> dict:
        """Writes train_results.json (with the script's phases and total seconds) and pushes the output folder; main
        process. Returns what it wrote."""
        self.phases.lap("finish")
        results = {**results, "phase_seconds": dict(self.phases.seconds), "script_seconds": self.phases.total()}
        write_json(os.path.join(self.args.output_dir, RESULTS_FILE), results)
        if self.pusher is not None:
            self.pusher.push_folder(self.args.output_dir, commit_message=f"Model after {self.state.global_step} steps",
                                    ignore_patterns=["checkpoints/*", "logs/*"])
            self.pusher.wait()
        return results
