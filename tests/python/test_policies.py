"""The quickstart policy chain (examples/quickstart-policies/weir.toml: auth, rate-limit,
redaction, routing, budget on the offline mock) driven by the official OpenAI SDK.

The gateway runs the example config itself; only the listen ports, the state directory and
the plugin paths (made absolute) are changed. Keys are created through the admin API.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from conftest import ROOT, WEIR_BIN, _free_port, _ready

EXAMPLE = ROOT / "examples" / "quickstart-policies" / "weir.toml"
ADMIN_TOKEN = "python-policies-admin-token"


def _build_wasm() -> None:
    missing = [d for d in ("auth", "redaction") if not (ROOT / "plugins" / d / "plugin.wasm").is_file()]
    if missing:
        subprocess.run(
            [str(ROOT / "scripts" / "build-plugins.sh"), *[str(ROOT / "plugins" / d) for d in missing]],
            check=True,
        )


def _config(port: int, admin_port: int, state: Path) -> str:
    text = EXAMPLE.read_text()
    text = text.replace('path = "../../plugins/', f'path = "{ROOT}/plugins/')
    text = re.sub(r'listen = "127\.0\.0\.1:8080"', f'listen = "127.0.0.1:{port}"', text)
    text = re.sub(r'listen = "127\.0\.0\.1:8081"', f'listen = "127.0.0.1:{admin_port}"', text)
    text = text.replace('path = "weir-state"', f'path = "{state}"')
    assert str(ROOT) in text and str(state) in text
    return text


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """(base URL, admin URL) of a gateway running the quickstart policy config."""
    if not WEIR_BIN.is_file():
        pytest.exit(f"weir binary not found at {WEIR_BIN}", returncode=2)
    _build_wasm()
    tmp = tmp_path_factory.mktemp("policies")
    env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
    env.update(NO_COLOR="1", WEIR_ADMIN_TOKEN=ADMIN_TOKEN)
    log_path = tmp / "weir.log"
    for _ in range(4):
        port, admin_port = _free_port(), _free_port()
        config = tmp / "weir.toml"
        config.write_text(_config(port, admin_port, tmp / "state"))
        base = f"http://127.0.0.1:{port}"
        log = open(log_path, "wb")
        proc = subprocess.Popen(
            [str(WEIR_BIN), "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None and not _ready(base):
            time.sleep(0.05)
        if proc.poll() is None and _ready(base):
            break
        proc.kill()
        proc.wait()
        log.close()
        if "in use" not in log_path.read_text(errors="replace").lower():
            pytest.exit(f"weir did not start:\n{log_path.read_text(errors='replace')}", returncode=2)
    else:
        pytest.exit("weir could not bind free ports", returncode=2)
    yield base, f"http://127.0.0.1:{admin_port}"
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
    output = log_path.read_text(errors="replace")
    assert "ann@example.com" not in output, "PII in the gateway's logs"


def _admin(admin: str, method: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(
        f"{admin}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"authorization": f"Bearer {ADMIN_TOKEN}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _client(base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


def test_the_quickstart_chain_works_with_the_openai_sdk(gateway):
    base, admin = gateway
    key = _admin(admin, "POST", "/admin/plugins/auth/keys", {"name": "sdk", "tenant": "demo", "rpm": 5})
    client = _client(base, key["secret"])

    # auth + routing (alias) + redaction (pseudonymized for the provider, restored for us)
    raw = client.chat.completions.with_raw_response.create(
        model="fast", messages=[{"role": "user", "content": "mail me at ann@example.com"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Echo: mail me at ann@example.com"
    # rate-limit headers, budget header
    assert raw.headers["x-ratelimit-limit-requests"] == "5"
    assert raw.headers["x-ratelimit-remaining-requests"] == "4"
    assert float(raw.headers["x-weir-budget-remaining-usd"]) < 5

    # streaming through the whole chain
    stream = client.chat.completions.create(
        model="smart", stream=True, messages=[{"role": "user", "content": "count to three"}]
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "Echo: count to three"

    # redaction blocks a card number
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "card 4111 1111 1111 1111"}]
        )

    # the key's rate limit: 5 per minute (the blocked request above counted too)
    with pytest.raises(openai.RateLimitError) as err:
        for _ in range(5):
            client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
    assert err.value.response.headers["retry-after"]

    # spend is visible in the admin API
    deadline = time.monotonic() + 10
    lines: list = []
    while time.monotonic() < deadline:
        lines = _admin(admin, "GET", f"/admin/plugins/budget/usage?scope=key&id={key['id']}&period=total")["usage"]
        if lines and lines[0]["requests"] >= 2:
            break
        time.sleep(0.1)
    assert lines and lines[0]["spend_usd"] > 0
    # the budget plugin knows spend; the key's name is the auth plugin's
    assert _admin(admin, "GET", f"/admin/plugins/auth/keys/{key['id']}")["name"] == "sdk"


def test_wrong_revoked_and_over_budget_keys_are_refused(gateway):
    base, admin = gateway
    with pytest.raises(openai.AuthenticationError):
        _client(base, "wk-not-a-key").chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "hi"}]
        )

    key = _admin(admin, "POST", "/admin/plugins/auth/keys", {"name": "short", "models": ["fast"]})
    client = _client(base, key["secret"])
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="smart", messages=[{"role": "user", "content": "hi"}])
    _admin(admin, "POST", f"/admin/plugins/auth/keys/{key['id']}/revoke")
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])

    poor = _admin(admin, "POST", "/admin/plugins/auth/keys", {"name": "poor", "budget_usd": 0.000001})
    with pytest.raises(openai.APIStatusError) as err:
        _client(base, poor["secret"]).chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "hi"}]
        )
    assert err.value.status_code == 402
    assert err.value.body["code"] == "budget_exceeded"
