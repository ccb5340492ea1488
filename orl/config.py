"""Typed, frozen configuration for the three stages, and the named presets.

Defaults follow the authors' code (see docs/ARCHITECTURE.md, "Faithfulness"); every
deviation from it is a named field whose default is the faithful value.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
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
    # Where views are made. "pil": the authors' pipeline, photo by photo in data-loader workers
    # (each sample decodes its full-resolution photo). "tensor": photos decoded once into the
    # image store (orl.imagestore), views cut and augmented per batch on the training device
    # (orl.tensor_augment): the same parameter distributions, images equal within a stated
    # tolerance (tests/test_tensor_augment.py).
    backend: str = "pil"
    # Shorter side of the photos in the image store ("tensor" backend), never enlarged.
    # None: 2 x image_size, so a view cut from a crop of the smallest scale is upsampled little.
    store_size: int | None = None

    def working_size(self) -> int:
        """The image store's shorter side: ``store_size``, or 2 x ``image_size`` when it is None."""
        return int(self.store_size) if self.store_size is not None else 2 * int(self.image_size)


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
    # bf16 autocast on the CPU (without channels_last). Off by default: it pays only on CPUs
    # with bf16 matrix units (Intel AMX / AVX512-BF16: faster than fp32 in every reading of
    # benchmarks/cpu_amp_probe.py), and was reported 10-25x slower on CPUs without them (AMD
    # EPYC, AVX2; run the probe to see which kind yours is). bf16 rounds activations: a run is
    # not bit-comparable with an fp32 one.
    cpu_amp: bool = False
    # Data-loader workers kept across epochs ("pil" backend with num_workers > 0): no worker
    # start-up at the first step of each epoch. Either way each sample is seeded by its
    # position in the run (orl.data.SeededKeys), so the batches do not change with it.
    persistent_workers: bool = False
    # torch.compile the networks (nn.Module.compile, so checkpoints keep their keys). Off by
    # default: the first steps pay the compilation, and the gain is per machine (benchmark).
    compile: bool = False
    # Label-free signals (orl.monitor: view retrieval top-1, effective rank) of the backbone on
    # monitor_images fixed photos of the run, every monitor_every_epochs epochs, in
    # RUN_DIR/monitor.csv; 0: off. keep_snapshots: last.pt copied to epoch_NNNN.pt at each
    # epoch end, the newest that many kept (0: none), so checkpoints can be compared over training.
    monitor_every_epochs: int = 0
    monitor_images: int = 64
    keep_snapshots: int = 0


# Region proposers (orl.proposals.selective_search).
SS_MODES = ("fast", "quality", "single", "felzenszwalb")


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
    # ss_mode: "fast" (faithful: OpenCV's fast selective search), "quality", "single" (one
    # segmentation and one strategy), "felzenszwalb" (the segments' boxes, no grouping);
    # benchmarks/mining_benchmark.py measures their GT recall, time and pair quality.
    ss_mode: str = "fast"
    ss_max_side_px: int | None = 500
    ss_timeout_s: float = 60.0
    # Selective-search processes; None: one per core given (orl.device.plan_threads). A
    # resource of the machine that runs it, so `orl mine` does not take it from a checkpoint.
    ss_workers: int | None = None
    # Official box filter (original pixels).
    min_side_px: float = 96.0
    max_aspect: float = 3.0
    max_iou: float = 0.5
    max_boxes: int = 100
    # RoI embeddings: "crop" (faithful: warp each box to roi_size) or "roi_align".
    roi_mode: str = "crop"
    roi_size: int = 224
    roi_align_max_side_px: int = 640  # image size for the single backbone pass in roi_align mode
    roi_align_batch_images: int = 8  # images of one size per backbone pass in roi_align mode
    # How RoI features are kept between encoding and pair selection: memory-mapped shards on
    # disk, "float16" (half the bytes; cosine ranks change only among near-ties, see
    # tests/test_mining_speed.py) or "float32" (the exact features).
    roi_dtype: str = "float16"
    # Decode JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when the image embedding or
    # the roi_align pass needs no more pixels. Changes pixel values slightly, so off by default.
    decode_draft: bool = False
    pair_ratio: float = 0.1  # top max(1, int(0.1 * B_query)) of the flattened matrix
    batch_size: int = 64

    def embedding_params(self) -> dict[str, Any]:
        """The options that orl.mining.embed_images reads and that change an image embedding's
        values: what is compared (projector or backbone), the resize and crop, draft decoding.
        Under one checkpoint, equal dicts mean interchangeable embeddings, so the services key
        their cache of image embeddings on it; batch_size and thread counts only split the work.
        Add a field here when embed_images starts reading it."""
        return {"knn_features": self.knn_features, "embed_resize": self.embed_resize,
                "embed_crop": self.embed_crop, "decode_draft": self.decode_draft}


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
        """Raise ConfigError naming the field and its valid values or range; return self.

        The one check of a configuration: the CLI, the trainer, the miner and the API (at job
        submission) all call it, so a value refused in one place is refused in all of them.
        """
        from orl.models.backbones import BACKBONES

        def choice(key: str, value: str, valid: tuple[str, ...]) -> None:
            if value not in valid:
                raise ConfigError(key, f"{key} must be one of {', '.join(valid)}; got {value!r}")

        def at_least(key: str, value: float | None, low: float) -> None:
            # Written as "not (...)" so that NaN fails too.
            if value is not None and not value >= low:
                raise ConfigError(key, f"{key} must be at least {low:g}, got {value}")

        def within(key: str, value: float, low: float, high: float, low_open: bool = False,
                   high_open: bool = False) -> None:
            ok_low = value > low if low_open else value >= low
            ok_high = value < high if high_open else value <= high
            if not (ok_low and ok_high):
                interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                raise ConfigError(key, f"{key} must be in {interval}, got {value}")

        m, a, t, n = self.model, self.augment, self.train, self.mine
        if m.backbone not in BACKBONES:
            raise ConfigError("model.backbone", f"unknown backbone {m.backbone!r} (model.backbone); valid backbones: "
                                                f"{', '.join(BACKBONES)}")
        for name in ("proj_hidden", "proj_out", "pred_hidden"):
            at_least(f"model.{name}", getattr(m, name), 1)
        # Below 32 px a ResNet's feature map vanishes (five stride-2 stages).
        for name in ("image_size", "patch_size"):
            at_least(f"augment.{name}", getattr(a, name), 32)
        within("augment.min_scale", a.min_scale, 0, 1, low_open=True)
        choice("augment.backend", a.backend, ("pil", "tensor"))
        at_least("augment.store_size", a.store_size, 32)
        for name in ("epochs", "batch_size", "jitter_tries"):
            at_least(f"train.{name}", getattr(t, name), 1)
        for name in ("weight_decay", "warmup_epochs", "num_workers", "seed", "checkpoint_every_steps",
                     "monitor_every_epochs", "keep_snapshots"):
            at_least(f"train.{name}", getattr(t, name), 0)
        at_least("train.monitor_images", t.monitor_images, 2)
        if not t.base_lr > 0:
            raise ConfigError("train.base_lr", f"train.base_lr must be > 0, got {t.base_lr}")
        within("train.momentum", t.momentum, 0, 1, high_open=True)
        within("train.warmup_ratio", t.warmup_ratio, 0, 1)
        within("train.ema_base", t.ema_base, 0, 1)
        within("train.jitter_min_iou", t.jitter_min_iou, 0, 1, high_open=True)
        # The global branch exists for every image, so with it every step has a loss.
        if not t.w_global > 0:
            raise ConfigError("train.w_global", f"train.w_global must be > 0, got {t.w_global}")
        for name in ("w_intra", "w_inter"):
            at_least(f"train.{name}", getattr(t, name), 0)
        choice("mine.knn_features", n.knn_features, ("projector", "backbone"))
        choice("mine.ss_mode", n.ss_mode, SS_MODES)
        choice("mine.roi_mode", n.roi_mode, ("crop", "roi_align"))
        choice("mine.roi_dtype", n.roi_dtype, ("float16", "float32"))
        for name in ("knn_k", "max_boxes", "batch_size", "roi_align_batch_images"):
            at_least(f"mine.{name}", getattr(n, name), 1)
        for name in ("embed_resize", "embed_crop", "roi_size", "roi_align_max_side_px", "ss_max_side_px"):
            at_least(f"mine.{name}", getattr(n, name), 32)
        if n.embed_crop > n.embed_resize:
            raise ConfigError("mine.embed_crop", f"mine.embed_crop ({n.embed_crop}) must not exceed "
                                                 f"mine.embed_resize ({n.embed_resize}): the crop is taken from it")
        if not n.ss_timeout_s > 0:
            raise ConfigError("mine.ss_timeout_s", f"mine.ss_timeout_s must be > 0, got {n.ss_timeout_s}")
        at_least("mine.ss_workers", n.ss_workers, 0)
        at_least("mine.min_side_px", n.min_side_px, 0)
        at_least("mine.max_aspect", n.max_aspect, 1)
        within("mine.max_iou", n.max_iou, 0, 1, low_open=True)
        within("mine.pair_ratio", n.pair_ratio, 0, 1, low_open=True)
        return self

    def override(self, **dotted: Any) -> Config:
        """Return a copy with ``section.field=value`` overrides applied (None values skipped).

        Kept for scripts that build configs in code (the study); values go through the same
        reading as every other override (``apply_overrides``). It does not validate: call
        ``.validate()`` on the result.
        """
        return apply_overrides(self, {k: v for k, v in dotted.items() if v is not None}, validate=False)


# -- overrides: the one reading of "set this field to that value" ------------------------------------
class ConfigError(ValueError):
    """A configuration value or key is wrong. ``field`` names it ("train.epochs", "preset", ...)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


SECTIONS: dict[str, type] = {"model": ModelConfig, "augment": AugmentConfig, "train": TrainConfig,
                             "mine": MineConfig}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# Spellings of None for the optional fields: "full" is the documented one for
# mine.ss_max_side_px (the authors' full-resolution selective search).
_NONE = ("none", "null", "full")


def _field_types(section: str) -> dict[str, Any]:
    return typing.get_type_hints(SECTIONS[section])


def section_fields(section: str) -> tuple[str, ...]:
    return tuple(f.name for f in fields(SECTIONS[section]))


def flatten_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.epochs": 3}`` and ``{"train": {"epochs": 3}}`` (mixed freely) -> dotted keys.

    Raises ConfigError naming an unknown section or field, with the valid ones.
    """
    if not isinstance(overrides, Mapping):
        raise ConfigError("", f"overrides must be a mapping of SECTION.FIELD to values, got {type(overrides).__name__}")
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        key = str(key)
        section, dot, name = key.partition(".")
        if section not in SECTIONS:
            raise ConfigError(key, f"unknown config section {section!r} in {key!r}; valid sections: "
                                   f"{', '.join(SECTIONS)}")
        if not dot:
            if not isinstance(value, Mapping):
                raise ConfigError(key, f"{key} must be a mapping of its fields to values (e.g. {{{key}: "
                                       f"{{{section_fields(section)[0]}: ...}}}}), got {value!r}")
            for sub, v in value.items():
                flat.update(flatten_overrides({f"{section}.{sub}": v}))
            continue
        if name not in section_fields(section):
            raise ConfigError(key, f"unknown field {name!r} in section {section!r}; valid: "
                                   f"{', '.join(section_fields(section))}")
        flat[key] = value
    return flat


def parse_value(key: str, value: Any) -> Any:
    """Read ``value`` for the field ``key`` ("section.field") by the field's type.

    Strings (the CLI's ``--set``, YAML, JSON) are parsed: numbers, true/false (also yes/no,
    on/off, 1/0), and none/null/full for an optional field. Other values must already have the
    field's type (an int is accepted for a float field). Raises ConfigError naming the field.
    """
    section, _, name = key.partition(".")
    typ = _field_types(section)[name]
    args = typing.get_args(typ)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else typ
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE):
        if optional:
            return None
        raise ConfigError(key, f"{key} cannot be null; give {_describe(base)}")
    raw = value.strip() if isinstance(value, str) else None
    if base is bool:
        if isinstance(value, bool):
            return value
        if raw is not None and raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if raw is not None:
            try:
                return int(raw)
            except ValueError:
                pass
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if raw is not None:
            try:
                return float(raw)
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a new field type needs a rule here
        raise TypeError(f"no parsing rule for {key} of type {typ}")
    extra = " or null" if optional else ""
    raise ConfigError(key, f"{key} must be {_describe(base)}{extra}, got {value!r}")


def _describe(typ: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(typ, str(typ))


def apply_overrides(cfg: Config, overrides: Mapping[str, Any], *, validate: bool = True) -> Config:
    """The one function that applies overrides, everywhere (CLI, config files, job params).

    ``overrides``: dotted keys or nested sections (``flatten_overrides``); every value read by
    ``parse_value``, so None can be set where a field allows it. Returns the new config,
    validated unless ``validate=False``. Raises ConfigError naming the field.
    """
    by_section: dict[str, dict[str, Any]] = {}
    for key, value in flatten_overrides(overrides).items():
        section, _, name = key.partition(".")
        by_section.setdefault(section, {})[name] = parse_value(key, value)
    out = replace(cfg, **{s: replace(getattr(cfg, s), **vals) for s, vals in by_section.items()})
    return out.validate() if validate else out


# -- files ------------------------------------------------------------------------------------------
CONFIG_FILE = "config.yaml"  # the resolved configuration, written into every run / mine folder


def read_config_file(path: str | Path) -> tuple[str | None, dict[str, Any]]:
    """A YAML config file -> (its ``preset:`` or None, its sections as dotted overrides).

    The file holds an optional ``preset:`` and the sections model / augment / train / mine with
    fields of the dataclasses above. Raises ConfigError (message names the file and the field)
    for a missing or unparsable file, an unknown key or a value of the wrong type.
    """
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {p}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ConfigError("", f"{p} is not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{p} must be a mapping with preset and sections {', '.join(SECTIONS)}; "
                              f"got a {type(data).__name__}")
    preset = data.pop("preset", None)
    try:
        if preset is not None and not isinstance(preset, str):
            raise ConfigError("preset", f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        if preset is not None:
            get_preset(preset)
        flat = flatten_overrides(data)
        for key, value in flat.items():
            parse_value(key, value)  # wrong types are reported here, against the file's name
    except ConfigError as exc:
        raise ConfigError(exc.field, f"{p}: {exc}") from None
    return preset, flat


def config_yaml(cfg: Config) -> str:
    """The resolved configuration as YAML that ``--config`` reads back to the same Config."""
    import yaml

    head = ("# The resolved configuration of this run: preset, then config file, then options.\n"
            "# Run again with --config on this file to repeat it.\n")
    d = cfg.to_dict()
    if d["preset"] not in PRESETS:
        # e.g. "custom" (a checkpoint without a preset name): every field is written below, so
        # the file reads back to the same values without one.
        head += f"# (built from {d.pop('preset')!r}, not a named preset)\n"
    return head + yaml.safe_dump(d, sort_keys=False)


def save_config(cfg: Config, folder: str | Path) -> Path:
    """Write ``folder/config.yaml`` (atomically); returns its path."""
    from orl.fileio import atomic_write_text

    path = Path(folder) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, config_yaml(cfg))
    return path


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
        raise ConfigError("preset", f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


def default_preset(device: str) -> str:
    """The one default-preset rule: ``paper`` when the run's device is CUDA, else ``cpu``.

    ``device`` is where the run really happens (resolved, not "auto"): the CLI's ``--device``,
    the trainer's job device, each decided on the machine that runs it. Runs that start from a
    checkpoint (mining, and stage 3 in the services) take that checkpoint's configuration instead.
    """
    return "paper" if str(device).startswith("cuda") else "cpu"
