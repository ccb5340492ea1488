"""One readable training loop for stage 1 (BYOL) and stage 3 (ORL), in two parts as DINO's.

``train`` reads top to bottom as the list of steps: data, networks, optimiser, schedules,
resume, loop; ``train_one_epoch`` runs one epoch's steps from a :class:`RunPosition`. The same
call starts a run or resumes it from ``out_dir/last.pt``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, cast

import numpy as np
import torch

from orl import runlog
from orl.batch_data import StoreData, batch_seed, store_data
from orl.checkpoint import export_backbone, load_checkpoint, save_checkpoint
from orl.config import Config
from orl.correspondence import Correspondence
from orl.data import BYOLDataset, ORLDataset, ResumableSampler, SeededKeys, SkipLog, Views, collate_views
from orl.device import resolve_device
from orl.ema import update_target
from orl.models import ORLModel, build_model
from orl.schedules import ema_momentum_at, lr_at, lr_by_epoch_at, peak_lr

log = logging.getLogger(__name__)

ProgressCallback = Callable[[dict[str, Any]], None]

# Images skipped mid-run, with their reasons (orl.data.SkipLog), in the run folder.
SKIP_LOG = "skipped_images.csv"


class ConfigMismatch(ValueError):
    """An existing run in out_dir was made with a different stage or model."""


@dataclass
class RunPosition:
    """Where a run stands: its epoch, the steps done in that epoch, and the steps done in all."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


@dataclass(frozen=True)
class Schedule:
    """The learning rate and EMA momentum of each step: pure functions of the position."""

    epochs: int
    steps_per_epoch: int
    warmup_steps: int
    lr_peak: float
    warmup_ratio: float
    lr_by_epoch: bool
    ema_base: float

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def lr(self, pos: RunPosition) -> float:
        if self.lr_by_epoch:
            return lr_by_epoch_at(pos.epoch, pos.global_step, self.epochs, self.warmup_steps, self.lr_peak,
                                  self.warmup_ratio)
        return lr_at(pos.global_step, self.total_steps, self.warmup_steps, self.lr_peak)

    def momentum(self, pos: RunPosition) -> float:
        return ema_momentum_at(pos.global_step, self.total_steps, self.ema_base)


@dataclass(frozen=True)
class Run:
    """What stays the same while a run trains: its data, networks, optimiser and schedule."""

    stage: str
    cfg: Config  # with train.batch_size as used (at most the images per process)
    dataset: BYOLDataset | ORLDataset | StoreData  # StoreData: augment.backend=tensor
    sampler: ResumableSampler
    model: ORLModel  # the bare model: checkpoints and the EMA update
    net: torch.nn.Module  # what the forward pass goes through: the model or its DDP wrapper
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    weights: dict[str, float]  # loss weight per branch; a branch weighted 0 is not run
    device: torch.device
    amp: bool  # bfloat16 autocast (train.amp on CUDA, with channels_last; train.cpu_amp on the CPU)
    out: Path
    rank: int = 0
    world: int = 1
    # The DataLoader kept across epochs (train.persistent_workers), made at the first epoch.
    loaders: dict[str, torch.utils.data.DataLoader[Views]] = dataclasses.field(default_factory=dict)

    @property
    def checkpoint(self) -> Path:
        return self.out / "last.pt"


def train(
    stage: str,
    images_root: str | Path,
    out_dir: str | Path,
    cfg: Config,
    *,
    files: list[str] | None = None,
    corr: Correspondence | None = None,
    init_from: str | Path | None = None,
    device: str | None = None,
    show_progress: bool = True,
    on_progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    max_steps: int | None = None,
    rank: int = 0,
    world: int = 1,
    image_store: str | Path | None = None,
) -> dict[str, Any]:
    """Train stage "byol" on ``files`` or stage "orl" on ``corr``; returns a summary dict.

    Writes out_dir/last.pt (model, target, optimiser, schedule position, RNG, config),
    out_dir/metrics.csv (per step) and out_dir/monitor.csv (per monitored epoch; both
    :mod:`orl.runlog`), TensorBoard event files of the same values (where the ``tensorboard``
    package is installed), out_dir/skipped_images.csv (images that failed to decode mid-run and
    were replaced by the next one, with the reason) and, when finished, out_dir/backbone.pth
    (torchvision weights). ``max_steps`` stops early (tests, and the kill/resume checks); ``should_stop`` is polled
    every step (service cancel); ``on_progress`` gets a dict after every step.
    ``image_store``: the decoded-image store of ``augment.backend=tensor`` (default:
    :func:`orl.imagestore.default_store_root`).
    """
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)

    # -- data -------------------------------------------------------------------------
    dataset = _dataset(stage, images_root, cfg, files, corr, image_store)
    dataset.skip_log = SkipLog(out / SKIP_LOG)  # images that fail mid-run: skipped and recorded
    if rank == 0:
        dataset.skip_log.create()
    if isinstance(dataset, StoreData):
        # Photos decoded once into the store (new ones only), in num_workers processes.
        dataset.prepare(dev, workers=cfg.train.num_workers)
    cfg = _fit_batch_size(cfg, len(dataset), world)
    tc = cfg.train
    sampler = ResumableSampler(len(dataset), tc.batch_size, tc.seed, rank, world, drop_last=tc.drop_last)

    # -- networks -----------------------------------------------------------------------
    _seed_everything(tc.seed + rank)
    resuming = (out / "last.pt").exists()
    model, net, amp = _networks(cfg, stage, dev, world, init_from=None if resuming else init_from)

    # -- optimiser: weight decay on every parameter, plain SGD, as the authors' configs ----
    optimizer = torch.optim.SGD(list(model.trainable_parameters()), lr=0.0, momentum=tc.momentum,
                                weight_decay=tc.weight_decay, fused=_fused_sgd(dev))

    # -- schedules ----------------------------------------------------------------------
    steps_per_epoch = sampler.steps_per_epoch()
    schedule = Schedule(epochs=tc.epochs, steps_per_epoch=steps_per_epoch,
                        warmup_steps=round(tc.warmup_epochs * steps_per_epoch),
                        lr_peak=peak_lr(tc.base_lr, tc.batch_size * world), warmup_ratio=tc.warmup_ratio,
                        lr_by_epoch=tc.lr_by_epoch, ema_base=tc.ema_base)
    run = Run(stage=stage, cfg=cfg, dataset=dataset, sampler=sampler, model=model, net=net, optimizer=optimizer,
              schedule=schedule, weights={"global": tc.w_global, "intra": tc.w_intra, "inter": tc.w_inter},
              device=dev, amp=amp, out=out, rank=rank, world=world)

    # -- resume -------------------------------------------------------------------------
    pos = _resume(run) if resuming else RunPosition()

    # -- loop ---------------------------------------------------------------------------
    stopped = max_steps is not None and pos.global_step >= max_steps
    with StepLog(run, pos, show_progress, on_progress) as steps:
        while pos.epoch < tc.epochs and not stopped:
            stopped = train_one_epoch(run, pos, steps, max_steps=max_steps, should_stop=should_stop)
            if not stopped:
                pos.epoch += 1
                pos.step_in_epoch = 0
                save_run(run, pos, steps.last)
                steps.monitor(end_of_epoch(run, pos))
    finished = pos.epoch >= tc.epochs
    save_run(run, pos, steps.last, finished=finished)
    if finished and rank == 0:
        export_backbone(run.checkpoint, out / "backbone.pth")
    return {"stage": stage, "finished": finished, "stopped": stopped, "epoch": pos.epoch,
            "global_step": pos.global_step, "total_steps": schedule.total_steps, "checkpoint": str(run.checkpoint),
            "metrics": steps.last, "images": len(dataset), "batch_size": tc.batch_size, "device": str(dev),
            "skipped_images": len(dataset.skip_log.read()), "skip_log": str(dataset.skip_log.path)}


def train_one_epoch(run: Run, pos: RunPosition, steps: StepLog, *, max_steps: int | None = None,
                    should_stop: Callable[[], bool] | None = None) -> bool:
    """Run the steps of epoch ``pos.epoch`` from ``pos.step_in_epoch`` on, advancing ``pos``.

    Writes last.pt every ``train.checkpoint_every_steps`` steps. Returns True when it stopped
    before the end of the epoch: ``max_steps`` reached, or ``should_stop()`` (polled after
    every step) said so.
    """
    tc = run.cfg.train
    run.net.train()
    t_last = time.perf_counter()
    for views in epoch_batches(run, pos):
        lr = run.schedule.lr(pos)
        for g in run.optimizer.param_groups:
            g["lr"] = lr
        with _autocast(run.amp, run.device):
            # A branch weighted 0 is not run at all (no forward, no BatchNorm update),
            # so an ablation removes the branch, not just its gradient.
            ran = {b: v for b, v in views.items() if run.weights.get(b, 0) > 0}
            channels_last = run.amp and run.device.type == "cuda"
            losses: dict[str, torch.Tensor] = run.net(_to_device(ran, run.device, channels_last))
        loss = cast(torch.Tensor, sum(run.weights[b] * v for b, v in losses.items()))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss {loss.item()} at epoch {pos.epoch} step {pos.step_in_epoch}: "
                f"lower train.base_lr (now {tc.base_lr}) or check the input images")
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        m = run.schedule.momentum(pos)
        update_target(run.model.online_parameters(), run.model.target_parameters(), m)
        pos.global_step += 1
        pos.step_in_epoch += 1
        now = time.perf_counter()
        images = len(cast(tuple[torch.Tensor, torch.Tensor], views["global"])[0])  # the last batch may be smaller
        ips = images * run.world / max(1e-9, now - t_last)
        t_last = now
        steps.record({
            "epoch": pos.epoch, "step": pos.step_in_epoch, "global_step": pos.global_step,
            "total_steps": run.schedule.total_steps, "lr": lr, "momentum": m, "loss": loss.item(),
            **{f"loss_{k}": float(v.detach()) for k, v in losses.items()}, "images_per_s": ips,
        })
        if tc.checkpoint_every_steps and pos.global_step % tc.checkpoint_every_steps == 0:
            save_run(run, pos, steps.last)
        if (max_steps is not None and pos.global_step >= max_steps) or (should_stop and should_stop()):
            return True
    return False


def epoch_batches(run: Run, pos: RunPosition) -> Iterator[Views]:
    """The batches of epoch ``pos.epoch`` from step ``pos.step_in_epoch`` on.

    ``tensor`` backend: views made a batch at a time on the device, no DataLoader, each
    batch's draws seeded by its position. ``pil``: a DataLoader over the dataset (with
    ``train.persistent_workers``, one loader kept for the run), each sample's draws seeded by
    its position (:class:`orl.data.SeededKeys`), so the batches are the same whatever the
    worker count and wherever the run was resumed.
    """
    tc = run.cfg.train
    # Read once, here: the caller advances pos while this generator is suspended.
    epoch, start = pos.epoch, pos.step_in_epoch
    run.sampler.set_position(epoch, start)
    if isinstance(run.dataset, StoreData):
        indices, b = list(run.sampler), tc.batch_size
        for k, s in enumerate(range(0, len(indices), b)):
            yield run.dataset.batch(indices[s : s + b], batch_seed(tc.seed, run.rank, epoch, start + k))
        return
    persistent = tc.persistent_workers and tc.num_workers > 0
    loader = run.loaders.get("pil") if persistent else None
    if loader is None:
        loader = torch.utils.data.DataLoader(
            run.dataset, batch_size=tc.batch_size, sampler=SeededKeys(run.sampler), num_workers=tc.num_workers,
            # The sampler decides the last batch (kept unless of size 1, or train.drop_last).
            collate_fn=collate_views, drop_last=False, pin_memory=run.device.type == "cuda",
            persistent_workers=persistent,
            # The workers' own seeds; the samples do not draw from them (SeededKeys seeds each one).
            generator=torch.Generator().manual_seed(tc.seed * 7919 + epoch * 31 + start + run.rank),
        )
        if persistent:
            run.loaders["pil"] = loader
    yield from loader


class StepLog(AbstractContextManager["StepLog"]):
    """Where each step's metrics go: a row of metrics.csv and TensorBoard scalars (rank 0), the
    progress bar, ``on_progress``.

    ``last`` is the last step's metrics (with ``eta_s`` when there is an ``on_progress``): the
    checkpoint and the summary carry it. ``signals`` holds the latest monitor row's
    runlog.MONITOR_SIGNALS (and ``monitor_epoch``): every later ``on_progress`` dict carries them, so a
    job's progress keeps them however its reports are thinned out on the way to the database.
    """

    def __init__(self, run: Run, pos: RunPosition, show_progress: bool, on_progress: ProgressCallback | None):
        self.total_steps, self.on_progress = run.schedule.total_steps, on_progress
        self.file: IO[str] | None = None
        self.writer: csv.DictWriter[str] | None = None
        self.tb: Any = None
        self.signals: dict[str, Any] = {}
        if run.rank == 0:
            self.file = (run.out / runlog.METRICS_FILE).open("a", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=list(runlog.METRICS_COLUMNS))
            if self.file.tell() == 0:
                self.writer.writeheader()
            self.tb = _tensorboard(run.out, pos.global_step)
            rows = runlog.read_monitor(run.out)  # a resumed run's reports carry its last signals at once
            if rows:
                self.signals = _signals(rows[-1])
        self.last: dict[str, Any] = {}
        self.pbar = _progress_bar(self.total_steps, pos.global_step, show_progress and run.rank == 0, run.stage)
        self.t_start, self.first_step = time.time(), pos.global_step

    def record(self, metrics: dict[str, Any]) -> None:
        self.last = metrics
        if self.file is not None and self.writer is not None:
            self.writer.writerow(runlog.metrics_row({**metrics, "time": time.time()}))
            self.file.flush()
        if self.tb is not None:
            for key in TB_STEP_SCALARS:
                if metrics.get(key) is not None:
                    self.tb.add_scalar(f"train/{key}", metrics[key], metrics["global_step"])
        self.pbar.update(1)
        self.pbar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.3g}")
        if self.on_progress:
            done_here, remaining = metrics["global_step"] - self.first_step, self.total_steps - metrics["global_step"]
            metrics["eta_s"] = remaining * (time.time() - self.t_start) / max(1, done_here)
            self.on_progress({**metrics, **self.signals})

    def monitor(self, row: dict[str, Any] | None) -> None:
        """End_of_epoch's monitor row (None: the epoch was not monitored) to TensorBoard, and
        into this and every later progress report."""
        if row is None:
            return
        self.signals = _signals(row)
        if self.tb is not None:
            for key in runlog.MONITOR_SIGNALS:
                self.tb.add_scalar(f"monitor/{key}", row[key], row["global_step"])
            self.tb.flush()
        if self.on_progress and self.last:
            self.on_progress({**self.last, **self.signals})

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.pbar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


# The per-step values TensorBoard gets (tag train/<name>), at the step's global_step.
TB_STEP_SCALARS = ("loss", "loss_global", "loss_intra", "loss_inter", "lr", "momentum", "images_per_s")
_tensorboard_off_logged = False


def _tensorboard(out: Path, global_step: int) -> Any:
    """A SummaryWriter on the run folder, or None without the ``tensorboard`` package (logged
    once per process): training does not need it, so a missing package only turns this off.

    A run resumed after ``global_step`` steps passes the next step as ``purge_step``:
    TensorBoard then hides the events an earlier process logged from that step on (the steps
    being redone), so each step shows once, as in orl.runlog's reading of metrics.csv."""
    global _tensorboard_off_logged
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        if not _tensorboard_off_logged:
            log.info("TensorBoard event files are off (%s); metrics.csv and monitor.csv are written as always", exc)
            _tensorboard_off_logged = True
        return None
    return SummaryWriter(log_dir=str(out), purge_step=global_step + 1 if global_step else None)


def _signals(row: dict[str, Any]) -> dict[str, Any]:
    """A monitor row's values as progress keys."""
    return {**{k: row[k] for k in runlog.MONITOR_SIGNALS}, "monitor_epoch": row["epoch"]}


def save_run(run: Run, pos: RunPosition, metrics: dict[str, Any], finished: bool = False) -> None:
    """Write last.pt (rank 0 only): everything a resume needs to go on as if never stopped."""
    if run.rank != 0:
        return
    save_checkpoint({
        "stage": run.stage, "config": run.cfg.to_dict(), "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "position": {**dataclasses.asdict(pos), "total_steps": run.schedule.total_steps,
                     "steps_per_epoch": run.schedule.steps_per_epoch, "finished": finished},
        "rng": _get_rng(), "metrics": metrics, "images": len(run.dataset),
    }, run.checkpoint)


def end_of_epoch(run: Run, pos: RunPosition) -> dict[str, Any] | None:
    """After epoch ``pos.epoch`` (counted from 1) is saved, rank 0: the epoch snapshot
    (train.keep_snapshots) and the label-free signals (train.monitor_every_epochs), whose
    monitor.csv row it returns (None when this epoch is not monitored).

    Neither draws from the training RNG (the monitor's views come from a forked, fixed-seed
    RNG) nor changes the network (eval mode, no gradients), so a run trains the same with them."""
    tc = run.cfg.train
    if run.rank != 0:
        return None
    if tc.keep_snapshots:
        import shutil

        shutil.copyfile(run.checkpoint, run.out / f"epoch_{pos.epoch:04d}.pt")
        for old in sorted(run.out.glob("epoch_*.pt"))[: -tc.keep_snapshots]:
            old.unlink()
    if tc.monitor_every_epochs and pos.epoch % tc.monitor_every_epochs == 0:
        from orl.monitor import label_free_signals

        t = time.perf_counter()
        sig = label_free_signals(run.model.backbone, run.dataset.paths, run.cfg.augment.image_size, seed=0,
                                 n_images=tc.monitor_images, device=run.device)
        row = {**sig, "epoch": pos.epoch, "global_step": pos.global_step, "seconds": time.perf_counter() - t}
        path = run.out / runlog.MONITOR_FILE
        new = not path.exists()
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(runlog.MONITOR_COLUMNS), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        log.info("epoch %d: view top-1 %.3f (chance %.3f), effective rank %.1f of %d", pos.epoch, sig["view_top1"],
                 sig["view_top1_chance"], sig["effective_rank"], sig["effective_rank_max"])
        return row
    return None


def _dataset(stage: str, images_root: str | Path, cfg: Config, files: list[str] | None,
             corr: Correspondence | None, image_store: str | Path | None) -> BYOLDataset | ORLDataset | StoreData:
    tensor = cfg.augment.backend == "tensor"
    if stage == "byol":
        if not files:
            raise ValueError("stage byol needs a non-empty list of image files")
        if tensor:
            return store_data(stage, images_root, cfg.augment, cfg.train, files=files, store_root=image_store)
        return BYOLDataset([str(Path(images_root) / f) for f in files], cfg.augment, files=list(files))
    if stage == "orl":
        if corr is None or len(corr) == 0:
            raise ValueError("stage orl needs a correspondence with at least one image")
        if tensor:
            return store_data(stage, images_root, cfg.augment, cfg.train, corr=corr, store_root=image_store)
        return ORLDataset(images_root, corr, cfg.augment, cfg.train)
    raise ValueError(f"unknown stage {stage!r}; valid: byol, orl")


def _fit_batch_size(cfg: Config, images: int, world: int) -> Config:
    """The config with train.batch_size at most the images per process (BatchNorm needs 2)."""
    per_rank = images // world
    if per_rank < 2:
        raise ValueError(f"need at least {2 * world} images to train (BatchNorm needs 2 per batch), got {images}")
    batch = min(cfg.train.batch_size, per_rank)
    if batch != cfg.train.batch_size:
        log.warning("batch size %d > images per process %d: using %d", cfg.train.batch_size, per_rank, batch)
        cfg = cfg.override(**{"train.batch_size": batch})
    return cfg


def _networks(cfg: Config, stage: str, dev: torch.device, world: int,
              init_from: str | Path | None) -> tuple[ORLModel, torch.nn.Module, bool]:
    """The model (online + target + predictors) on ``dev``, what to run it through, and whether in bf16."""
    model = build_model(cfg.model, stage)
    if init_from is not None:
        _init_from(model, init_from)
    model.to(dev)
    amp = cfg.train.amp if dev.type == "cuda" else cfg.train.cpu_amp and dev.type == "cpu"
    if amp and dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        # In place (nn.Module.compile), so parameter names and checkpoints stay as they are.
        # Each network part on its own: the branches' inputs differ in size and presence.
        for part in (model.backbone, model.projector, model.target_backbone, model.target_projector,
                     *model.predictors.values()):
            part.compile()
    net: torch.nn.Module = model
    if world > 1:
        # SyncBN as the authors train; torch implements it for CUDA only, so CPU ranks (gloo,
        # used for tests) keep per-process BatchNorm.
        if dev.type == "cuda":
            model = cast(ORLModel, torch.nn.SyncBatchNorm.convert_sync_batchnorm(model))
        # A step may lack the intra or inter branch (images without boxes or pairs), so some
        # predictors go unused: DDP must be told to expect that.
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True)
    return model, net, amp


def _resume(run: Run) -> RunPosition:
    """Load last.pt into the model and the optimiser, restore the RNG; the position to go on from."""
    ck = load_checkpoint(run.checkpoint, map_location=run.device)
    _check_compatible(ck, run.stage, run.cfg)
    run.model.load_state_dict(ck["model"])
    run.optimizer.load_state_dict(ck["optimizer"])
    for group in run.optimizer.param_groups:
        # load_state_dict brings the saved run's implementation flags too; a run resumed on
        # another kind of device keeps its own (a fused CUDA kernel cannot step CPU tensors).
        group["fused"], group["foreach"] = _fused_sgd(run.device), None
    p = ck["position"]
    pos = RunPosition(epoch=p["epoch"], step_in_epoch=p["step_in_epoch"], global_step=p["global_step"])
    _set_rng(ck["rng"])
    log.info("resumed %s at epoch %d step %d (global %d)", run.checkpoint, pos.epoch, pos.step_in_epoch,
             pos.global_step)
    return pos


def _fused_sgd(dev: torch.device) -> bool | None:
    """SGD's implementation: on CUDA the fused kernel (one launch for every parameter); on the
    CPU torch's default (None), as before."""
    return True if dev.type == "cuda" else None


def _autocast(amp: bool, dev: torch.device) -> AbstractContextManager[Any]:
    return torch.autocast(dev.type, dtype=torch.bfloat16) if amp else nullcontext()


def _to_device(views: dict[str, tuple[torch.Tensor, torch.Tensor] | None], dev: torch.device,
               channels_last: bool) -> dict[str, tuple[torch.Tensor, ...] | None]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {b: None if pair is None else tuple(t.to(dev, non_blocking=True).contiguous(memory_format=fmt) for t in pair)
            for b, pair in views.items()}


def _init_from(model: ORLModel, path: str | Path) -> None:
    """Start stage 3 from a stage-1 checkpoint: backbone, projector, target and global predictor."""
    ck = load_checkpoint(path)
    if Config.from_dict(ck["config"]).model != model.cfg:
        raise ConfigMismatch(f"{path} was trained with a different model config; use the same --preset")
    src = ck["model"]
    own = model.state_dict()
    loaded = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(loaded, strict=False)
    log.info("initialised %d tensors from %s", len(loaded), path)


def _check_compatible(ck: dict[str, Any], stage: str, cfg: Config) -> None:
    old = Config.from_dict(ck["config"])
    if ck["stage"] != stage or old.model != cfg.model:
        raise ConfigMismatch(
            f"the run in this folder is stage {ck['stage']} with {old.model}; this command asks for stage "
            f"{stage} with {cfg.model}. Use a new --out folder, or the same options to resume.")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _get_rng() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _progress_bar(total: int, initial: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True)
