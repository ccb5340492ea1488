"""Checkpoints: everything a resume or an evaluation needs, and backbone-only exports.

A checkpoint is a dict with: ``format`` (version tag), ``stage`` ("byol" | "orl"),
``config`` (Config.to_dict()), ``model`` (state dict of ORLModel, online + target + predictors),
``optimizer``, ``position`` ({epoch, step_in_epoch, global_step, total_steps}),
``rng`` (python, numpy, torch and cuda states) and ``metrics`` (last logged values).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from orl.config import Config
from orl.fileio import atomic_path
from orl.models import ORLModel, build_model

FORMAT = "orl-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or not an ORL checkpoint."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write atomically (temp file + rename), so a kill mid-write never corrupts last.pt.

    A failed write (full disk, file size limit, I/O error) raises OSError naming the file and
    the cause, and leaves the previous ``path`` as it was, so a resume loads the last complete
    checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch({"format": FORMAT, **state}, path)


class _Sink:
    """A file for ``torch.save`` that remembers the OSError of a failed write: torch replaces
    it by ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos ...``, which
    says nothing about a full disk."""

    def __init__(self, fh: Any):
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically and durably (fsync before the rename: after a crash
    of the machine the file is the old one or the complete new one); a failed write is an
    OSError with its errno (ENOSPC, EFBIG, EIO, EROFS ...) and a message naming the file."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            sink = _Sink(fh)
            try:
                torch.save(obj, sink)  # type: ignore[arg-type]  # any object with write() and flush()
            except RuntimeError as exc:
                if sink.error is None:
                    raise
                raise sink.error from exc
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        free = ""
        try:
            free = f"; {shutil.disk_usage(path.parent).free / 1e6:.1f} MB free there"
        except OSError:
            pass
        kept = "; the previous file is unchanged" if path.exists() else ""
        msg = f"cannot write {path}: {exc.strerror or exc}{free}{kept}"
        raise (OSError(exc.errno, msg) if exc.errno else OSError(msg)) from exc


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ORL checkpoint (expected format {FORMAT})")
    return ckpt


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu",
               ) -> tuple[ORLModel, Config, dict[str, Any]]:
    """Rebuild the exact model a checkpoint was trained with. Returns (model, config, ckpt)."""
    ckpt = load_checkpoint(path, map_location)
    cfg = Config.from_dict(ckpt["config"])
    model = build_model(cfg.model, ckpt["stage"])
    model.load_state_dict(ckpt["model"])
    return model, cfg, ckpt


EXPORT_FORMATS = ("torchvision", "torchscript", "onnx")


class ExportError(RuntimeError):
    """An export that cannot be made here (a missing optional package); the message says what to install."""


def export_backbone(path: str | os.PathLike, out: str | os.PathLike, fmt: str = "torchvision",
                    input_size: int | None = None) -> dict[str, Any]:
    """Write a checkpoint's online backbone; returns what was written.

    ``torchvision``: the ResNet state dict without ``fc``;
    ``torchvision.models.resnet50().load_state_dict(torch.load(out), strict=False)`` loads it and
    reports only ``fc.weight`` / ``fc.bias`` missing. ``torchscript`` and ``onnx``: the backbone as a
    self-contained model, images (N, 3, H, W), normalised like training, to pooled res5 features
    (N, C), traced at ``input_size`` px (default: the training size); both accept other sizes and
    batch sizes. ONNX uses the TorchScript-based exporter (the dynamo one needs onnxscript
    besides onnx) and is checked with ``onnx.checker``; it needs the ``onnx`` package.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    if fmt == "torchvision":
        ckpt = load_checkpoint(path)
        prefix = "backbone.net."
        sd = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
        save_torch(sd, out)
        return {"format": fmt, "path": str(out), "tensors": len(sd)}
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:
        raise ExportError("ONNX export needs the onnx package: pip install onnx (or export --format torchscript)")
    model, cfg, _ = load_model(path)
    net = model.backbone.eval()
    size = int(input_size or cfg.augment.image_size)
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.14 marks both exporters deprecated (FutureWarning / DeprecationWarning) in favour
        # of torch.export; they still work and the tests load every file back. A user can do
        # nothing about these lines, so they are not printed.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(torch\.onnx|orl\.checkpoint)")
        dim = int(net(example).shape[1])
        with atomic_path(out) as tmp:
            if fmt == "torchscript":
                torch.jit.trace(net, example).save(str(tmp))
            else:
                _export_onnx(net, example, tmp)
    return {"format": fmt, "path": str(out), "input": ["N", 3, "H", "W"], "traced_at": [1, 3, size, size],
            "output": ["N", dim], "backbone": cfg.model.backbone}



def _export_onnx(net: torch.nn.Module, example: torch.Tensor, out: Path) -> None:
    import onnx

    torch.onnx.export(net, (example,), str(out), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["features"],
                      dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "features": {0: "batch"}})
    onnx.checker.check_model(onnx.load(str(out)))
