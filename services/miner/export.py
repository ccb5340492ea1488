"""A finished mining job's rows -> ``orl.correspondence.Correspondence`` -> correspondence.json.

The json is the authors' layout (``Correspondence.to_official``), so the result of a service run
can be fed to their code or to ``orl train --pairs``. The database stays the source of truth;
the file is an export, rewritten identically if the last shard is redelivered.
"""

from __future__ import annotations

from typing import Any



def official_info(mine_cfg: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The authors' info keys first (their loader looks for them), then ours."""
    return {"bbox_min_size": mine_cfg["min_side_px"], "bbox_max_aspect_ratio": mine_cfg["max_aspect"],
            "bbox_max_iou": mine_cfg["max_iou"], "intra_bbox_num": mine_cfg["max_boxes"],
            "knn_image_num": mine_cfg["knn_k"], "knn_bbox_pair_ratio": mine_cfg["pair_ratio"],
            "mine_config": dict(mine_cfg), **extra}
