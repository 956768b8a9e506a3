"""Fixtures: a mock upstream, a real `weir` in front of it, and the official SDK clients.

The binary comes from $WEIR_BIN (default: target/debug/weir at the repository root).
Models served by the gateway:
- ``gpt``    -> the mock upstream, OpenAI dialect
- ``claude`` -> the mock upstream, Anthropic dialect
- ``mock``   -> Weir's built-in offline ``mock`` provider
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import anthropic
import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from mock_upstream import Upstream  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WEIR_BIN = Path(os.environ.get("WEIR_BIN", ROOT / "target" / "debug" / "weir"))
READY_TIMEOUT_S = 30
START_ATTEMPTS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def upstream():
    up = Upstream()
    yield up
    up.close()


@pytest.fixture(scope="session")
def weir(upstream, tmp_path_factory):
    """Base URL of a running gateway (`http://127.0.0.1:PORT`)."""
    if not WEIR_BIN.is_file():
        pytest.exit(f"weir binary not found at {WEIR_BIN}: run `cargo build` or set WEIR_BIN", returncode=2)
    tmp = tmp_path_factory.mktemp("weir")
    config = tmp / "weir.toml"
    config.write_text(
        f"""
[log]
level = "info"

[retry]
attempts_per_target = 1

[providers.oa]
kind = "openai"
base_url = "{upstream.base}/v1"
api_key = "sk-python-e2e"

[providers.an]
kind = "anthropic"
base_url = "{upstream.base}"
api_key = "sk-ant-python-e2e"

[providers.local]
kind = "mock"

[[models]]
name = "gpt"
targets = [{{ provider = "oa", model = "gpt-up" }}]

[[models]]
name = "claude"
targets = [{{ provider = "an", model = "claude-up" }}]

[[models]]
name = "mock"
targets = [{{ provider = "local", model = "mock-1" }}]
"""
    )
    log_path = tmp / "weir.log"
    env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
    env["NO_COLOR"] = "1"
    for _ in range(START_ATTEMPTS):
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        log = open(log_path, "wb")
        proc = subprocess.Popen(
            [str(WEIR_BIN), "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None and not _ready(base):
            time.sleep(0.05)
        if proc.poll() is None and _ready(base):
            break
        proc.kill()
        proc.wait()
        log.close()
        output = log_path.read_text(errors="replace")
        if "in use" not in output.lower():
            pytest.exit(f"weir did not become ready on {base}:\n{output}", returncode=2)
    else:
        pytest.exit("weir could not bind a free port", returncode=2)
    yield base
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    log.close()
    output = log_path.read_text(errors="replace")
    if "sk-python-e2e" in output or "sk-ant-python-e2e" in output:
        pytest.fail(f"provider keys appear in the gateway's output:\n{output}")
    if code != 0:
        pytest.fail(f"weir exited with {code} after SIGTERM:\n{output}")


@pytest.fixture
def oai(weir) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{weir}/v1", api_key="client-key-unused", max_retries=0, timeout=20)


@pytest.fixture
def claude(weir) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=weir, api_key="client-key-unused", max_retries=0, timeout=20)
