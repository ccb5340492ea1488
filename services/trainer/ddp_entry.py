"""One rank of a data-parallel training run, started by the trainer through torchrun::

    python -m torch.distributed.run --standalone --nproc_per_node N -m services.trainer.ddp_entry launch.json

``launch.json`` (written by ``services.trainer.runner``) holds the stage, the config, the image
list or the pairs file, and three file paths through which the ranks talk to the trainer
process that supervises them: rank 0 writes ``progress`` (the last step's metrics) and
``summary`` (the end); the trainer creates ``stop`` to cancel. Ranks agree on stopping with an
all-reduce, so no rank leaves the loop while another waits in a collective.

orl.train wraps the model in DistributedDataParallel (losses go through its forward, so
gradients are averaged across ranks), with SyncBatchNorm on GPU and per-process BatchNorm on
CPU (torch implements SyncBatchNorm for CUDA only).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from orl.fileio import atomic_write_text


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj))


def replica_max_abs_diff(model: torch.nn.Module, group) -> float:
    """How far the ranks' parameters are apart (0.0 when data parallelism works)."""
    v = torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])
    lo, hi = v.clone(), v.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    return float((hi - lo).abs().max())


def main(argv: list[str]) -> int:
    from orl.config import Config
    from orl.correspondence import Correspondence

    spec = json.loads(Path(argv[0]).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = spec.get("device", "auto") != "cpu" and torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(minutes=30))
    # Control messages (the stop flag) on gloo, which takes CPU tensors.
    ctrl = dist.new_group(backend="gloo")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    import orl.train as orl_train

    built: dict[str, torch.nn.Module] = {}
    build_model = orl_train.build_model

    def keep_model(cfg, stage):  # to measure replica agreement at the end
        built["model"] = build_model(cfg, stage)
        return built["model"]

    orl_train.build_model = keep_model
    stop_file, progress_file = Path(spec["stop_file"]), Path(spec["progress_file"])

    def should_stop() -> bool:
        flag = torch.tensor([1.0 if stop_file.exists() else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctrl)
        return bool(flag.item() > 0)

    def on_progress(m: dict) -> None:
        if rank == 0:
            _write_json(progress_file, m)

    corr = Correspondence.load(spec["pairs"]) if spec["stage"] == "orl" else None
    device = f"cuda:{local_rank}" if on_gpu else "cpu"
    summary = orl_train.train(
        spec["stage"], spec["images_root"], spec["out_dir"], Config.from_dict(spec["config"]),
        files=spec.get("files"), corr=corr, init_from=spec.get("init_from"), device=device,
        show_progress=False, on_progress=on_progress, should_stop=should_stop, max_steps=spec.get("max_steps"),
        rank=rank, world=world)
    diff = replica_max_abs_diff(built["model"], ctrl)
    if rank == 0:
        _write_json(Path(spec["summary_file"]), {**summary, "world": world, "replica_max_abs_diff": diff})
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
