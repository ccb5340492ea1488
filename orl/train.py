"""One readable training loop for stage 1 (BYOL) and stage 3 (ORL).

``train`` reads top to bottom as the list of steps: data, networks, optimiser, schedules,
resume, loop. The same call starts a run or resumes it from ``out_dir/last.pt``.
"""

from __future__ import annotations

import csv
import logging
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from orl.checkpoint import export_backbone, load_checkpoint, save_checkpoint
from orl.config import Config
from orl.correspondence import Correspondence
from orl.data import BYOLDataset, ORLDataset, ResumableSampler, collate_views
from orl.device import resolve_device
from orl.ema import update_target
from orl.models import ORLModel, build_model
from orl.schedules import ema_momentum_at, lr_at, lr_by_epoch_at, peak_lr

log = logging.getLogger(__name__)

ProgressCallback = Callable[[dict[str, Any]], None]


class ConfigMismatch(ValueError):
    """An existing run in out_dir was made with a different stage or model."""


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
) -> dict[str, Any]:
    """Train stage "byol" on ``files`` or stage "orl" on ``corr``; returns a summary dict.

    Writes out_dir/last.pt (model, target, optimiser, schedule position, RNG, config),
    out_dir/metrics.csv and, when finished, out_dir/backbone.pth (torchvision weights).
    ``max_steps`` stops early (tests, and the kill/resume checks); ``should_stop`` is polled
    every step (service cancel); ``on_progress`` gets a dict after every step.
    """
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    tc = cfg.train

    # -- data -------------------------------------------------------------------------
    if stage == "byol":
        if not files:
            raise ValueError("stage byol needs a non-empty list of image files")
        dataset = BYOLDataset([str(Path(images_root) / f) for f in files], cfg.augment)
    elif stage == "orl":
        if corr is None or len(corr) == 0:
            raise ValueError("stage orl needs a correspondence with at least one image")
        dataset = ORLDataset(images_root, corr, cfg.augment, tc)
    else:
        raise ValueError(f"unknown stage {stage!r}; valid: byol, orl")
    per_rank = len(dataset) // world
    if per_rank < 2:
        raise ValueError(f"need at least {2 * world} images to train (BatchNorm needs 2 per batch), got {len(dataset)}")
    batch = min(tc.batch_size, per_rank)
    if batch != tc.batch_size:
        log.warning("batch size %d > images per process %d: using %d", tc.batch_size, per_rank, batch)
        cfg = cfg.override(**{"train.batch_size": batch})
        tc = cfg.train
    sampler = ResumableSampler(len(dataset), batch, tc.seed, rank, world, drop_last=tc.drop_last)
    steps_per_epoch = sampler.steps_per_epoch()
    total_steps = steps_per_epoch * tc.epochs

    # -- networks and optimiser ---------------------------------------------------------
    _seed_everything(tc.seed + rank)
    model = build_model(cfg.model, stage)
    if init_from is not None and not (out / "last.pt").exists():
        _init_from(model, init_from)
    model.to(dev)
    use_amp = tc.amp and dev.type == "cuda"
    if use_amp:
        model = model.to(memory_format=torch.channels_last)
    net: torch.nn.Module = model
    if world > 1:
        # SyncBN as the authors train; torch implements it for CUDA only, so CPU ranks (gloo,
        # used for tests) keep per-process BatchNorm.
        if dev.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # A step may lack the intra or inter branch (images without boxes or pairs), so some
        # predictors go unused: DDP must be told to expect that.
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True)
    # Weight decay on every parameter, plain SGD: as the authors' configs.
    optimizer = torch.optim.SGD(list(model.trainable_parameters()), lr=0.0, momentum=tc.momentum,
                                weight_decay=tc.weight_decay)
    lr_peak = peak_lr(tc.base_lr, batch * world)
    weights = {"global": tc.w_global, "intra": tc.w_intra, "inter": tc.w_inter}
    warmup_steps = round(tc.warmup_epochs * steps_per_epoch)

    # -- resume -------------------------------------------------------------------------
    epoch, step_in_epoch, global_step = 0, 0, 0
    ckpt_path = out / "last.pt"
    if ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, map_location=dev)
        _check_compatible(ck, stage, cfg)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        pos = ck["position"]
        epoch, step_in_epoch, global_step = pos["epoch"], pos["step_in_epoch"], pos["global_step"]
        _set_rng(ck["rng"])
        log.info("resumed %s at epoch %d step %d (global %d)", ckpt_path, epoch, step_in_epoch, global_step)

    def save(finished: bool = False) -> None:
        if rank != 0:
            return
        save_checkpoint({
            "stage": stage, "config": cfg.to_dict(), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "position": {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                         "total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "finished": finished},
            "rng": _get_rng(), "metrics": last_metrics, "images": len(dataset),
        }, ckpt_path)

    # -- loop ---------------------------------------------------------------------------
    metrics_file = (out / "metrics.csv").open("a", newline="") if rank == 0 else None
    writer = csv.writer(metrics_file) if metrics_file else None
    if metrics_file and metrics_file.tell() == 0:
        writer.writerow(["epoch", "step", "global_step", "lr", "momentum", "loss", "loss_global",
                         "loss_intra", "loss_inter", "images_per_s", "time"])
    last_metrics: dict[str, Any] = {}
    pbar = _progress_bar(total_steps, global_step, show_progress and rank == 0, stage)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext
    t_start = time.time()
    steps_done_here = 0
    stopped = max_steps is not None and global_step >= max_steps
    try:
        while epoch < tc.epochs and not stopped:
            sampler.set_position(epoch, step_in_epoch)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=batch, sampler=sampler, num_workers=tc.num_workers,
                # The sampler decides the last batch (kept unless of size 1, or train.drop_last).
                collate_fn=collate_views, drop_last=False, pin_memory=dev.type == "cuda",
                persistent_workers=False,
                generator=torch.Generator().manual_seed(tc.seed * 7919 + epoch * 31 + step_in_epoch + rank),
            )
            net.train()
            t_last = time.perf_counter()
            for views in loader:
                lr = (lr_by_epoch_at(epoch, global_step, tc.epochs, warmup_steps, lr_peak, tc.warmup_ratio)
                      if tc.lr_by_epoch else lr_at(global_step, total_steps, warmup_steps, lr_peak))
                for g in optimizer.param_groups:
                    g["lr"] = lr
                with autocast():
                    # A branch weighted 0 is not run at all (no forward, no BatchNorm update),
                    # so an ablation removes the branch, not just its gradient.
                    losses = net(_to_device({b: v for b, v in views.items() if weights.get(b, 0) > 0}, dev, use_amp))
                loss = sum(weights[b] * v for b, v in losses.items())
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss {loss.item()} at epoch {epoch} step {step_in_epoch}: "
                        f"lower train.base_lr (now {tc.base_lr}) or check the input images")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                m = ema_momentum_at(global_step, total_steps, tc.ema_base)
                update_target(model.online_parameters(), model.target_parameters(), m)
                global_step += 1
                step_in_epoch += 1
                steps_done_here += 1
                now = time.perf_counter()
                ips = len(views["global"][0]) * world / max(1e-9, now - t_last)  # last batch may be smaller
                t_last = now
                last_metrics = {
                    "epoch": epoch, "step": step_in_epoch, "global_step": global_step, "total_steps": total_steps,
                    "lr": lr, "momentum": m, "loss": loss.item(),
                    **{f"loss_{k}": float(v.detach()) for k, v in losses.items()}, "images_per_s": ips,
                }
                if writer:
                    writer.writerow([epoch, step_in_epoch, global_step, f"{lr:.6g}", f"{m:.6f}", f"{loss.item():.5f}",
                                     _fmt(losses.get("global")), _fmt(losses.get("intra")), _fmt(losses.get("inter")),
                                     f"{ips:.2f}", f"{time.time():.1f}"])
                    metrics_file.flush()
                pbar.update(1)
                pbar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
                if on_progress:
                    remaining = total_steps - global_step
                    last_metrics["eta_s"] = remaining * (time.time() - t_start) / max(1, steps_done_here)
                    on_progress(dict(last_metrics))
                if tc.checkpoint_every_steps and global_step % tc.checkpoint_every_steps == 0:
                    save()
                if (max_steps is not None and global_step >= max_steps) or (should_stop and should_stop()):
                    stopped = True
                    break
            if not stopped:
                epoch += 1
                step_in_epoch = 0
                save()
    finally:
        pbar.close()
        if metrics_file:
            metrics_file.close()
    finished = epoch >= tc.epochs
    save(finished=finished)
    if finished and rank == 0:
        export_backbone(ckpt_path, out / "backbone.pth")
    return {"stage": stage, "finished": finished, "stopped": stopped, "epoch": epoch, "global_step": global_step,
            "total_steps": total_steps, "checkpoint": str(ckpt_path), "metrics": last_metrics,
            "images": len(dataset), "batch_size": batch, "device": str(dev)}


def _to_device(views: dict, dev: torch.device, channels_last: bool) -> dict:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {b: None if pair is None else tuple(t.to(dev, non_blocking=True).contiguous(memory_format=fmt) for t in pair)
            for b, pair in views.items()}


def _fmt(v) -> str:
    return "" if v is None else f"{float(v.detach()):.5f}"


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


def _check_compatible(ck: dict, stage: str, cfg: Config) -> None:
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


def _progress_bar(total: int, initial: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True)
