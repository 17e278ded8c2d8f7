"""Security through a real `mlxd serve`: API keys, Host and Origin checks, model names
that never touch the filesystem; plus the pure functions beside them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from mlxd.api.security import host_name, matching_label, policy_for
from mlxd.server import access
from mlxd.server.cli import _ServedModel, trusted_models
from mlxd.server.runtime import NOT_SERVED, Runtime
from tests.ground_truth import GREETING
from tests.server_process import ROOT, ServerProcess

HELLO = [{"role": "user", "content": "Say hello."}]
CHAT = {"model": "greeter", "messages": HELLO, "max_tokens": 2}
SECRETS = ("plain-secret", "alice-secret", "bob-secret", "carol-secret")
APP_ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, greeting_model):
    """Keys from all three sources, one extra Host name and one CORS origin."""
    logs = tmp_path_factory.mktemp("security-logs")
    key_file = logs / "keys.txt"
    key_file.write_text("# the team's keys\ncarol:carol-secret\n\n")
    server = ServerProcess(
        logs,
        ["--model", str(greeting_model.path), "--api-key", "plain-secret", "--api-key", "alice:alice-secret",
         "--api-key-file", str(key_file), "--allowed-host", "mybox.local", "--cors-origin", APP_ORIGIN],
        env={access.ENV_VAR: "bob:bob-secret"},
    ).start()
    yield server
    server.stop()


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


DOORS = [("POST", "/v1/chat/completions", CHAT), ("GET", "/v1/models", None), ("GET", "/v1/models/greeter", None)]


@pytest.mark.parametrize("method, path, body", DOORS)
@pytest.mark.parametrize("headers, message", [
    ({}, "Missing API key"),
    (bearer("wrong"), "Incorrect API key provided."),
    (bearer("alice:alice-secret"), "Incorrect API key provided."),  # the label is not part of the key
    ({"x-api-key": "wrong"}, "Incorrect API key provided."),
])
def test_openai_doors_refuse_a_missing_or_wrong_key_in_their_envelope(keyed_server, method, path, body, headers,
                                                                      message):
    response = httpx.request(method, keyed_server.base_url + path, json=body, headers=headers, timeout=30)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key"
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(message)


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong"}, bearer("wrong")])
def test_the_anthropic_door_refuses_in_its_own_envelope(keyed_server, headers):
    response = keyed_server.post("/v1/messages", json={"model": "greeter", "max_tokens": 2, "messages": HELLO},
                                 headers=headers)
    assert response.status_code == 401
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "authentication_error"
    # With the key it gets past the door (whether or not this build has the Messages route).
    allowed = keyed_server.post("/v1/messages", json={}, headers={"x-api-key": "bob-secret"})
    assert allowed.status_code != 401


@pytest.mark.parametrize("key", SECRETS)
def test_every_key_source_works_through_the_openai_sdk(keyed_server, key):
    client = openai.OpenAI(base_url=keyed_server.base_url + "/v1", api_key=key, max_retries=0, timeout=120)
    answer = client.chat.completions.create(model="greeter", messages=HELLO, temperature=0)
    assert answer.choices[0].message.content == GREETING
    assert {m.id for m in client.models.list().data} == {"greeter"}


def test_x_api_key_header_and_health_without_a_key(keyed_server):
    assert keyed_server.get("/v1/models", headers={"x-api-key": "carol-secret"}).status_code == 200
    assert keyed_server.get("/health").json()["status"] == "ok"
    assert keyed_server.post("/health").status_code == 401  # only GET /health is open
    with pytest.raises(openai.AuthenticationError):
        keyed_server.client().models.list()  # the SDK's own 401 handling sees an OpenAI error


def test_logs_name_labels_never_keys(keyed_server):
    keyed_server.get("/v1/models", headers=bearer("wrong-guess"))
    log = keyed_server.log()
    plain_label = "key-" + hashlib.sha256(b"plain-secret").hexdigest()[:8]
    assert f"API keys required (labels: {plain_label}, alice, carol, bob)" in log
    assert "refused GET /v1/models from 127.0.0.1: wrong API key" in log
    for secret in (*SECRETS, "wrong-guess"):
        assert secret not in log


def test_ps_sends_the_key_from_the_environment(keyed_server):
    def ps(env_key):
        env = {k: v for k, v in os.environ.items() if k != access.ENV_VAR}
        env.update({access.ENV_VAR: env_key} if env_key else {})
        return subprocess.run([sys.executable, "-m", "mlxd.server.cli", "ps", "--port", str(keyed_server.port)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    assert keyed_server.post("/v1/chat/completions", json=CHAT, headers=bearer("bob-secret")).status_code == 200
    refused = ps(None)
    assert refused.returncode == 1 and f"answered HTTP 401; set {access.ENV_VAR}" in refused.stderr
    listed = ps("me:carol-secret")
    assert listed.returncode == 0 and "greeter" in listed.stdout


def test_doctor_shows_the_bind_and_the_key_labels(tmp_path):
    def doctor(*args, **env):
        child = {k: v for k, v in os.environ.items() if k != access.ENV_VAR}
        child.update(env, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
        out = subprocess.run([sys.executable, "-m", "mlxd.server.cli", "doctor", *args], cwd=ROOT, env=child,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    lan = json.loads(doctor("--json", "--host", "0.0.0.0"))["access"]
    assert lan["bind"] == "0.0.0.0" and "every network interface" in lan["reach"]
    assert lan["env_key_labels"] == [] and "without an API key" in lan["warning"]
    table = doctor(**{access.ENV_VAR: "alice:a-secret"})
    assert "bind      127.0.0.1: this machine only" in table
    assert f"api keys  1 in {access.ENV_VAR} (alice)" in table and "a-secret" not in table and "WARNING" not in table


@pytest.mark.parametrize("host, status", [
    ("rebind.example", 403),
    ("rebind.example:{port}", 403),
    ("127.0.0.1.rebind.example:{port}", 403),
    ("localhost:{port}", 200),
    ("localhost", 200),
    ("127.0.0.1:{port}", 200),
    ("[::1]:{port}", 200),
    ("mybox.local:{port}", 200),  # --allowed-host
])
def test_a_loopback_bind_answers_only_loopback_and_allowed_host_names(keyed_server, host, status):
    host = host.format(port=keyed_server.port)
    response = keyed_server.get("/v1/models", headers={"Host": host, **bearer("alice-secret")})
    assert response.status_code == status
    if status == 403:
        assert response.json()["error"]["code"] == "host_not_allowed"
        assert keyed_server.get("/health", headers={"Host": host}).status_code == 403
        anthropic = keyed_server.post("/v1/messages", json={}, headers={"Host": host})
        assert anthropic.json()["error"]["type"] == "permission_error"


def test_cors_origin_gets_cors_headers_for_that_origin_only(keyed_server):
    preflight = httpx.options(keyed_server.base_url + "/v1/chat/completions", headers={
        "Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"}, timeout=30)
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == APP_ORIGIN
    assert preflight.headers["access-control-allow-headers"] == "authorization, content-type"
    assert "POST" in preflight.headers["access-control-allow-methods"]

    answer = keyed_server.post("/v1/chat/completions", json=CHAT, headers={"Origin": APP_ORIGIN, **bearer("bob-secret")})
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == APP_ORIGIN
    # A refusal carries the CORS headers too, so the page can read why.
    refused = keyed_server.post("/v1/chat/completions", json=CHAT, headers={"Origin": APP_ORIGIN})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == APP_ORIGIN

    for request in (
        lambda: keyed_server.post("/v1/chat/completions", json=CHAT,
                                  headers={"Origin": "http://evil.example", **bearer("bob-secret")}),
        lambda: httpx.options(keyed_server.base_url + "/v1/chat/completions", timeout=30, headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}),
    ):
        response = request()
        assert response.status_code == 403
        assert "access-control-allow-origin" not in response.headers
        assert response.json()["error"]["code"] == "origin_not_allowed"


@pytest.mark.parametrize("origin, status", [
    ("http://evil.example", 403),
    ("null", 403),  # sandboxed frames and file:// pages
    ("http://localhost:1", 403),  # another port is another origin
    ("http://127.0.0.1:{port}", 200),  # same origin: the server's own pages
    (None, 200),  # SDKs and curl send no Origin
])
def test_without_cors_origin_only_same_origin_browser_requests_pass(core_server, origin, status):
    headers = {"Origin": origin.format(port=core_server.port)} if origin else {}
    response = core_server.get("/v1/models", headers=headers)
    assert response.status_code == status
    assert "access-control-allow-origin" not in response.headers
    same_site = core_server.get("/v1/models", headers={"Host": f"localhost:{core_server.port}",
                                                       "Origin": f"http://localhost:{core_server.port}"})
    assert same_site.status_code == 200


def test_a_lan_bind_without_keys_warns_who_can_reach_it(tmp_path):
    server = ServerProcess(tmp_path, ["--host", "0.0.0.0"]).start()
    try:
        assert "mlxd serves 0.0.0.0:" in server.log()
        assert "every network interface" in server.log() and "without an API key" in server.log()
        # A LAN bind answers whatever name the LAN knows this machine by.
        assert server.get("/v1/models", headers={"Host": "studio.lan:8080"}).status_code == 200
    finally:
        server.stop()


def _probe_names(tmp_path: Path, greeting_model) -> list[str]:
    copy = shutil.copytree(greeting_model.path, tmp_path / "copy-of-greeter")
    link = tmp_path / "link-to-greeter"
    link.symlink_to(greeting_model.path, target_is_directory=True)
    return [
        " /etc", "/etc", "/nonexistent", str(copy), f" {copy}", str(link), str(tmp_path / "missing"),
        str(tmp_path), "~", "~/", "~/.cache", "..", "../..", " ../greeter", "./greeter", "./tests",
        "tests/../scripts", "greeter/..", "mlx-community/../../etc", "C:\\Windows",
        f"{greeting_model.path}/..",
    ]


def test_every_path_like_name_gets_the_same_404_whatever_is_on_disk(core_server, greeting_model, tmp_path):
    bodies = set()
    for name in _probe_names(tmp_path, greeting_model):
        response = core_server.post("/v1/chat/completions", json={"model": name, "messages": HELLO})
        assert response.status_code == 404, name
        bodies.add(response.text)
    bodies.add(core_server.get("/v1/models//etc/passwd").text)  # one model by id: the same answer
    assert len(bodies) == 1
    error = json.loads(bodies.pop())["error"]
    assert error == {"message": NOT_SERVED, "type": "invalid_request_error", "param": "model",
                     "code": "model_not_found"}
    assert core_server.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("existing, missing", [("tests", "no-such-dir"), ("tests/clients", "no-such/dir")])
def test_bare_names_answer_the_same_whether_a_directory_exists_or_not(core_server, existing, missing):
    """The server runs in the repository root, where `tests/` exists; it is never looked at."""
    assert (Path(__file__).parent.parent / existing).is_dir()
    answers = []
    for name in (existing, missing):
        response = core_server.post("/v1/chat/completions", json={"model": name, "messages": HELLO})
        assert response.status_code == 404
        answers.append(response.text.replace(json.dumps(name)[1:-1], "NAME"))
    assert answers[0] == answers[1]


def test_names_are_trimmed(core_server):
    answer = core_server.client().chat.completions.create(model="  greeter\n", messages=HELLO, temperature=0)
    assert answer.choices[0].message.content == GREETING
    assert answer.model == "greeter"


def test_models_listing_shows_no_paths(core_server, models_dir):
    listing = core_server.get("/v1/models").text
    assert str(models_dir) not in listing and os.path.expanduser("~") not in listing
    for entry in json.loads(listing)["data"]:
        assert "path" not in entry
        assert not any(isinstance(v, str) and v.startswith("/") for v in entry.values())


# Pure functions beside the server tests.

def test_keys_parse_with_and_without_labels(tmp_path):
    assert access.parse_key("alice:s3cret") == access.ApiKey("alice", b"s3cret")
    unlabelled = access.parse_key(" sk-abc ")
    assert unlabelled.secret == b"sk-abc" and unlabelled.label == "key-" + hashlib.sha256(b"sk-abc").hexdigest()[:8]
    assert access.parse_key("a b:c").secret == b"a b:c"  # not a label: the whole text is the key
    assert "s3cret" not in repr(access.parse_key("alice:s3cret"))
    key_file = tmp_path / "keys"
    key_file.write_text("# comment\n\nfile:f1\n")
    keys = access.load_keys(["cli:c1"], [str(key_file)], {access.ENV_VAR: "env:e1, e2 ,"})
    assert [k.label for k in keys][:3] == ["cli", "file", "env"] and len(keys) == 4
    with pytest.raises(ValueError, match="used more than once: a"):
        access.load_keys(["a:1", "a:2"], [], {})
    with pytest.raises(ValueError, match="empty"):
        access.load_keys([" "], [], {})


def test_key_matching_and_host_names():
    keys = (access.ApiKey("a", b"one"), access.ApiKey("b", b"two"))
    assert matching_label(keys, b"two") == "b"
    assert matching_label(keys, b"tw") is None and matching_label(keys, b"two ") is None
    assert host_name("[::1]:8080") == "::1" and host_name("LocalHost:1") == "localhost" and host_name("::1") == "::1"
    assert all(access.is_loopback(h) for h in ("localhost", "127.0.0.1", "127.8.9.1", "::1", "[::1]", "a.localhost"))
    assert not any(access.is_loopback(h) for h in ("0.0.0.0", "192.168.1.2", "localhost.evil.example", "::"))
    assert policy_for("127.0.0.1", [], [], []).allowed_hosts == frozenset()
    assert policy_for("0.0.0.0", [], [], []).allowed_hosts is None
    assert policy_for("0.0.0.0", [], ["Studio.lan:8080"], []).allowed_hosts == {"studio.lan"}


def test_trust_remote_code_reaches_only_the_models_named_at_start(tmp_path):
    served = [_ServedModel("a", tmp_path / "a", True, arg="/models/a"),
              _ServedModel("qwen3:8b-4bit", tmp_path / "q", False, arg="qwen3:8b")]
    assert trusted_models(served, False, []) == frozenset()
    assert trusted_models(served, False, ["/models/a"]) == {"a"}
    assert trusted_models(served, False, ["qwen3:8b"]) == {"qwen3:8b-4bit"}
    assert trusted_models(served, True, []) == {"a", "qwen3:8b-4bit"}
    with pytest.raises(ValueError, match="names no --model: b"):
        trusted_models(served, False, ["b"])
    runtime = Runtime(None, {"a": tmp_path / "a", "b": tmp_path / "b"}, trusted=frozenset({"a"}))
    assert runtime.resolve(" a").trust_remote_code is True
    assert runtime.resolve("b").trust_remote_code is False


CUSTOM_ARCH = '''from pathlib import Path

from mlx_lm.models.qwen2 import Model, ModelArgs  # noqa: F401

Path(__file__).with_name("custom-code-ran").touch()
'''


def _model_with_custom_code(source: Path, target: Path) -> Path:
    """A copy of a model whose config asks mlx-lm to run its own architecture module."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "model_file": "custom_arch.py"}))
    (target / "custom_arch.py").write_text(CUSTOM_ARCH)
    return target


def test_remote_code_runs_only_for_the_model_named_with_trust_remote_code_for(tmp_path, greeting_model):
    trusted = _model_with_custom_code(greeting_model.path, tmp_path / "trusted-greeter")
    untrusted = _model_with_custom_code(greeting_model.path, tmp_path / "untrusted-greeter")
    server = ServerProcess(tmp_path, ["--model", str(trusted), "--model", str(untrusted), "--max-loaded-models", "2",
                                      "--trust-remote-code-for", "trusted-greeter"]).start()
    try:
        answer = server.client().chat.completions.create(model="trusted-greeter", messages=HELLO, temperature=0)
        assert answer.choices[0].message.content == GREETING
        assert (trusted / "custom-code-ran").exists()
        refused = server.post("/v1/chat/completions", json={"model": "untrusted-greeter", "messages": HELLO})
        assert refused.status_code == 500
        error = refused.json()["error"]
        assert error["code"] == "model_load_failed" and str(tmp_path) not in error["message"]
        assert not (untrusted / "custom-code-ran").exists()
        assert "Pass trust_remote_code=True" in server.log()  # the reason stays in the server log
    finally:
        server.stop()


# ----------------------------------------------------------------------
# The dashboard with keys: the page loads without one and asks for it


@pytest.mark.parametrize("path, file, kind", [("/", "index.html", "text/html"),
                                              ("/dashboard/dashboard.js", "dashboard.js", "text/javascript"),
                                              ("/dashboard/dashboard.css", "dashboard.css", "text/css")])
def test_the_dashboard_page_loads_without_a_key(keyed_server, path, file, kind):
    response = keyed_server.get(path)
    assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
    assert response.content == (ROOT / "api" / "dashboard" / file).read_bytes()  # the shipped file: no data


@pytest.mark.parametrize("method, path", [("GET", "/v1/usage"), ("GET", "/v1/usage/requests"), ("GET", "/metrics"),
                                          ("GET", "/dashboard/other.js"), ("POST", "/"), ("GET", "//")])
def test_the_dashboards_data_and_anything_else_still_need_a_key(keyed_server, method, path):
    response = httpx.request(method, keyed_server.base_url + path, timeout=30)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    if method == "GET" and path.startswith("/v1/usage"):
        assert keyed_server.get(path, headers=bearer("carol-secret")).status_code == 200


def _dashboard_dom(profile: Path, url: str) -> str:
    """The page as headless Chromium renders it, in a profile (and so a localStorage) that persists."""
    from tests.test_usage import CHROMIUM, CHROMIUM_FLAGS

    done = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="needs Debian's chromium (apt-get install chromium; .ci/run does)")
def test_the_dashboard_asks_for_a_key_and_keeps_the_one_given(keyed_server, tmp_path):
    client = openai.OpenAI(base_url=keyed_server.base_url + "/v1", api_key="alice-secret", max_retries=0, timeout=120)
    client.chat.completions.create(model="greeter", messages=HELLO, temperature=0)
    url = keyed_server.base_url + "/"

    asking = _dashboard_dom(tmp_path / "no-key", url)
    assert 'id="status" class="status down">API key needed<' in asking
    assert '<form id="key-form" class="key-form">' in asking  # shown: no `hidden`
    assert "this server needs an API key" in asking

    refused = _dashboard_dom(tmp_path / "wrong-key", url + "#key=wrong")
    assert "the saved API key was refused" in refused and '<form id="key-form" class="key-form">' in refused

    profile = tmp_path / "keyed"
    for page in (url + "#key=alice-secret", url):  # the second visit has the key from localStorage
        dom = _dashboard_dom(profile, page)
        assert 'id="status" class="status ok">ok<' in dom
        assert '<form id="key-form" class="key-form" hidden="">' in dom
        totals = keyed_server.get("/v1/usage", headers=bearer("alice-secret")).json()["totals"]
        assert f'id="total-requests">{totals["requests"]:,}<' in dom and totals["requests"] >= 1
        assert "<td>greeter</td>" in dom.split('id="requests"')[1]
