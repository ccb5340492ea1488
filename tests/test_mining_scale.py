"""benchmarks/mining_scale.py's own pieces: the image variants (distinct, deterministic, cached) and
the /proc memory sampler. The benchmark itself is run by hand (its docstring says how)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks import mining_scale as ms


def _sources(tmp_path: Path) -> list[tuple[str, Path]]:
    rng = np.random.default_rng(0)
    out = []
    for i, size in enumerate([(80, 60), (64, 64)]):
        p = tmp_path / "src" / f"photo{i}.jpg"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p, quality=90)
        out.append((f"src/photo{i}.jpg", p))
    return out


def test_variants_distinct_deterministic_and_cached(tmp_path):
    sources = _sources(tmp_path)
    pool = tmp_path / "pool"
    first = ms.build_pool(pool, 6, seed=3, sources=sources, workers=1)
    assert [v["k"] for v in first] == list(range(6))
    assert len({v["sha1"] for v in first}) == 6 and len({v["pixels_sha1"] for v in first}) == 6
    # the first len(sources) variants use every photo once; then each photo again
    assert sorted(v["params"]["source"] for v in first[:2]) == [0, 1]
    assert [v["params"]["source"] for v in first[2:4]] == [v["params"]["source"] for v in first[:2]]
    for v in first:
        p = v["params"]
        assert 0.8 <= p["crop_w"] <= 1.0 and 0.8 <= p["crop_h"] <= 1.0 and 80 <= p["quality"] <= 95
        src = Image.open(sources[p["source"]][1])
        out = Image.open(pool / v["file"])
        assert out.width == round(src.width * p["crop_w"]) and out.height == round(src.height * p["crop_h"])
    # the same recipe gives the same bytes; a larger pool keeps the cached variants and adds to them
    again = ms.render_variant(sources[first[0]["params"]["source"]][1], first[0]["params"])
    assert again == (pool / first[0]["file"]).read_bytes()
    before = {v["file"]: (pool / v["file"]).stat().st_mtime_ns for v in first}
    more = ms.build_pool(pool, 9, seed=3, sources=sources, workers=1)
    assert [v["sha1"] for v in more[:6]] == [v["sha1"] for v in first]
    assert all((pool / f).stat().st_mtime_ns == t for f, t in before.items())
    assert len({v["pixels_sha1"] for v in more}) == 9
    # another seed is another pool
    other = ms.build_pool(tmp_path / "pool2", 3, seed=4, sources=sources, workers=1)
    assert not {v["sha1"] for v in other} & {v["sha1"] for v in more}


def test_link_set_hard_links(tmp_path):
    sources = _sources(tmp_path)
    pool = tmp_path / "pool"
    variants = ms.build_pool(pool, 4, seed=0, sources=sources, workers=1)
    folder = ms.link_set(pool, variants[:3], tmp_path / "sets" / "n3")
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(v["file"] for v in variants[:3])
    assert all(not (folder / n).is_symlink() and (folder / n).stat().st_ino == (pool / n).stat().st_ino
               for n in names)
    (folder / names[0]).unlink()  # a damaged set is made anew
    assert len(list(ms.link_set(pool, variants[:3], folder).iterdir())) == 3


def test_tree_follows_children_and_process_groups():
    procs = {1: (0, 1, 0, 0), 10: (1, 10, 100, 0), 11: (10, 10, 50, 0), 12: (11, 12, 25, 0),
             20: (1, 10, 7, 0), 30: (1, 30, 1, 0)}
    # 11 and 12 descend from 10; 20 was reparented but is still in 10's process group
    assert ms.tree(procs, [10]) == {10, 11, 12, 20}
    assert ms.tree(procs, [99]) == set()


def test_memory_sampler_sees_a_child_and_a_folder(tmp_path):
    code = "import time; x = bytearray(96 << 20); x[::4096] = b'1' * len(x[::4096]); time.sleep(2.5)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    folder = tmp_path / "store"
    try:
        with ms.MemorySampler(lambda: {"child": [proc.pid]}, 0.1, {"store": folder}) as sampler:
            time.sleep(1.5)
            folder.mkdir()
            (folder / "shard").write_bytes(b"\0" * 12345)
            proc.wait(10)
    finally:
        proc.kill()
    s = sampler.summary()
    assert s["peak"]["child"]["rss_bytes"] >= 96 << 20
    assert s["peak"]["child"]["pss_bytes"] >= 90 << 20
    assert s["vm_hwm_bytes"]["child"] >= 96 << 20
    assert s["folder_peak_bytes"]["store"] == 12345
    assert s["samples"] >= 5
