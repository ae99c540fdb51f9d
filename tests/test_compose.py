"""docker-compose.yml checked structurally (Docker cannot run here): services, health, secrets, ports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}")
SECRETS = ("POSTGRES_PASSWORD", "S3_SECRET_KEY", "S3_ACCESS_KEY", "RAY_AUTH_TOKEN")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    pairs = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} with ``env`` (a small, nested-aware version)."""
    pattern = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}")
    while (match := pattern.search(text)) is not None:
        name, op, arg = match.groups()
        value = env.get(name)
        if not value and op and op.endswith("-"):
            value = arg
        if value is None or (not value and op == ":?"):
            raise AssertionError(f"${{{name}}} is not set: {arg}")
        text = text[: match.start()] + value + text[match.end() :]
    return text


def test_services_and_images(compose: dict) -> None:
    services = compose["services"]
    expected = {"postgres", "rustfs", "create-bucket", "mlflow", "optuna-dashboard", "ray-head", "ray-worker", "driver"}
    assert expected <= set(services) and "worker" not in services  # the claims workers are gone
    assert (REPO / "Dockerfile").is_file() and (REPO / ".dockerignore").is_file()
    worker = services["ray-worker"]
    assert worker["build"]["context"] == "." and "container_name" not in worker  # scalable: --scale ray-worker=N
    assert all("container_name" not in s for s in services.values())
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"] and devices[0]["count"] == 1
    assert "init-databases.sh" in " ".join(services["postgres"]["volumes"])
    assert (REPO / "docker" / "postgres" / "init-databases.sh").is_file()
    assert (REPO / "docker" / "create_bucket.py").is_file()


def test_mlflow_serves_artifacts_to_the_bucket_and_allows_its_service_name(compose: dict, env_example: dict) -> None:
    mlflow = compose["services"]["mlflow"]
    command = " ".join(mlflow["command"])
    assert "--serve-artifacts" in command and "--artifacts-destination" in command and "s3://" in command
    assert "--backend-store-uri" in command and "postgresql" in command and "--allowed-hosts" in command
    allowed = interpolate(mlflow["environment"]["MLFLOW_ALLOWED_HOSTS"], env_example).split(",")
    assert "mlflow" in allowed and any(h.startswith("mlflow:") for h in allowed)
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://rustfs:9000"


def test_healthchecks_and_dependency_conditions(compose: dict) -> None:
    services = compose["services"]
    for name in ["postgres", "rustfs", "mlflow", "optuna-dashboard"]:
        check = services[name]["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and check["retries"] >= 3, name
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services, (name, dependency)
            wanted = "service_completed_successfully" if dependency == "create-bucket" else "service_healthy"
            assert rule["condition"] == wanted, (name, dependency)
            if wanted == "service_healthy":
                assert "healthcheck" in services[dependency], dependency
    assert services["mlflow"]["depends_on"].keys() >= {"postgres", "create-bucket"}
    assert services["ray-worker"]["depends_on"].keys() >= {"ray-head", "mlflow"}
    assert services["driver"]["depends_on"].keys() >= {"ray-head", "mlflow"}
    assert services["driver"]["restart"] == "on-failure"  # a crashed driver reruns: finished cells skipped
    assert services["optuna-dashboard"]["depends_on"].keys() >= {"postgres"}


def test_ports_bind_to_loopback_by_default(compose: dict, env_example: dict) -> None:
    published = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert published
    for port in published:
        for env in (env_example, {}):  # with the example .env, and with the compose defaults alone
            resolved = interpolate(port, {k: v for k, v in env.items() if not k.endswith("PASSWORD")})
            assert resolved.startswith("127.0.0.1:"), port


def test_credentials_come_only_from_env(compose: dict, env_example: dict) -> None:
    text = (REPO / "docker-compose.yml").read_text()
    for secret in SECRETS:
        assert f"${{{secret}:?" in text, f"{secret} must be required from .env"
        assert env_example[secret].startswith("CHANGE-ME"), secret
    for literal in ["rustfsadmin", "minioadmin", "changeme"]:  # well-known default credentials
        assert literal.lower() not in text.lower(), literal
    for service in compose["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in ("PASSWORD", "SECRET", "ACCESS_KEY")):
                assert str(value).startswith("${"), key
    documented = set(env_example) | set(re.findall(r"^# ([A-Z_]+)=", (REPO / ".env.example").read_text(), re.M))
    used = set(VARIABLE.findall(text))
    assert used <= documented, f"not in .env.example: {sorted(used - documented)}"
    assert ".env" in (REPO / ".gitignore").read_text().splitlines()
    assert ".env" in (REPO / ".dockerignore").read_text().splitlines()


def test_ray_nodes_and_driver_share_stores_token_and_checkpoints(compose: dict, env_example: dict) -> None:
    services = compose["services"]
    for name in ("ray-head", "ray-worker", "driver"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name
        assert env["RAY_USAGE_STATS_ENABLED"] == "0", name
    assert "--disable-usage-stats" in " ".join(services["ray-head"]["command"])
    for name in ("ray-worker", "driver"):
        env = services[name]["environment"]
        assert interpolate(env["MLFLOW_TRACKING_URI"], env_example) == "http://mlflow:5000", name
        assert any(v.startswith("checkpoints:/checkpoints") for v in services[name]["volumes"]), name
    command = " ".join(services["driver"]["command"])
    assert "run-study" in command and "--ray ray-head:6379" in command and "--checkpoint-dir /checkpoints" in command
    assert "checkpoints" in compose["volumes"]


def test_dockerfile_installs_the_harness_with_a_chosen_torch_build() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX_URL" in text and '--index-url "$TORCH_INDEX_URL"' in text
    assert "pip install . boto3 optuna-dashboard" in text  # ray comes with the harness (pyproject)
    assert re.search(r"^USER harness$", text, re.M)
    copied = re.findall(r"^COPY (\S+)", text, re.M)
    assert all((REPO / c.rstrip("*")).exists() or c.endswith("*") for c in copied)
