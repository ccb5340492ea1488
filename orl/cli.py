"""Command-line interface: ``orl pretrain | mine | train | eval | attention | ...``.

Outside scripts rely on the five main commands and their options; add options freely,
never rename. Exit codes: 0 success, 2 bad input (the message says what to change),
1 an unexpected internal error (with a traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from orl.config import (
    CONFIG_FILE,
    PRESETS,
    SECTIONS,
    SS_MODES,
    Config,
    ConfigError,
    apply_overrides,
    default_preset,
    get_preset,
    read_config_file,
    save_config,
)
from orl.device import plan_threads, resolve_device, set_threads

if TYPE_CHECKING:
    import torch

    from orl.models import ORLModel

log = logging.getLogger("orl")


class CLIError(Exception):
    """Bad input from the user; printed without a traceback, exit code 2."""


# -- shared option helpers ------------------------------------------------------------------

def _add_common(p: argparse.ArgumentParser, preset: bool = True) -> None:
    if preset:
        p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="configuration preset: tiny (seconds on CPU, tests), cpu (2 CPU cores, tens of "
                            "minutes), paper (ResNet-50, the paper's hyper-parameters). Default: the config file's "
                            "preset, else (mine) the checkpoint's or (train) the mining run's configuration, else "
                            "paper when --device is a CUDA device, else cpu")
        p.add_argument("--config", metavar="FILE",
                       help="YAML config file: an optional `preset:` and sections model, augment, train, mine "
                            "with any of their fields (a run's config.yaml works too). Applied after the preset, "
                            "before the other options")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="override any config field after --config, e.g. --set train.base_lr=0.3 "
                            "--set mine.roi_mode=roi_align --set mine.ss_max_side_px=full (sections: model, "
                            "augment, train, mine); repeatable")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch and the numeric libraries (default: all cores). On a shared "
                        "machine set it to the cores you may use: with more threads than free cores, they wait "
                        "on one another")
    p.add_argument("--quiet", action="store_true", help="no progress bars or info logs")


def _add_train_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, help="number of epochs (preset default otherwise)")
    p.add_argument("--batch-size", type=int, help="images per step (preset default otherwise)")
    p.add_argument("--lr", type=float, help="base learning rate per 256 images (lr = base x batch / 256)")
    p.add_argument("--workers", type=int, help="data-loading worker processes")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps in total (checkpointed; "
                                                 "rerun the same command without it to continue)")


def _config(args: argparse.Namespace, base: Config | None = None, *, named: dict[str, Any] | None = None,
            mine_only: bool = False) -> Config:
    """preset -> ``--config`` file -> named options (``--epochs`` ...) -> ``--set``, in that order.

    The preset is ``--preset``, else the file's ``preset:``, else ``base`` (the checkpoint a run
    starts from), else the default rule (``default_preset``: paper on a CUDA device, else cpu).
    With ``mine_only`` (stage 2) only the mining options are taken from the result: the model and
    the rest are the checkpoint's (a config file shared by all three commands works unchanged).
    Every override goes through ``apply_overrides`` and ``Config.validate``,
    like the services' job params.
    """
    try:
        file_preset, file_over = read_config_file(args.config) if args.config else (None, {})
        name = args.preset or file_preset
        if name is None:
            cfg = base if base is not None else get_preset(default_preset(_device(args)))
        else:
            cfg = get_preset(name)
        dotted: dict[str, Any] = dict(file_over)
        for k, attr in (("train.epochs", "epochs"), ("train.batch_size", "batch_size"), ("train.base_lr", "lr"),
                        ("train.num_workers", "workers"), ("train.seed", "seed")):
            if getattr(args, attr, None) is not None:
                dotted[k] = getattr(args, attr)
        dotted.update(named or {})
        for item in args.overrides:
            key, sep, raw = item.partition("=")
            if not sep or "." not in key:
                raise ConfigError(key, f"--set expects SECTION.FIELD=VALUE with SECTION in {', '.join(SECTIONS)}; "
                                       f"got {item!r}")
            dotted[key.strip()] = raw
        cfg = apply_overrides(cfg, dotted)
        if mine_only and base is not None:
            cfg = replace(base, preset=cfg.preset, mine=cfg.mine).validate()
        return cfg
    except ConfigError as exc:
        raise CLIError(str(exc)) from None


def _save_config(cfg: Config, folder: str | Path) -> None:
    path = save_config(cfg, folder)
    log.info("resolved configuration -> %s", path)


def _images(root: str) -> list[str]:
    from orl.images import list_images

    try:
        files = list_images(root)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise CLIError(str(exc)) from exc
    if not files:
        raise CLIError(f"no image files (jpg, png, bmp, webp, tif) found under {root}")
    return files


def _scan(root: str) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(usable files, {file: reason refused}, {file: conversion note}) from the headers."""
    from orl.images import scan_images

    good, bad, notes = scan_images(root, _images(root))
    for f, reason in bad.items():
        log.warning("skipping %s: %s", f, reason)
    if not good:
        raise CLIError(f"no readable images under {root} ({len(bad)} files refused: "
                       f"{'; '.join(f'{f}: {r}' for f, r in list(bad.items())[:3])})")
    return good, bad, notes


def _write_image_status(out_dir: Path, good: list[str], bad: dict[str, str], notes: dict[str, str],
                        skipped: dict[str, str] | None = None) -> None:
    """RUN_DIR/image_status.csv: every file ok (with the conversion applied) or failed (why)."""
    import csv
    import io

    from orl.fileio import atomic_write_text

    skipped = skipped or {}
    rows = [["file", "status", "reason"]]
    rows += [[f, "failed", f"skipped in training: {skipped[f]}"] if f in skipped else [f, "ok", notes.get(f, "")]
             for f in good]
    rows += [[f, "failed", reason] for f, reason in bad.items()]
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "image_status.csv", buf.getvalue())


def _device(args: argparse.Namespace) -> str:
    return str(resolve_device(args.device))


def _load_model(path: str, device: str) -> tuple[ORLModel, Config, dict[str, Any], torch.device]:
    from orl.checkpoint import CheckpointError, load_model

    try:
        model, cfg, ck = load_model(path, map_location="cpu")
    except CheckpointError as exc:
        raise CLIError(str(exc)) from exc
    dev = resolve_device(device)
    return model.to(dev), cfg, ck, dev


# -- commands -----------------------------------------------------------------------------

def cmd_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    from orl.data import SkipLog
    from orl.train import train

    out = Path(args.out)
    cfg = _config(args)
    files, bad, notes = _scan(args.images)
    _write_image_status(out, files, bad, notes)
    _save_config(cfg, out)
    log.info("stage 1 (BYOL): %d images, preset %s, %d epochs -> %s", len(files), cfg.preset, cfg.train.epochs, out)
    summary = train("byol", args.images, out, cfg, files=files, device=args.device, show_progress=not args.quiet,
                    max_steps=args.max_steps)
    # Files that passed the header scan but failed to decode in training become failed rows.
    _write_image_status(out, files, bad, notes, SkipLog(summary["skip_log"]).read())
    return {**summary, "failed_images": len(bad) + summary["skipped_images"],
            "image_status": str(out / "image_status.csv")}


def _mine_config(args: argparse.Namespace, checkpoint_cfg: Config) -> Config:
    """Stage 2's configuration: the checkpoint's, with the mining options of the command line.

    The selective-search process count is a resource of this machine, not of the checkpoint:
    it comes from this command (``--ss-workers``, ``--set``, ``--config``) or from the cores
    given (orl.device.plan_threads), never from the machine that trained the checkpoint.
    """
    named = {f"mine.{k}": v for k, v in (("roi_mode", args.roi_mode), ("ss_max_side_px", args.ss_max_side),
                                         ("ss_mode", args.ss_mode), ("ss_workers", args.ss_workers))
             if v is not None}
    base = replace(checkpoint_cfg, mine=replace(checkpoint_cfg.mine, ss_workers=None))
    return _config(args, base=base, named=named, mine_only=True)


def cmd_mine(args: argparse.Namespace) -> dict[str, Any]:
    from orl.mining import mine

    model, ckcfg, ck, dev = _load_model(args.checkpoint, args.device)
    cfg = _mine_config(args, ckcfg)
    mc = cfg.mine
    files, refused, _ = _scan(args.images)
    _save_config(cfg, args.out)
    # --threads (else every core) decides torch, BLAS, decoding and selective-search counts.
    threads = plan_threads(args.threads, ss_processes=mc.ss_workers)
    log.info("stage 2: %d images, roi_mode %s, selective search %s at max side %s, %d process(es), %d thread(s) "
             "-> %s", len(files), mc.roi_mode, mc.ss_mode, mc.ss_max_side_px or "full resolution",
             threads.ss_processes, threads.threads, args.out)
    progress = _Progress(not args.quiet)
    info = {"checkpoint": str(Path(args.checkpoint).resolve()), "images_root": str(Path(args.images).resolve())}
    corr, stats = mine(model, args.images, files, args.out, mc, dev, threads=threads, progress=progress, info=info,
                       refused=refused)
    progress.close()
    return {"correspondence": str(Path(args.out) / "correspondence.json"),
            "image_status": str(Path(args.out) / "image_status.csv"), "images": len(corr),
            "failed_images": stats["failed_images"], "images_without_boxes": stats["images_without_boxes"],
            "pairs": stats["pairs"], "seconds": stats["seconds"]}


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from orl.correspondence import Correspondence
    from orl.train import train

    try:
        corr = Correspondence.load(args.pairs)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from exc
    # A wrong --images folder misses (nearly) all of them; a few missing files are skipped and
    # recorded in RUN_DIR/skipped_images.csv like any image that fails mid-run.
    sample = corr.files[:20]
    missing = [f for f in sample if not (Path(args.images) / f).is_file()]
    if len(missing) * 2 > len(sample):
        raise CLIError(f"{len(missing)} of the first {len(sample)} images in {args.pairs} are not under "
                       f"{args.images} (e.g. {missing[0]}): pass the --images folder that was mined")
    cfg = _config(args, base=_mined_config(args.pairs))
    out = Path(args.out)
    _save_config(cfg, out)
    log.info("stage 3 (ORL): %d images, %d mined pairs, preset %s, %d epochs -> %s", len(corr), corr.num_pairs,
             cfg.preset, cfg.train.epochs, out)
    try:
        return train("orl", args.images, out, cfg, corr=corr, init_from=args.init_from, device=args.device,
                     show_progress=not args.quiet, max_steps=args.max_steps)
    except Exception as exc:
        from orl.checkpoint import CheckpointError
        if isinstance(exc, CheckpointError):
            raise CLIError(str(exc)) from exc
        raise


def _mined_config(pairs: str) -> Config | None:
    """The configuration the pairs were mined with (MINE_DIR/config.yaml, written by ``orl mine``),
    so stage 3 defaults to the stage-1 run's model and sizes; None for other pairs files."""
    p = Path(pairs)
    path = (p if p.is_dir() else p.parent) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        preset, over = read_config_file(path)
        return apply_overrides(get_preset(preset or "paper"), over)
    except ConfigError as exc:
        raise CLIError(f"{exc} (the configuration saved next to the pairs; pass --preset or --config)") from None


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from orl.checkpoint import CheckpointError
    from orl.evaluate import evaluate_checkpoint

    _images(args.images)
    try:
        result = evaluate_checkpoint(args.checkpoint, args.images, args.labels, out=args.out, device=_device(args))
    except CheckpointError as exc:
        raise CLIError(str(exc)) from exc
    if args.pairs:
        from orl.correspondence import Correspondence
        from orl.labels import load_labels
        from orl.metrics import correspondence_precision

        result["correspondence"] = correspondence_precision(Correspondence.load(args.pairs),
                                                            load_labels(args.images, args.labels))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return result


def cmd_attention(args: argparse.Namespace) -> dict[str, Any]:
    from orl.attention import render_attention
    from orl.checkpoint import CheckpointError
    from orl.images import ImageError

    try:
        render_attention(args.checkpoint, args.image, args.out, opacity=args.opacity, device=_device(args),
                         method=args.method)
    except (CheckpointError, ImageError) as exc:
        raise CLIError(str(exc)) from exc
    return {"attention": args.out}


def cmd_render_pairs(args: argparse.Namespace) -> dict[str, Any]:
    from orl.correspondence import Correspondence
    from orl.render import render_top_pairs

    try:
        corr = Correspondence.load(args.pairs)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from exc
    paths = render_top_pairs(corr, args.images, args.out, n=args.n)
    return {"rendered": [str(p) for p in paths]}


def cmd_export_pairs(args: argparse.Namespace) -> dict[str, Any]:
    from orl import annotation_formats as af
    from orl.correspondence import Correspondence
    from orl.fileio import atomic_path, atomic_write_text

    if args.image_url_prefix is not None and args.format != "labelstudio":
        raise CLIError(f"--image-url-prefix applies to --format labelstudio only (got --format {args.format})")
    try:
        corr = Correspondence.load(args.pairs)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from exc
    out = Path(args.out)
    written = {args.format: str(out)}
    if args.format == "labelstudio":
        prefix = args.image_url_prefix if args.image_url_prefix is not None else af.LABELSTUDIO_LOCAL_FILES
        chunks = af.labelstudio_tasks_json(af.correspondence_records(corr), lambda img: prefix + quote(img.file),
                                           "orl-mine")
        config = out.with_name(out.stem + ".labelstudio.xml")
        atomic_write_text(config, af.LABELSTUDIO_CONFIG)
        written["labeling_config"] = str(config)
    else:
        chunks = af.coco_json(af.CocoSource(images=lambda: af.correspondence_images(corr),
                                            records=lambda: af.correspondence_records(corr),
                                            info={"description": "ORL mined pairs: two boxes per pair, linked in "
                                                                 "'pairs'", **corr.info}))
    with atomic_path(out) as tmp, open(tmp, "w") as f:  # streamed: a big job's file never sits in memory
        f.writelines(chunks)
    return {**written, "images": len(corr), "pairs": corr.num_pairs}


def cmd_export_backbone(args: argparse.Namespace) -> dict[str, Any]:
    from orl.checkpoint import CheckpointError, ExportError, export_backbone

    if args.input_size is not None and args.input_size < 32:
        raise CLIError(f"--input-size must be at least 32 px (got {args.input_size})")
    try:
        written = export_backbone(args.checkpoint, args.out, args.format, args.input_size)
    except (CheckpointError, ExportError) as exc:
        raise CLIError(str(exc)) from exc
    return {"backbone": args.out, **written}


class _Progress:
    """tqdm bars for the mining steps, one per step name."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit="img", dynamic_ncols=True)
        bar.n = done
        bar.refresh()

    def close(self) -> None:
        for b in self.bars.values():
            b.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orl", description="ORL: object-level self-supervised pre-training from scene "
                                "images. Stage 1 `pretrain` (BYOL) -> stage 2 `mine` (correspondences) -> stage 3 "
                                "`train` (ORL).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("pretrain", help="stage 1: image-level BYOL pre-training on a folder of images",
                       description="Stage 1: BYOL on every image under --images (recursively). Writes RUN_DIR/last.pt "
                                   "(checkpoint with its config), metrics.csv, image_status.csv and, when finished, "
                                   "backbone.pth. Rerunning the same command resumes an interrupted run.")
    s.add_argument("--images", required=True, help="folder of images, searched recursively; labels are never read")
    s.add_argument("--out", required=True, help="run folder (created; an existing run there is resumed)")
    _add_common(s)
    _add_train_opts(s)
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("mine", help="stage 2: image KNN, selective search, RoI-pair retrieval",
                       description="Stage 2 with a stage-1 checkpoint: image embeddings + exact cosine KNN, selective "
                                   "search + the official box filter, RoI embeddings, top pairs per neighbour. Writes "
                                   "MINE_DIR/correspondence.json (the authors' layout plus scores), image_status.csv "
                                   "(each image ok / no_boxes / failed, with the reason), proposals.jsonl (resumable "
                                   "cache) and mine_stats.json. Mining options default to the checkpoint's preset.")
    s.add_argument("--images", required=True, help="folder of images (recursively)")
    s.add_argument("--checkpoint", required=True, help="stage-1 checkpoint (RUN_DIR/last.pt)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--roi-mode", choices=["crop", "roi_align"], help="RoI features: crop (faithful, each box warped "
                   "and encoded) or roi_align (one backbone pass per image)")
    s.add_argument("--ss-max-side", help="downscale images to this longer side (px) before selective search; "
                   "'full' for the authors' full-resolution path")
    s.add_argument("--ss-mode", choices=list(SS_MODES),
                   help="region proposals: fast (the authors' selective search), quality, single (one "
                        "segmentation and strategy), felzenszwalb (graph segments' boxes, no grouping)")
    s.add_argument("--ss-workers", type=int, help="selective-search worker processes (default: one per core "
                   "given by --threads, else per core of the machine)")
    _add_common(s)
    s.set_defaults(func=cmd_mine)

    s = sub.add_parser("train", help="stage 3: ORL pre-training with global, intra-RoI and inter-RoI losses",
                       description="Stage 3 on the mined pairs. Starts from random weights as the authors do, or from "
                                   "a stage-1 checkpoint with --init-from. Writes RUN_DIR/last.pt, metrics.csv, "
                                   "backbone.pth; the same command resumes.")
    s.add_argument("--images", required=True, help="the folder that was mined")
    s.add_argument("--pairs", required=True, help="MINE_DIR or a correspondence.json (the authors' files work too)")
    s.add_argument("--out", required=True, help="run folder")
    s.add_argument("--init-from", help="initialise from this stage-1 checkpoint instead of random weights")
    _add_common(s)
    _add_train_opts(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="frozen-feature evaluation against ground-truth labels",
                       description="Object-level probe (kNN and linear) on ground-truth box crops, and the authors' "
                                   "VOC07-style linear SVM on whole images. Fits on the train split, scores on val "
                                   "(splits from folder names like train2017/val2017, else a fixed hash split).")
    s.add_argument("--checkpoint", required=True, help="checkpoint to evaluate (any stage)")
    s.add_argument("--images", required=True, help="folder of images")
    s.add_argument("--labels", required=True, help="YOLO label folder (like coco128/labels) or a COCO instances json "
                                                   "(or a folder of instances_*.json)")
    s.add_argument("--out", help="write the results as JSON here")
    s.add_argument("--pairs", help="also score mined pairs (MINE_DIR or correspondence.json) against the labels: "
                                   "precision of mined pairs next to random box pairs from the same neighbour images")
    _add_common(s, preset=False)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("attention", help="render an attention heatmap overlay of one image as PNG")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--image", required=True)
    s.add_argument("--out", required=True, help="PNG file to write")
    s.add_argument("--opacity", type=float, default=0.5, help="heatmap opacity in [0, 1] (default 0.5)")
    s.add_argument("--method", default="similarity", help="attention method (see docs/ARCHITECTURE.md)")
    _add_common(s, preset=False)
    s.set_defaults(func=cmd_attention)

    s = sub.add_parser("render-pairs", help="render the best mined pairs as PNG files")
    s.add_argument("--pairs", required=True, help="MINE_DIR or correspondence.json")
    s.add_argument("--images", required=True, help="the folder that was mined")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n", type=int, default=16, help="how many pairs (default 16)")
    _add_common(s, preset=False)
    s.set_defaults(func=cmd_render_pairs)

    s = sub.add_parser("export-pairs", help="write mined pairs for Label Studio (tasks json) or FiftyOne (COCO json)",
                       description="labelstudio: one task per pair with both images and the two boxes as a "
                                   "prediction linked by a relation; its labeling config is written beside --out "
                                   "(NAME.labelstudio.xml). coco: the images, two box annotations per pair and a "
                                   "'pairs' list linking them; FiftyOne's COCODetectionDataset and pycocotools "
                                   "load it with the mined folder as the images' root.")
    s.add_argument("--pairs", required=True, help="MINE_DIR or correspondence.json")
    s.add_argument("--format", choices=["labelstudio", "coco"], required=True)
    s.add_argument("--out", required=True, help="json file to write")
    s.add_argument("--image-url-prefix", metavar="URL",
                   help="labelstudio: image URL = this + the image's path under the mined folder (default "
                        "'/data/local-files/?d=': Label Studio's local files with the mined folder as document root)")
    _add_common(s, preset=False)
    s.set_defaults(func=cmd_export_pairs)

    s = sub.add_parser("export-backbone", help="write the backbone: torchvision weights, TorchScript or ONNX",
                       description="Write a checkpoint's online backbone. torchvision (default): a state dict "
                                   "that torchvision's ResNet loads (strict=False: fc is left out). torchscript / "
                                   "onnx: a self-contained model from normalised images (N, 3, H, W) to pooled "
                                   "features (N, C), any batch and image size; onnx needs `pip install onnx`.")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--format", choices=["torchvision", "torchscript", "onnx"], default="torchvision",
                   help="torchvision state dict (default), TorchScript (torch.jit.load) or ONNX")
    s.add_argument("--input-size", type=int, metavar="PX",
                   help="image side the model is traced at (torchscript, onnx; default: the training size)")
    _add_common(s, preset=False)
    s.set_defaults(func=cmd_export_backbone)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            print(f"orl {args.command}: error: --threads must be at least 1 (got {args.threads})", file=sys.stderr)
            return 2
        set_threads(args.threads)
    try:
        result = args.func(args)
    except CLIError as exc:
        print(f"orl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"orl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad options that surfaced deeper (unknown backbone, mode, ...)
        print(f"orl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
