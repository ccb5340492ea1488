"""Static checks of the compose file and Dockerfile (no Docker engine on our machines)."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_compose_parses_and_references_real_things():
    spec = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = spec["services"]
    assert {"orl", "demo"} <= set(services)
    for name, svc in services.items():
        assert svc["build"] == "." and (REPO / "Dockerfile").is_file()
        for vol in svc.get("volumes", []):
            host, container = vol.split(":")[:2]
            assert host.startswith("./") and container.startswith("/")
    entry = services["demo"]["entrypoint"]
    assert entry[0] == "bash" and (REPO / entry[1]).is_file()


def test_dockerfile_copies_existing_paths_and_pins_python():
    lines = (REPO / "Dockerfile").read_text().splitlines()
    assert lines[[i for i, l in enumerate(lines) if l.startswith("FROM")][0]].startswith("FROM python:3.11")
    for line in lines:
        if line.startswith("COPY"):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), src
    # never the non-headless OpenCV next to the contrib build
    reqs = (REPO / "requirements.txt").read_text()
    assert "opencv-contrib-python-headless" in reqs and "\nopencv-python" not in reqs
