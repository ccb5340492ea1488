"""Typed, frozen configuration for the three stages, and the named presets.

Defaults follow the authors' code (see docs/ARCHITECTURE.md, "Faithfulness"); every
deviation from it is a named field whose default is the faithful value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet50"
    proj_hidden: int = 4096  # official: Linear(C, 4096) -> BN -> ReLU -> Linear(4096, 256)
    proj_out: int = 256
    pred_hidden: int = 4096


@dataclass(frozen=True)
class AugmentConfig:
    image_size: int = 224  # global views
    patch_size: int = 96  # RoI patches in stage 3
    min_scale: float = 0.08  # RandomResizedCrop scale lower bound


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 800
    batch_size: int = 512
    base_lr: float = 0.2  # per 256 images: lr = base_lr * batch / 256 (0.4 at 512, as official)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 4.0
    # LR as the authors' mmcv lr_config: cosine to 0 stepped per epoch, linear warmup over
    # warmup_epochs x steps per epoch iterations from warmup_ratio x that epoch's value.
    # lr_by_epoch=False: per-iteration warmup (from peak / warmup steps) and cosine instead.
    warmup_ratio: float = 1e-4
    lr_by_epoch: bool = True
    ema_base: float = 0.99  # target momentum goes 0.99 -> 1 by cosine, per iteration
    num_workers: int = 2
    seed: int = 0
    # Stage 3 loss weights (lambda_1..3 of Eq. 2): default 1, 1, 1 as in the paper and code.
    w_global: float = 1.0
    w_intra: float = 1.0
    w_inter: float = 1.0
    # Intra-RoI jitter (official: up to 200 tries, IoU with the original > 0.5).
    jitter_tries: int = 200
    jitter_min_iou: float = 0.5
    # The last partial batch is kept, as the authors (a batch of 1 is dropped: BatchNorm
    # needs 2). drop_last=True drops every partial last batch.
    drop_last: bool = False
    checkpoint_every_steps: int = 50  # mid-epoch checkpoints, so a killed run loses little
    amp: bool = True  # bf16 autocast + channels_last, CUDA only


@dataclass(frozen=True)
class MineConfig:
    knn_k: int = 10
    embed_resize: int = 256  # Resize(256) + CenterCrop(224) for image embeddings
    embed_crop: int = 224
    # What the image KNN compares: "projector" (faithful: the 256-d projector output) or
    # "backbone" (pooled res5), for networks whose projector is untrained, e.g. a supervised
    # backbone such as the study's positive control.
    knn_features: str = "projector"
    # Selective search. max_side_px=None is the faithful full-resolution path; the default
    # downscale is chosen by benchmarks/ss_scale.py (speed against pair quality).
    ss_mode: str = "fast"
    ss_max_side_px: int | None = 500
    ss_timeout_s: float = 60.0
    ss_workers: int = 2
    # Official box filter (original pixels).
    min_side_px: float = 96.0
    max_aspect: float = 3.0
    max_iou: float = 0.5
    max_boxes: int = 100
    # RoI embeddings: "crop" (faithful: warp each box to roi_size) or "roi_align".
    roi_mode: str = "crop"
    roi_size: int = 224
    roi_align_max_side_px: int = 640  # image size for the single backbone pass in roi_align mode
    pair_ratio: float = 0.1  # top max(1, int(0.1 * B_query)) of the flattened matrix
    batch_size: int = 64


@dataclass(frozen=True)
class Config:
    preset: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mine: MineConfig = field(default_factory=MineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        kwargs: dict[str, Any] = {}
        for name, typ in (("model", ModelConfig), ("augment", AugmentConfig),
                          ("train", TrainConfig), ("mine", MineConfig)):
            known = {f.name for f in fields(typ)}
            kwargs[name] = typ(**{k: v for k, v in d.get(name, {}).items() if k in known})
        return cls(preset=d.get("preset", "custom"), **kwargs)

    def validate(self) -> Config:
        """Raise ValueError naming the valid choices for any bad name or range; return self."""
        from orl.models.backbones import BACKBONES

        if self.model.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.model.backbone!r}; valid backbones: {', '.join(BACKBONES)}")
        if self.mine.roi_mode not in ("crop", "roi_align"):
            raise ValueError(f"unknown roi_mode {self.mine.roi_mode!r}; valid: crop, roi_align")
        if self.mine.knn_features not in ("projector", "backbone"):
            raise ValueError(f"unknown knn_features {self.mine.knn_features!r}; valid: projector, backbone")
        if self.mine.ss_mode not in ("fast", "quality", "single"):
            raise ValueError(f"unknown ss_mode {self.mine.ss_mode!r}; valid: fast, quality, single")
        if not 0 < self.mine.pair_ratio <= 1:
            raise ValueError(f"mine.pair_ratio must be in (0, 1], got {self.mine.pair_ratio}")
        for name in ("epochs", "batch_size"):
            if getattr(self.train, name) < 1:
                raise ValueError(f"train.{name} must be at least 1, got {getattr(self.train, name)}")
        # The global branch exists for every image, so with it every step has a loss.
        if self.train.w_global <= 0 or min(self.train.w_intra, self.train.w_inter) < 0:
            raise ValueError("train.w_global must be > 0 and train.w_intra / train.w_inter >= 0")
        if not 0 <= self.train.warmup_ratio <= 1:
            raise ValueError(f"train.warmup_ratio must be in [0, 1], got {self.train.warmup_ratio}")
        if self.augment.image_size < 32 or self.augment.patch_size < 32:
            raise ValueError("augment.image_size and augment.patch_size must be at least 32 px")
        return self

    def override(self, **dotted: Any) -> Config:
        """Return a copy with ``section.field=value`` overrides applied (None values skipped)."""
        cfg = self
        for key, value in dotted.items():
            if value is None:
                continue
            section, _, name = key.partition(".")
            part = getattr(cfg, section)
            if name not in {f.name for f in fields(part)}:
                raise ValueError(f"unknown config field {key!r}")
            cfg = replace(cfg, **{section: replace(part, **{name: value})})
        return cfg


PRESETS: dict[str, Config] = {
    # Seconds on a CPU: for tests. Tiny heads and small images; box filter left faithful
    # because it is in original pixels.
    "tiny": Config(
        preset="tiny",
        model=ModelConfig(backbone="resnet18", proj_hidden=128, proj_out=32, pred_hidden=128),
        augment=AugmentConfig(image_size=64, patch_size=32),
        train=TrainConfig(epochs=1, batch_size=8, warmup_epochs=0.0, num_workers=0,
                          checkpoint_every_steps=2),
        mine=MineConfig(embed_resize=72, embed_crop=64, roi_size=64, ss_max_side_px=320,
                        max_boxes=20, batch_size=32, roi_align_max_side_px=320),
    ),
    # A meaningful run on 2 CPU cores in tens of minutes on a few hundred photos.
    "cpu": Config(
        preset="cpu",
        model=ModelConfig(backbone="resnet18", proj_hidden=1024, proj_out=128, pred_hidden=1024),
        augment=AugmentConfig(image_size=112, patch_size=64),
        train=TrainConfig(epochs=30, batch_size=64, warmup_epochs=2.0, num_workers=2,
                          base_lr=0.4),
        mine=MineConfig(embed_resize=128, embed_crop=112, roi_size=112, batch_size=64,
                        roi_align_max_side_px=448),
    ),
    # ResNet-50 and the paper's hyper-parameters.
    "paper": Config(preset="paper"),
}


def get_preset(name: str) -> Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None
