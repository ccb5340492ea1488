"""Dependencies point one way: services -> orl. The library imports no web, queue or DB code."""

import ast
from pathlib import Path

FORBIDDEN = {"fastapi", "uvicorn", "celery", "redis", "sqlalchemy", "psycopg", "alembic", "streamlit", "httpx",
             "starlette", "kombu"}
REPO = Path(__file__).resolve().parents[1]


def test_library_imports_no_service_code():
    bad = []
    for f in (REPO / "orl").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad += [f"{f.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not bad, bad


def test_only_proposals_touches_ximgproc():
    users = [f.name for f in (REPO / "orl").rglob("*.py") if "ximgproc" in f.read_text()]
    assert users == ["proposals.py"]


def test_bundled_sample_is_small_and_attributed():
    sample = REPO / "data" / "sample"
    images = list(sample.rglob("*.jpg"))
    assert 8 <= len(images) <= 32
    assert sum(f.stat().st_size for f in sample.rglob("*") if f.is_file()) <= 6 * 1024 * 1024
    assert "COCO" in (sample / "README.md").read_text()
