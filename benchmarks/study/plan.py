"""What the study runs: modes (scales), stage-3 runs, mining variants. Pure data.

A mode fixes what every unit means (its ``signature``); a results file written under one
signature refuses a run with another, so numbers from different settings never mix.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunSpec:
    """A pre-training after stage 1 (the M epochs of "N + M"), evaluated like stage 1.

    ``stage``: byol or orl. ``init``: start from the stage-1 checkpoint (else random init,
    the authors' choice for ORL). ``weights``: stage-3 loss weights (Table 5a's ablation).
    """

    name: str
    label: str
    stage: str
    init: bool
    weights: dict[str, float] = field(default_factory=dict)


RUNS = {r.name: r for r in [
    RunSpec("byol_cont", "BYOL N + BYOL M (continued)", "byol", init=True),
    RunSpec("orl_init", "BYOL N + ORL M, init from stage 1", "orl", init=True),
    RunSpec("orl", "BYOL N + ORL M, random init (authors)", "orl", init=False),
    RunSpec("orl_init_no_inter", "ORL M without inter-RoI loss (init from stage 1)", "orl", init=True,
            weights={"w_inter": 0.0}),
    RunSpec("orl_init_no_intra", "ORL M without intra-RoI loss (init from stage 1)", "orl", init=True,
            weights={"w_intra": 0.0}),
]}


@dataclass(frozen=True)
class MineVariant:
    name: str
    label: str
    overrides: dict[str, Any]  # MineConfig fields over the mode's default mining
    rule: str = "top"  # "top": the authors' top-10%-of-matrix rule; "mutual": mutual nearest


VARIANTS = {v.name: v for v in [
    MineVariant("roi_align", "RoIAlign features (1 forward per image)", {"roi_mode": "roi_align"}),
    MineVariant("ss320", "selective search at 320 px", {"ss_max_side_px": 320}),
    MineVariant("mutual", "mutual-nearest RoI pairs", {}, rule="mutual"),
]}

# The study's default mining: the faithful crop features, the library's 500 px selective search.
# RoI features kept in float32 (the library streams float16 by default): the pair metrics read
# them, and every unit already recorded was scored from float32 features. A mode may replace a
# field through its own "mine.<field>" overrides (the short mode's RoIAlign): see default_mining.
DEFAULT_MINE = {"ss_max_side_px": 500, "roi_mode": "crop", "roi_dtype": "float32"}

# How the runs after stage 1 are mined in a mode whose default is crops: with RoIAlign features
# (one forward per image), scored only against each other and the stage-1 checkpoint mined the
# same way (e<N>+roi_align). The pairs stage 3 trains on are mined the mode's default way.
RUN_MINING = "roi_align"

# Names of the stage-1 checkpoints: "e<epochs>" snapshots of the one stage-1 run, and the
# random-init network with its BatchNorm statistics recomputed on the photos.
RANDOM_BN = "e0bn"


@dataclass(frozen=True)
class Mode:
    """One scale of the study.

    ``epochs`` is N (stage 1), ``more_epochs`` is M (what each run in ``runs`` trains after
    it), ``snapshots`` the stage-1 epochs whose checkpoints are mined and evaluated (0: the
    random-init network). Seeds, threads and time limits are not part of what a unit means.
    """

    name: str
    preset: str
    overrides: dict[str, Any]
    epochs: int
    more_epochs: int
    snapshots: tuple[int, ...]
    seeds: tuple[int, ...]
    runs: tuple[str, ...]
    variants: tuple[str, ...]
    control_epochs: int  # the supervised positive control (0: none)
    svm: bool = True  # VOC07 SVM for the final checkpoints (stage 1 end and every run)
    per_folder: int | None = None  # photos per source folder (None: all)
    threads: int | None = 2
    svm_jobs: int = 2
    max_minutes: float | None = None
    # The final stage-1 checkpoint (48 MB in float16) and its pairs kept in git, under
    # benchmarks/results/study_<mode>_keep/, for a stage 1 too long to recompute in a session
    # (the long mode's 3,008 steps). Elsewhere the same float16 copy is kept in the work folder:
    # every run after stage 1 reads the rounded weights either way.
    keep_in_git: bool = False

    def settings(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("seeds", "threads", "svm_jobs", "max_minutes", "keep_in_git"):
            d.pop(k)
        return json.loads(json.dumps(d))  # as it reads back from the file (tuples -> lists)


# The scale of every CPU mode: ResNet-18 at 64 px (patches 32 px), batch 32, so that stage 1
# runs thousands of SGD steps on 2 cores (490 photos: 16 steps per epoch).
SMALL = {
    "augment.image_size": 64, "augment.patch_size": 32,
    "train.batch_size": 32, "train.warmup_epochs": 4.0, "train.num_workers": 2,
    "mine.embed_resize": 72, "mine.embed_crop": 64, "mine.roi_size": 64, "mine.batch_size": 128,
    "mine.roi_align_max_side_px": 320,
}

MODES = {
    # One long seed: 188 epochs = 3,008 stage-1 steps, snapshots along the way (about 100,
    # 300, 1,000, 2,000 and 3,000 steps), then M = 63 epochs (1,008 steps) of each run.
    "long": Mode("long", "cpu", SMALL, epochs=188, more_epochs=63, snapshots=(0, 6, 19, 63, 125, 188),
                 seeds=(0,), runs=tuple(RUNS), variants=tuple(VARIANTS), control_epochs=60, keep_in_git=True),
    # Three seeds at a shorter length (800 + 304 steps) for the spread of the headline comparisons.
    # Lean, so that the three seeds fit one long session: every mining (snapshots, runs, and the
    # pairs stage 3 trains on) uses RoIAlign RoI features, so all its pair scores compare with
    # each other (not with the long mode's crop scores); no mining variants, no positive control
    # (the long mode has both); snapshots only at random init and the end of stage 1.
    # Its cost, from `python -m benchmarks.study --mode short --dry-run` (estimate.py: the unit
    # timings recorded in benchmarks/results/study_long.json as committed with this comment,
    # each computation's own wall seconds, training scaled by steps), as median / fastest
    # minutes: 47.4 / 33.2 per seed (seed 0: 56.1 / 41.0, as the work folder's one selective
    # search comes with its first mining), of which stage 1 18.7 / 12.0, orl_init 12.3 / 7.7,
    # byol_cont 5.3, each mining 1.1 / 0.9 and each evaluation 1.2 / 0.8 (0.8 / 0.6 without the
    # SVM); three seeds 150.9 / 107.5. The median is the nearer guess on a shared machine. A
    # crop mining takes 2.2 / 1.6 (`--mode long --dry-run`): RoIAlign is here for scores that
    # compare across the mode more than for time. The authors' `orl` (random init) would add
    # 14.5 / 9.4 per seed (three seeds 194.6 / 135.7, past the 2.5 hours this mode is meant
    # for), so it is not a default run here (the long mode has it at one seed);
    # `--runs byol_cont,orl_init,orl` adds it to the same results file (runs are not part of
    # the signature).
    "short": Mode("short", "cpu", {**SMALL, "mine.roi_mode": "roi_align"}, epochs=50, more_epochs=19,
                  snapshots=(0, 50), seeds=(0, 1, 2), runs=("byol_cont", "orl_init"), variants=(),
                  control_epochs=0),
    # Pipeline check in minutes: tiny preset, 12 photos per source folder. Numbers mean nothing.
    "quick": Mode("quick", "tiny", {"train.batch_size": 8, "mine.ss_workers": 2}, epochs=2, more_epochs=1,
                  snapshots=(0, 1, 2), seeds=(0, 1), runs=tuple(RUNS), variants=tuple(VARIANTS),
                  control_epochs=2, per_folder=12, threads=1, svm_jobs=1),
    # One CUDA GPU: the long configuration trained for hundreds of epochs (one prepared run).
    "gpu": Mode("gpu", "cpu", {**SMALL, "train.num_workers": 8, "mine.ss_workers": 14}, epochs=400,
                more_epochs=100, snapshots=(0, 25, 100, 400), seeds=(0,), runs=("byol_cont", "orl_init", "orl"),
                variants=(), control_epochs=60, threads=None, svm_jobs=12, max_minutes=4.5),
}


def signature(settings: dict[str, Any]) -> dict[str, Any]:
    """What every unit means; runs and variants may be added to an existing result."""
    return {k: v for k, v in settings.items() if k not in ("runs", "variants")}


def default_mining(settings: dict[str, Any]) -> dict[str, Any]:
    """A mode's default mining: DEFAULT_MINE, with the fields the mode's own ``mine.<field>``
    overrides set replaced (only the short mode sets one: its RoIAlign features)."""
    over = settings["overrides"]
    return {k: over.get(f"mine.{k}", v) for k, v in DEFAULT_MINE.items()}


def mines_with_roi_align(settings: dict[str, Any]) -> bool:
    return default_mining(settings)["roi_mode"] == VARIANTS[RUN_MINING].overrides["roi_mode"]


def roi_align_unit(name: str, settings: dict[str, Any]) -> str:
    """The mining unit holding checkpoint ``name``'s RoIAlign RoI features: its default mining
    where the mode mines with RoIAlign, else "<name>+roi_align"."""
    return name if mines_with_roi_align(settings) else f"{name}+{RUN_MINING}"


def mining_unit(name: str, settings: dict[str, Any]) -> str:
    """The mining unit that scores checkpoint ``name``: a run after stage 1 is mined only with
    RoIAlign features, every stage-1 checkpoint (and the control) the mode's default way."""
    return roi_align_unit(name, settings) if name in RUNS else name


def comparable_minings(a: str, b: str, settings: dict[str, Any]) -> tuple[str, str]:
    """The two mining units whose pair scores compare checkpoints a and b: both RoIAlign
    where either is a run after stage 1, else both default minings (same features, same boxes)."""
    if a in RUNS or b in RUNS:
        return roi_align_unit(a, settings), roi_align_unit(b, settings)
    return a, b


def eval_with_svm(name: str, settings: dict[str, Any]) -> bool:
    """The VOC07 SVM runs for the final checkpoints only: the data-BatchNorm random init, the
    control, the end of stage 1 and every run after it (not the BatchNorm-0/1 init)."""
    return name in (RANDOM_BN, "control", f"e{settings['epochs']}") or name in RUNS


def unit_keys(settings: dict[str, Any], seeds: tuple[int, ...] | list[int]) -> list[str]:
    """Every unit of a mode, in the order the study runs them (units.Study.run iterates this).

    Per seed: the random-init networks and the control first (they make every later number
    readable), then stage 1 snapshot by snapshot (each trained, mined and evaluated as soon as
    it exists, so an interrupted study already has the first points of its curve), the runs
    after stage 1 (the comparisons the study exists for), then the mining options."""
    N = settings["epochs"]
    out: list[str] = []
    for s in seeds:
        ckpts = [("byol@e0", "e0"), (RANDOM_BN, RANDOM_BN)] + ([("control", "control")]
                                                               if settings.get("control_epochs") else [])
        ckpts += [(f"byol@e{e}", f"e{e}") for e in sorted(settings["snapshots"]) if e > 0]
        for train, name in ckpts:
            out += [f"train/s{s}/{train}", f"mine/s{s}/{name}", f"eval/s{s}/{name}"]
        if settings.get("runs") and roi_align_unit(f"e{N}", settings) != f"e{N}":
            out.append(f"mine/s{s}/{roi_align_unit(f'e{N}', settings)}")
        for r in settings.get("runs", []):
            out += [f"train/s{s}/{r}", f"eval/s{s}/{r}", f"mine/s{s}/{roi_align_unit(r, settings)}"]
        out += [f"mine/s{s}/e{N}+{v}" for v in settings.get("variants", []) if f"mine/s{s}/e{N}+{v}" not in out]
    return out
