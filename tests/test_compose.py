"""Static checks of docker-compose.yml, docker-compose.gpu.yml and the Dockerfile.

No Docker engine exists on our machines, so the files are validated here as data: structure,
healthchecks, start-up order, ports, volumes, and that every command names a real module or file
of this repository and is the one docs/SERVICES.md documents (the same commands `make up` runs;
tests/services/test_stack.py runs them natively).
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SERVICES = {"postgres", "redis", "migrate", "api", "miner-cpu", "miner-gpu", "trainer", "dashboard"}
OURS = SERVICES - {"postgres", "redis"}  # built from the Dockerfile
LONG_RUNNING = SERVICES - {"migrate"}
VALID_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load("docker-compose.yml")


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def documented_commands() -> dict[str, list[str]]:
    """The command table of docs/SERVICES.md: service -> argv."""
    text = (REPO / "docs" / "SERVICES.md").read_text()
    table = text.split("## Commands", 1)[1]
    rows = re.findall(r"^\| ([a-z-]+)(?: \(one-shot\))? \| `([^`]+)` \|$", table, flags=re.M)
    return {name: shlex.split(cmd) for name, cmd in rows}


def module_file(dotted: str) -> Path | None:
    """The file a dotted module name resolves to inside the repository, if any."""
    base = REPO.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def defines(path: Path, name: str) -> bool:
    """Whether the module assigns (or imports) ``name`` at top level."""
    for node in ast.parse(path.read_text()).body:
        targets = []
        if isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, (ast.AnnAssign,)) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            targets = [node.name]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            targets = [(a.asname or a.name).split(".")[0] for a in node.names]
        if name in targets:
            return True
    return False


def check_command_targets(argv: list[str]) -> None:
    """The module / app / script a command names exists in the repository."""
    prog = argv[0]
    if prog == "python":
        assert argv[1] == "-m", argv
        path = module_file(argv[2])
        assert path, f"{argv[2]} is not a module of this repository"
        if path.name == "__init__.py":
            assert (path.parent / "__main__.py").is_file(), f"package {argv[2]} has no __main__.py"
        else:
            assert "__main__" in path.read_text(), f"{path} has no `if __name__ == '__main__'` entry point"
    elif prog == "uvicorn":
        module, attr = argv[1].split(":")
        path = module_file(module)
        assert path and defines(path, attr), f"{argv[1]}: no `{attr}` in {module}"
    elif prog == "celery":
        module = argv[argv.index("-A") + 1]
        path = module_file(module)
        assert path, f"celery app module {module} missing"
        assert "Celery(" in path.read_text() or "make_celery(" in path.read_text(), f"{path} builds no Celery app"
        queue = argv[argv.index("-Q") + 1]
        assert queue in {"cpu", "gpu"}
    elif prog == "streamlit":
        assert argv[1] == "run" and (REPO / argv[2]).is_file(), argv
    else:
        raise AssertionError(f"unexpected program {prog}")


def split_volume(spec: str) -> tuple[str, str, str]:
    """'source:target[:mode]' -> parts; the source may be an interpolation holding a colon."""
    m = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::(\w+))?", spec)
    assert m, f"malformed volume {spec}"
    return m.group(1), m.group(2), m.group(3) or "rw"


def healthcheck_text(svc: dict) -> str:
    test = svc["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


def test_compose_has_every_service_on_one_image(services):
    assert set(services) == SERVICES
    for name in OURS:
        assert services[name]["build"] == "." and services[name]["image"] == "orl:latest", name
    assert (REPO / "Dockerfile").is_file()
    for name in ("postgres", "redis"):
        assert "image" in services[name] and "build" not in services[name]


def test_commands_are_the_documented_ones_and_exist(services):
    documented = documented_commands()
    assert set(documented) == OURS, documented
    for name in OURS:
        assert services[name]["command"] == documented[name], name
        check_command_targets(documented[name])


def test_stack_script_runs_the_documented_commands():
    spec = importlib.util.spec_from_file_location("stack", REPO / "scripts" / "stack.py")
    stack = importlib.util.module_from_spec(spec)
    sys.modules["stack"] = stack  # dataclasses look their module up there
    spec.loader.exec_module(stack)
    documented = documented_commands()
    for name in OURS:
        assert stack.service_command(name, stack.DEFAULT_PORTS) == documented[name], name
    assert set(stack.SERVICES) == OURS - {"migrate"}


def test_healthchecks(services):
    for name in LONG_RUNNING:
        hc = services[name].get("healthcheck")
        assert hc and hc.get("test"), f"{name} has no healthcheck"
        assert hc["test"][0] in {"CMD", "CMD-SHELL"}, name
        for key in ("interval", "timeout"):
            assert re.fullmatch(r"\d+(ms|s|m)", str(hc[key])), (name, key)
    assert "pg_isready" in healthcheck_text(services["postgres"])
    assert "redis-cli ping" in healthcheck_text(services["redis"])
    assert "/healthz" in healthcheck_text(services["api"]) and ":8000" in healthcheck_text(services["api"])
    assert "/_stcore/health" in healthcheck_text(services["dashboard"])
    for name in ("miner-cpu", "miner-gpu"):
        text = healthcheck_text(services[name])
        node = services[name]["command"][services[name]["command"].index("-n") + 1].split("@")[0]
        # The ping goes to this container's own worker node.
        assert "inspect ping" in text and f"-d {node}@$$HOSTNAME" in text, name
    assert "healthcheck" not in services["migrate"]


def test_start_up_order(services):
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"].get("restart") == "no"  # one-shot
    for name, svc in services.items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, (name, dep)
            assert spec["condition"] in VALID_CONDITIONS, (name, dep)
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"
            if dep == "migrate":
                assert spec["condition"] == "service_completed_successfully"
    for name in ("api", "miner-cpu", "miner-gpu", "trainer"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == deps["redis"]["condition"] == "service_healthy", name
    assert services["dashboard"]["depends_on"] == {"api": {"condition": "service_healthy"}}
    # No cycles: a topological order exists.
    order, pending = [], dict(services)
    while pending:
        ready = [n for n, s in pending.items() if set(s.get("depends_on") or {}) <= set(order)]
        assert ready, f"depends_on cycle among {sorted(pending)}"
        order += ready
        for n in ready:
            del pending[n]


def test_ports_match_the_commands(services):
    def container_port(mapping: str) -> int:
        return int(str(mapping).rsplit(":", 1)[1])

    api_cmd, dash_cmd = services["api"]["command"], services["dashboard"]["command"]
    assert [container_port(p) for p in services["api"]["ports"]] == [int(api_cmd[api_cmd.index("--port") + 1])]
    assert [container_port(p) for p in services["dashboard"]["ports"]] == [
        int(dash_cmd[dash_cmd.index("--server.port") + 1])]
    assert "0.0.0.0" in api_cmd  # reachable from the dashboard container and the host
    for name in SERVICES - {"api", "dashboard"}:
        assert "ports" not in services[name], f"{name} needs no published port"


def test_environment_and_volumes(compose, services):
    from services.common.settings import Settings

    known = {f"ORL_{f.upper()}" for f in Settings.model_fields}
    declared = set(compose.get("volumes") or {})
    for name in OURS:
        env = services[name].get("environment") or {}
        assert isinstance(env, dict), name
        unknown = {k for k in env if k.startswith("ORL_")} - known
        assert not unknown, f"{name}: {unknown} are not settings of services.common.settings"
        assert env["ORL_API_URL"] == "http://api:8000"
        for vol in services[name].get("volumes") or []:
            source, target, _ = split_volume(vol)
            assert target.startswith("/"), vol
            assert source.startswith(("./", "${")) or source in declared, f"{name}: volume {source} not declared"
    for name in OURS - {"dashboard"}:
        env = services[name]["environment"]
        db_url = env["ORL_DATABASE_URL"]
        assert db_url.startswith("postgresql+psycopg://") and "@postgres:5432/" in db_url
        assert env["ORL_BROKER_URL"] == "redis://redis:6379/0"
        modes = {split_volume(v)[1]: split_volume(v)[2] for v in services[name]["volumes"]}
        assert env["ORL_ARTIFACTS_DIR"] in modes and env["ORL_DATA_ROOTS"] in modes
        assert modes[env["ORL_DATA_ROOTS"]] == "ro", "images are only read"
    # The dashboard talks to the API only.
    assert not {"ORL_DATABASE_URL", "ORL_BROKER_URL"} & set(services["dashboard"]["environment"])
    assert {"pgdata", "artifacts"} <= declared
    assert any(v.startswith("pgdata:") for v in services["postgres"]["volumes"])
    # Interpolations are well formed: ${VAR}, ${VAR:-default} or ${VAR:?message}.
    for ref in re.findall(r"(?<!\$)\$\{([^}]*)\}", (REPO / "docker-compose.yml").read_text()):
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*(:?[-?].*)?", ref), ref


def test_gpu_override(services):
    gpu = load("docker-compose.gpu.yml")["services"]
    assert set(gpu) == {"miner-gpu", "trainer"}
    for name, svc in gpu.items():
        assert name in services
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] for d in devices), name
        # An override only adds: the command and the rest stay those of the base file.
        assert "command" not in svc and "image" not in svc
    # The base file reserves no GPU, so it runs on a CPU-only host.
    assert all("deploy" not in svc for svc in services.values())


def test_dockerfile_builds_one_image_for_all_services(services):
    text = (REPO / "Dockerfile").read_text()
    lines = [l for l in text.splitlines() if l and not l.startswith("#")]
    assert lines[0].startswith("FROM python:3.11")
    copied = set()
    for line in lines:
        if line.startswith("COPY"):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
                copied.add(src)
    # Everything the commands import or run is in the image.
    for needed in ("orl", "services", "dashboard", "migrations", "alembic.ini", "requirements.txt"):
        assert needed in copied, needed
    assert re.search(r"^RUN pip install -r requirements\.txt", text, re.M)
    user = [l for l in lines if l.startswith("USER ")]
    assert user and user[-1].split()[1] not in {"root", "0"}, "services run unprivileged"
    cmd = [l for l in lines if l.startswith("CMD")][-1]
    assert cmd.split(None, 1)[1].startswith("["), "exec form, so signals reach the process"
    assert "ENTRYPOINT" not in text, "compose gives each service its own command"
    reqs = (REPO / "requirements.txt").read_text()
    for pkg in ("uvicorn", "celery", "streamlit", "alembic", "psycopg"):
        assert re.search(rf"^{pkg}(\[[a-z]+\])?==", reqs, re.M), pkg
    # never the non-headless OpenCV next to the contrib build
    assert "opencv-contrib-python-headless" in reqs and "\nopencv-python" not in reqs
