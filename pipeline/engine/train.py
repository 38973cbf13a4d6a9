"""The training engine: one loop for every family and task.

Data lives on the device as tensors and is batched by index permutation. Per-step statistics are
summed on the device and read once per epoch. A checkpoint (model, optimizers, schedules, RNG
states, history, MLflow run id) is written at the end of an epoch, at most every
`checkpoint_every_s` seconds, so a rerun resumes and ends with the numbers of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from models import build_model
from models.contract import Phase
from models.layers.init import connection_weights
from pipeline.data.prepare import Prepared, has_validation, redraw_split
from pipeline.engine import distributed, interrupts
from pipeline.engine.checkpoints import CHECKPOINT, read_checkpoint, trained_weights
from pipeline.engine.diagnostics import make_monitor
from pipeline.engine.runfiles import FILES, Cost, Diagnostics, RunMetrics, write_run_file
from pipeline.engine.tasks import make_task
from pipeline.engine.tasks.base import Task
from pipeline.engine.tracking import Tracker
from pipeline.engine.warmstart import warm_start
from pipeline.io import atomic_torch_save, atomic_write_text
from pipeline.specs.errors import UserError
from pipeline.specs.experiment import ExperimentSpec, OptimizerSpec, ScheduleSpec
from pipeline.specs.metrics import Mode, is_better

EpochCallback = Callable[[int, dict[str, float]], None]


# ── building blocks ──────────────────────────────────────────────────────────
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        import os
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def make_optimizer(spec: OptimizerSpec, phase: Phase) -> torch.optim.Optimizer:
    lr = phase.lr or spec.lr
    betas = phase.betas or spec.betas
    if spec.name == "sgd":
        return torch.optim.SGD(phase.params, lr=lr, momentum=spec.momentum, nesterov=spec.nesterov and spec.momentum > 0,
                               weight_decay=spec.weight_decay)
    if spec.name == "adam":
        return torch.optim.Adam(phase.params, lr=lr, betas=betas, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(phase.params, lr=lr, betas=betas, weight_decay=spec.weight_decay)


def l1_weights(model: nn.Module, phase: Phase) -> list[nn.Parameter]:
    """The weight matrices a phase's L1 penalty covers: the model's connection weights this phase trains."""
    trained = {id(p) for p in phase.params}
    return [w for w in connection_weights(model) if id(w) in trained]


def lr_factor(spec: ScheduleSpec, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the peak rate at a given step: linear warmup, then constant, step or cosine decay."""
    warmup = int(spec.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if spec.name == "constant":
        return 1.0
    if spec.name == "step":
        return spec.gamma ** ((step - warmup) // (spec.step_epochs * steps_per_epoch))
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def augment(x: torch.Tensor, noise_std: float, max_shift: int) -> torch.Tensor:
    """Training-time augmentation on a float batch (B, ...): random roll per sample, then Gaussian noise."""
    if max_shift > 0 and x.dim() >= 2:
        spatial = list(range(1 if x.dim() == 2 else 2, x.dim()))  # (B, F)/(B, L): axis 1; (B, C, ...): the rest
        shift = int(torch.randint(-max_shift, max_shift + 1, (1,)))
        x = torch.roll(x, shifts=[shift] * len(spatial), dims=spatial)
    if noise_std > 0:
        x = x + noise_std * torch.randn_like(x)
    return x


def read_stats(stats: dict[str, torch.Tensor]) -> dict:
    """One host sync for all of an epoch's summed statistics."""
    return {k: v.tolist() for k, v in stats.items()}


def accumulate(total: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> None:
    for k, v in stats.items():
        if k in total:
            total[k] += v
        else:
            total[k] = v.clone()


@torch.no_grad()
def evaluate_split(model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
                   reduce: Callable[[dict], dict] | None = None) -> dict:
    """A task's metrics over a whole split, in eval mode; `reduce` sums the statistics of ranks holding parts."""
    was_training = model.training
    model.eval()
    total: dict[str, torch.Tensor] = {}
    for i in range(0, len(x), batch_size):
        accumulate(total, task.eval_stats(model, x[i:i + batch_size], y[i:i + batch_size]))
    model.train(was_training)
    return task.summarize(read_stats(reduce(total) if reduce else total))


class Progress:
    """A bar on a terminal; plain lines otherwise (DVC logs, CI)."""

    def __init__(self, name: str, epochs: int, start: int):
        self.name = name
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=epochs, initial=start, desc=name, unit="epoch", leave=True)

    def update(self, epoch: int, row: dict) -> None:
        shown = {k: f"{v:.4g}" for k, v in row.items() if k.startswith(("train/loss", "val/")) and isinstance(v, float)}
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        else:
            print(f"[{self.name}] epoch {epoch} " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ── the run's state ──────────────────────────────────────────────────────────
@dataclass
class RunState:
    """Everything a resumed run needs besides the modules themselves."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimisation steps completed
    history: list[dict] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int | None = None
    best_weights: dict | None = None
    bad_epochs: int = 0
    train_time_s: float = 0.0
    status: str = "running"
    run_id: str | None = None


def _improved(value: float, best: float | None, mode: Mode, min_delta: float) -> bool:
    return best is None or is_better(value, best, mode, min_delta)


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# ── the engine ───────────────────────────────────────────────────────────────
class Trainer:
    def __init__(self, spec: ExperimentSpec, data: Prepared, run_dir: str | Path,
                 open_tracker: Callable[[str | None], "Tracker"] | None = None,
                 callbacks: list[EpochCallback] | None = None, progress: bool = True):
        if spec.data.split_seed is not None:
            data = redraw_split(data, spec.data.split_seed)
        self.spec, self.data, self.run_dir = spec, data, Path(run_dir)
        self.data_hash = data.meta.content_hash  # a run counts as done only for the data it trained on
        self.open_tracker = open_tracker  # called with the resumed run id (or None) once training starts
        self.tracker: Tracker | None = None
        self.callbacks = callbacks or []
        self.show_progress = progress
        self.ranks, rank_device = distributed.start(spec.train.device)  # one rank of 1 unless under torchrun
        self.device = rank_device or pick_device(spec.train.device)
        seed_everything(spec.train.seed, spec.train.deterministic)
        self.task = make_task(spec.task, data.meta)
        self.model = build_model(spec.model, data.shape).to(self.device)
        self.init_hash = warm_start(self.model, spec)  # before the phases: a frozen part gets no optimizer
        self.phases = self.task.phases(self.model)
        self.optimizers = [make_optimizer(spec.train.optimizer, p) for p in self.phases]
        self.l1_weights = [l1_weights(self.model, p) for p in self.phases]
        self.train_x, self.train_y = self._split("train")
        if spec.data.train_subset:
            self.train_x, self.train_y = self.train_x[:spec.data.train_subset], self.train_y[:spec.data.train_subset]
        self.val_x, self.val_y = self._split("val")
        self.validates = has_validation(data.meta)  # False: the dataset's split.val_fraction is 0
        self.batch_size = min(spec.train.batch_size, len(self.train_x))
        self.steps_per_epoch = math.ceil(len(self.train_x) / self.batch_size)
        budget = spec.train.epochs * self.steps_per_epoch
        self.total_steps = min(budget, spec.train.max_steps) if spec.train.max_steps else budget
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(spec.train.schedule, s, self.steps_per_epoch, self.total_steps))
            for opt in self.optimizers]
        self.batch_gen = torch.Generator().manual_seed(spec.train.seed)
        self.monitor = make_monitor(spec.diagnostics, self.model, self.phases, self.train_x[:256], self.train_y[:256],
                                    self.ranks)
        self.state = RunState()

    def _split(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.data.tensors
        return t[f"{part}_x"].to(self.device), t[f"{part}_y"].to(self.device)

    def held_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples a check or a timing runs on: the validation split, or the training split where the data
        has no validation split."""
        return (self.val_x, self.val_y) if self.validates else (self.train_x, self.train_y)

    # checkpointing ---------------------------------------------------------
    def checkpoint(self) -> dict:
        return {
            "spec_hash": self.spec.spec_hash(),
            **({"init_hash": self.init_hash} if self.init_hash else {}),
            **({"data_hash": self.data_hash} if self.data_hash else {}),
            "model": self.model.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "batches": self.batch_gen.get_state(), "numpy": np.random.get_state()[1].tolist(),
                    "python": repr(random.getstate())},
            "state": self.state.__dict__,
            "monitor": self.monitor.state_dict(),
        }

    def save_checkpoint(self) -> None:
        if self.ranks.is_main:
            atomic_torch_save(self.run_dir / CHECKPOINT, self.checkpoint())

    def try_resume(self) -> bool:
        """Load runs/NAME/checkpoint.pt if it belongs to this very spec and data; a changed spec or dataset starts
        afresh."""
        path = self.run_dir / CHECKPOINT
        # Ranks load rank 0's copy: on several machines only rank 0's holds the run folder.
        found = self.ranks.is_main and path.is_file()
        where = "cpu" if self.ranks.active else self.device
        ckpt = self.ranks.from_main(read_checkpoint(path, where) if found else None)
        if (ckpt is None or ckpt.get("spec_hash") != self.spec.spec_hash() or ckpt.get("init_hash") != self.init_hash
                or ckpt.get("data_hash") != self.data_hash):
            return False  # another spec, other weights to start from, or the dataset prepared anew: trained afresh
        self.model.load_state_dict(ckpt["model"])
        for opt, s in zip(self.optimizers, ckpt["optimizers"]):
            opt.load_state_dict(s)
        for sch, s in zip(self.schedulers, ckpt["schedulers"]):
            sch.load_state_dict(s)
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        self.batch_gen.set_state(rng["batches"].cpu())
        np.random.set_state(("MT19937", np.array(rng["numpy"], dtype=np.uint32), 624, 0, 0.0))
        self.state = RunState(**ckpt["state"])
        self.monitor.load_state_dict(ckpt["monitor"])
        return True

    # one epoch ---------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        self.model.train()
        aug = self.spec.train.augment
        clip = self.spec.train.grad_clip
        l1 = self.spec.train.optimizer.l1
        total: dict[str, torch.Tensor] = {}
        perm = torch.randperm(len(self.train_x), generator=self.batch_gen).to(self.device)
        for i in range(0, len(perm), self.batch_size):
            if self.state.step >= self.total_steps:
                break
            idx = perm[i:i + self.batch_size]
            x, y = self.train_x[idx], self.train_y[idx]
            if x.is_floating_point() and (aug.noise_std > 0 or aug.max_shift > 0):
                x = augment(x, aug.noise_std, aug.max_shift)
            x, y, weight = self.ranks.shard(x, y)  # the global batch, then this rank's part of it
            for phase, opt, penalised in zip(self.phases, self.optimizers, self.l1_weights):
                opt.zero_grad(set_to_none=True)
                loss, stats = self.ranks.weigh(*phase.loss(self.model, x, y), weight)
                if l1 and penalised:  # once per rank, unweighted: averaging the ranks' gradients keeps it once
                    loss = loss + l1 * torch.stack([w.abs().sum() for w in penalised]).sum()
                loss.backward()
                self.monitor.before_average(phase.name)
                self.ranks.average_gradients(phase.params)
                self.monitor.after_backward(phase.name)
                if clip:
                    nn.utils.clip_grad_norm_(phase.params, clip, foreach=True)
                    self.monitor.after_clip(phase.name)
                opt.step()
                accumulate(total, {f"{phase.name}:{k}" if len(self.phases) > 1 else k: v for k, v in stats.items()})
            self.monitor.after_step()
            self.ranks.sync_buffers(self.model)
            for sch in self.schedulers:
                sch.step()
            self.state.step += 1
            interrupts.check()  # Ctrl-C lands here, between steps, never inside a tracker write
        return self._summarize_train(read_stats(self.ranks.sum_stats(total)))

    def _summarize_train(self, stats: dict) -> dict[str, float]:
        if len(self.phases) == 1:
            return self.task.summarize(stats)
        # Several phases: each reports its own statistics, summarised by the task under the phase's name.
        out: dict[str, float] = {}
        for phase in self.phases:
            prefix = f"{phase.name}:"
            part = {k[len(prefix):]: v for k, v in stats.items() if k.startswith(prefix)}
            out.update(self.task.summarize(part))
        return out

    # the loop ----------------------------------------------------------------
    def run(self) -> dict:
        spec = self.spec
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.try_resume()
        if resumed and self.state.status != "running":
            return self.write_outputs()  # already finished: outputs are rewritten, nothing retrained
        if self.open_tracker is not None and self.ranks.is_main:
            self.tracker = self.open_tracker(self.state.run_id)
            self.state.run_id = self.tracker.run_id
        if not resumed:  # epoch 0: a kill before the first epoch ends still resumes this very MLflow run
            self.save_checkpoint()
        epochs = math.ceil(self.total_steps / self.steps_per_epoch)  # the budget that binds, in epochs
        shown = self.show_progress and self.ranks.is_main
        progress = Progress(spec.name, epochs, self.state.epoch) if shown else None
        # Ranks stop together only when killed together: a deferred Ctrl-C could leave one rank waiting in an
        # all-reduce for another that already stopped, so under DDP it lands where it lands.
        safe_stops = interrupts.deferred() if not self.ranks.active else contextlib.nullcontext()
        try:
            with safe_stops:
                self._train_epochs(progress)
        except BaseException as error:
            # Ctrl-C or a crash: the run is closed as KILLED or FAILED (never left RUNNING); the epochs since the
            # last checkpoint are trained again by the rerun, so their queued metrics are dropped.
            if self.tracker is not None:
                self.tracker.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED", flush=False)
            raise
        finally:
            if progress:
                progress.close()
        return self.write_outputs()

    def _train_epochs(self, progress: Progress | None) -> None:
        """Epochs until the budget, early stopping or divergence ends the run; a checkpoint at the end and at most
        every `checkpoint_every_s` seconds."""
        spec = self.spec
        last_save = time.monotonic()
        while self.state.epoch < spec.train.epochs and self.state.step < self.total_steps:
            row = self._epoch()
            done = self._judge(row)
            if self.tracker is not None:
                self.tracker.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "step")},
                                         step=self.state.epoch)
                self.tracker.log_metrics(self.monitor.mlflow_metrics(), step=self.state.epoch)  # grad_norm/<layer>
            if progress:
                progress.update(self.state.epoch, row)
            if done or time.monotonic() - last_save >= spec.train.checkpoint_every_s:
                if self.tracker is not None:
                    self.tracker.flush()
                self.save_checkpoint()
                last_save = time.monotonic()
            for callback in self.callbacks:
                callback(self.state.epoch, row)
            if done:
                return

    def _epoch(self) -> dict:
        """Train one epoch and validate → the epoch's row of the history (every rank holds rank 0's)."""
        t0 = time.perf_counter()
        train_metrics = self.train_epoch()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        epoch_time = time.perf_counter() - t0
        self.state.train_time_s += epoch_time
        val_metrics = self.validate()
        self.state.epoch += 1
        row = {"epoch": self.state.epoch, "step": self.state.step,
               **{f"train/{k}": v for k, v in train_metrics.items()},
               **{f"val/{k}": v for k, v in val_metrics.items()},
               "lr": self.schedulers[0].get_last_lr()[0], "epoch_time_s": epoch_time}
        row.update(self.monitor.end_epoch(self.state.epoch))
        # Tasks with per-epoch artifacts (sample grids, sampled text) write them here.
        if self.ranks.is_main:
            row.update(self.task.end_epoch(self.model, self.state.epoch, self.run_dir, self.data))
        row = self.ranks.from_main(row)  # every rank takes rank 0's decisions
        self.state.history.append(row)
        return row

    def _judge(self, row: dict) -> bool:
        """Track the best epoch and set the run's status → whether training ends after this epoch."""
        spec = self.spec
        es = spec.train.early_stopping
        monitor_key = es.monitor if es else f"val/{self.task.metric}"
        mode = es.mode if es else self.task.mode
        diverged = not all(math.isfinite(v) for k, v in row.items() if k.endswith("loss"))
        value = row.get(monitor_key, float("nan"))
        if not self.validates and es is None:  # nothing to choose an epoch by: the best is the last one trained
            if not diverged:
                self.state.best_epoch = self.state.epoch
        elif math.isfinite(value) and _improved(value, self.state.best_value, mode, es.min_delta if es else 0.0):
            self.state.best_value, self.state.best_epoch, self.state.bad_epochs = value, self.state.epoch, 0
            if es:
                self.state.best_weights = _cpu_state(self.model)
        else:
            self.state.bad_epochs += 1
        stopped_early = es is not None and self.state.bad_epochs >= es.patience
        done = diverged or stopped_early or self.state.epoch >= spec.train.epochs or self.state.step >= self.total_steps
        if diverged:
            self.state.status = "diverged"
        elif done:
            self.state.status = "early_stopped" if stopped_early else "finished"
        return done

    def validate(self) -> dict[str, float]:
        """The validation split's metrics; none (no val/ columns) for data without a validation split."""
        if not self.validates:
            return {}
        part = self.ranks.part(self.val_x, self.val_y)
        if part is None:  # a split too small to share: every rank evaluates all of it
            return evaluate_split(self.model, self.task, self.val_x, self.val_y)
        return evaluate_split(self.model, self.task, *part, reduce=self.ranks.sum_stats)

    # outputs -------------------------------------------------------------------
    def final_model(self) -> nn.Module:
        """The weights to evaluate: the best epoch's under early stopping, else the last."""
        if self.state.best_weights is not None and self.state.status != "diverged":
            model = copy.deepcopy(self.model)
            model.load_state_dict(self.state.best_weights)
            return model
        return self.model

    # outputs -------------------------------------------------------------------
    def metrics(self) -> RunMetrics:
        history = self.state.history
        last = history[-1] if history else {}
        best = history[self.state.best_epoch - 1] if self.state.best_epoch else last
        n_train = len(self.train_x)
        return RunMetrics(
            name=self.spec.name, status=self.state.status, task=self.spec.task, kind=self.spec.model.kind,
            dataset=self.spec.data.dataset, main_metric=self.task.metric, epochs=self.state.epoch,
            steps=self.state.step, best_epoch=self.state.best_epoch,
            final={k: v for k, v in last.items() if k.startswith(("train/", "val/"))},
            best={k: v for k, v in best.items() if k.startswith(("train/", "val/"))},
            train_time_s=round(self.state.train_time_s, 3),
            train_samples_per_s=round(n_train * self.state.epoch / max(self.state.train_time_s, 1e-9), 1),
            spec_hash=self.spec.spec_hash(), mlflow_run_id=self.state.run_id,
            **({"init_hash": self.init_hash} if self.init_hash else {}),
            **({"data_hash": self.data_hash} if self.data_hash else {}))

    def write_outputs(self) -> dict:
        """history.csv, metrics.json and diagnostics.json (rank 0) → metrics.json's content, on every rank."""
        record = self.metrics()
        metrics = record.model_dump(exclude_unset=True)
        if not self.ranks.is_main:
            return metrics
        atomic_write_text(self.run_dir / "history.csv", history_csv(self.state.history))
        write_run_file(self.run_dir, record)
        diagnostics = self.monitor.summary(self.state.history, self.spec.diagnostics, metrics)  # reads status, metric
        write_run_file(self.run_dir, Diagnostics.model_validate(diagnostics))
        return metrics


def history_csv(history: list[dict]) -> str:
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns or ["epoch"], lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow(row)
    return buffer.getvalue()


# ── one experiment, end to end (what `archlab train` calls) ──────────────────
LOCK = ".train.lock"


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold the run folder while training it: a second training of the same run stops with exit 2 naming the
    holder, instead of both training to the end into one folder and two MLflow runs. The kernel drops the
    lock when its process dies, so a killed run never leaves it stale."""
    import fcntl
    import socket
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(run_dir, f"is being trained by {holder}; wait for it to end or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_monitor(spec: ExperimentSpec, trainer: Trainer, source: str | Path) -> None:
    """Early stopping must watch a metric the history will hold: a name that never appears would stop
    training after one epoch. Checked on two validation samples (training ones where there is no validation
    split, and then only train/ names) before anything is written."""
    es = spec.train.early_stopping
    if es is None:
        return
    x, y = trainer.held_out()
    names = list(evaluate_split(trainer.model, trainer.task, x[:2], y[:2]))
    parts = ("val", "train") if trainer.validates else ("train",)
    known = [f"{part}/{name}" for part in parts for name in names]
    if es.monitor not in known:
        raise UserError(source, f"{es.monitor!r} is not a metric of task {spec.task}; it reports: "
                        f"{', '.join(known)}", field="train.early_stopping.monitor")


def mlflow_experiment_name(spec: ExperimentSpec) -> str:
    return f"{spec.data.dataset}/{spec.task}"


def train_experiment(spec: ExperimentSpec, spec_path: str | Path, data: Prepared, run_dir: str | Path,
                     tracking_uri: str | None, callbacks: list[EpochCallback] | None = None,
                     progress: bool = True, parent_run_id: str | None = None,
                     extra_tags: dict[str, str] | None = None, experiment: str | None = None,
                     run_name: str | None = None, restart: bool = False) -> dict:
    """Train (or resume) one experiment into run_dir, tracked in MLflow when tracking_uri is given;
    `restart` sets an existing checkpoint aside (renamed, kept) and trains afresh.

    `experiment` overrides the MLflow experiment (a sweep keeps its nested trial runs beside their parent).
    """
    from pipeline.engine.cost import measure_cost, peak_memory
    from pipeline.engine.tracking import source_tags, spec_params

    run_dir = Path(run_dir)

    def open_tracker(run_id: str | None) -> Tracker:
        tags = {"kind": spec.model.kind, "dataset": spec.data.dataset, "task": spec.task,
                "spec_hash": spec.spec_hash(), "data_hash": data.meta.content_hash or "",
                **source_tags(spec_path, spec.description), **(extra_tags or {})}
        # Tagged as it is created: a run interrupted a moment later can still be found by its tags.
        tracker = Tracker(tracking_uri, experiment or mlflow_experiment_name(spec), run_id=run_id,
                          run_name=run_name or spec.name, parent_run_id=parent_run_id, tags=tags)
        fresh = tracker.run_id != run_id
        tracker.log_params(spec_params(spec.model_dump(mode="json")))
        tracker.set_tags(tags)  # a resumed run too
        if fresh:
            tracker.log_dataset(data.meta)
        return tracker

    trainer = Trainer(spec, data, run_dir, open_tracker if tracking_uri else None, callbacks, progress)
    check_monitor(spec, trainer, spec_path)
    metrics = _train_under_lock(trainer, run_dir, restart)
    # Every rank joins, before rank 0 goes on: each one's training time and peak memory.
    per_rank = trainer.ranks.gather((trainer.state.train_time_s, peak_memory(trainer.device)[0]))
    if not trainer.ranks.is_main:
        return metrics
    cost = measure_cost(trainer, metrics)
    if trainer.ranks.active:
        cost = distributed.add_rank_figures(cost, trainer.ranks, *zip(*per_rank))
    write_run_file(run_dir, Cost.model_validate(cost))
    if trainer.tracker is not None:
        _close_tracked_run(trainer, metrics, cost, spec_path, tracking_uri)
    return metrics


def _train_under_lock(trainer: Trainer, run_dir: Path, restart: bool) -> dict:
    """Run the trainer holding the run folder's lock (rank 0 alone holds the folder); a failure we live to see
    leaves no MLflow run RUNNING."""
    main = trainer.ranks.is_main
    if main and not restart and (run_dir / CHECKPOINT).is_file():
        read_checkpoint(run_dir / CHECKPOINT)  # a corrupt one is refused before the lock file is written
    try:
        with run_lock(run_dir) if main else contextlib.nullcontext():
            if restart and main:  # under the lock: never from under a training in progress
                aside = set_aside_checkpoint(run_dir)
                if aside is not None:
                    print(f"set the checkpoint aside as {aside}; training afresh", file=sys.stderr)
            return trainer.run()
    except BaseException as err:
        if trainer.tracker is not None:
            with contextlib.suppress(Exception):
                # Epochs after the last checkpoint are not sent: a resume trains and logs them again.
                trainer.tracker.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", flush=False)
        raise


def _close_tracked_run(trainer: Trainer, metrics: dict, cost: dict, spec_path: str | Path, tracking_uri: str) -> None:
    """The finished run's tags, cost params, files and model, then its end."""
    from pipeline.engine.tracking import number_text
    tracker, run_dir = trainer.tracker, trainer.run_dir
    tracker.set_tags({"status": metrics["status"], **trainer.monitor.tags()})
    # Cost numbers are params: one value each, a column of the runs table, not a lone dot in the charts.
    tracker.log_params({f"cost.{k}": number_text(v) for k, v in cost.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
    trained = [name for name in FILES if name != "eval.json"]  # eval.json comes later, from `archlab evaluate`
    for name in ("history.csv", *trained, CHECKPOINT):
        if (run_dir / name).is_file():
            tracker.log_artifact(run_dir / name)
    tracker.log_artifact(spec_path)
    if (run_dir / "samples").is_dir():  # sample grids per epoch, sampled text
        tracker.client.log_artifacts(tracker.run_id, str(run_dir / "samples"), "samples")
    log_model_of(trainer, tracker, tracking_uri)
    tracker.end("FAILED" if metrics["status"] == "diverged" else "FINISHED")


def log_model_of(trainer: Trainer, tracker: Tracker, tracking_uri: str) -> None:
    """The trained model (best weights under early stopping) as the run's MLflow model `model`."""
    from pipeline.engine.serving import log_served_model
    if trainer.state.status == "diverged":
        return  # NaN weights serve nothing
    model = copy.deepcopy(trainer.final_model())
    seconds = log_served_model(tracking_uri, tracker.experiment_id, tracker.run_id, model, trainer.spec.task,
                               trainer.data)
    tracker.set_tags({"model_log_s": f"{seconds:.2f}"})


def set_aside_checkpoint(run_dir: str | Path) -> Path | None:
    """Move a run's checkpoint to a new name beside it (never over another file) → where it went."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for n in range(1000):
        aside = path.with_name(f"{CHECKPOINT}.set-aside-{stamp}" + (f"-{n}" if n else ""))
        if not aside.exists():
            os.rename(path, aside)
            return aside
    raise UserError(path, "too many set-aside checkpoints beside it; remove some")


def load_checkpoint_model(spec: ExperimentSpec, data: Prepared, run_dir: str | Path,
                          device: torch.device | None = None) -> tuple[nn.Module, dict]:
    """The trained model of a run (best weights under early stopping) and its saved state."""
    device = device or pick_device(spec.train.device)
    ckpt = read_checkpoint(Path(run_dir) / CHECKPOINT, device)
    model = build_model(spec.model, data.shape).to(device)
    model.load_state_dict(trained_weights(ckpt))
    model.eval()
    return model, ckpt["state"]
