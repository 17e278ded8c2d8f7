"""One model over a 2-rank MLX group on loopback (`mlxd launch` -> `mlx.launch --backend ring`),
driven by the openai client and compared with a single-process server on the same model.

The random model splits by tensor parallelism (the default); the scripted tool caller has
one real layer plus an identity layer, so it splits as a pipeline of layers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from scripts.testmodels import add_identity_layers, build_scripted_model
from tests.chat_helpers import assembled_calls, content_of, finish_reasons
from tests.ground_truth import ground_truth_prompt_tokens
from tests.server_process import ROOT, GroupProcess, free_port_pair
from tests.test_tool_calls import ASK, BASH_ARGS, BASH_CALL, TOOLS

AFTER_TOOL = "The command printed MARKER-1."
PROMPTS = ["Hello there", "Write a function that adds two numbers.", "What is the capital of France?"]
# Seconds without an answer from a rank before the group counts as broken (tests: short).
GROUP_TIMEOUT_S = 10
EXIT_WAIT_S = 60


@pytest.fixture(scope="module")
def tool_caller(models_dir):
    model = build_scripted_model(models_dir / "dist-caller", BASH_CALL, after_tool_result=AFTER_TOOL)
    add_identity_layers(model.path, 1)
    return model


@pytest.fixture(scope="module")
def random_group(tmp_path_factory, random_model):
    server = GroupProcess(tmp_path_factory.mktemp("group-logs"), ["--model", str(random_model)]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def caller_group(tmp_path_factory, tool_caller):
    server = GroupProcess(tmp_path_factory.mktemp("caller-logs"),
                          ["--model", str(tool_caller.path), "--shard", "pipeline"]).start()
    yield server
    server.stop()


def logged(group, *lines: str) -> str:
    """The group's log once it holds `lines` (or after EXIT_WAIT_S): mlx.launch relays the
    ranks' output through its own pipes, so a line may arrive after rank 0 answers /health."""
    deadline = time.monotonic() + EXIT_WAIT_S
    while not all(line in group.log() for line in lines) and time.monotonic() < deadline:
        time.sleep(0.1)
    return group.log()


def chat(server, model, content, **kwargs):
    return server.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0, **kwargs)


def test_group_reports_its_sharding_and_starts_one_http_server(random_group):
    log = logged(random_group, "distributed group of 2 over ring", "tensor sharding", "rank 1 of 2",
                 "following rank 0", "serving on http://")
    assert "distributed group of 2 over ring" in log and "tensor sharding" in log
    assert "rank 1 of 2" in log and "following rank 0" in log
    assert log.count("serving on http://") == 1


def test_greedy_output_is_token_identical_to_one_process(random_group, core_server, random_model):
    name = random_model.name
    for prompt in PROMPTS:
        one = chat(core_server, name, prompt, max_tokens=24, logprobs=True)
        two = chat(random_group, name, prompt, max_tokens=24, logprobs=True)
        assert [t.token for t in two.choices[0].logprobs.content] == [t.token for t in one.choices[0].logprobs.content]
        assert two.choices[0].message.content == one.choices[0].message.content
        # Exact usage; cached_tokens depends on what each server's prefix cache already holds.
        assert (two.usage.prompt_tokens, two.usage.completion_tokens) == (one.usage.prompt_tokens,
                                                                         one.usage.completion_tokens)


def test_usage_is_exact_and_the_second_turn_hits_the_prefix_cache(random_group, random_model):
    name = random_model.name
    turn1 = [{"role": "user", "content": "Tell me about the weather in Paris."}]
    first = random_group.client().chat.completions.create(model=name, messages=turn1, temperature=0, max_tokens=12)
    assert first.usage.prompt_tokens == ground_truth_prompt_tokens(random_model, turn1)
    assert first.usage.completion_tokens == 12
    turn2 = turn1 + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And tomorrow?"}]
    second = random_group.client().chat.completions.create(model=name, messages=turn2, temperature=0, max_tokens=12)
    assert second.usage.prompt_tokens == ground_truth_prompt_tokens(random_model, turn2)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_four_concurrent_streams_each_get_their_whole_answer(random_group, core_server, random_model):
    name = random_model.name
    prompts = [f"Count to {n}, please." for n in range(4)]
    expected = {p: chat(core_server, name, p, max_tokens=20).choices[0].message.content for p in prompts}
    results: dict[str, tuple] = {}

    def run(prompt):
        chunks = list(random_group.client().chat.completions.create(
            model=name, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=20, stream=True,
            stream_options={"include_usage": True}))
        results[prompt] = (content_of(chunks), chunks[-1].usage)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert set(results) == set(prompts)
    for prompt, (text, usage) in results.items():
        assert usage.completion_tokens == 20
        assert text == expected[prompt]


def test_streamed_tool_call_over_a_pipeline(caller_group, tool_caller):
    name = tool_caller.path.name
    assert "pipeline sharding" in logged(caller_group, "pipeline sharding")
    chunks = list(caller_group.client().chat.completions.create(
        model=name, messages=ASK, tools=TOOLS, stream=True, stream_options={"include_usage": True}))
    calls = assembled_calls(chunks)
    assert list(calls) == [0] and calls[0]["name"] == "bash"
    assert json.loads(calls[0]["arguments"]) == BASH_ARGS
    assert finish_reasons(chunks) == ["tool_calls"]
    usage = chunks[-1].usage
    assert usage.completion_tokens == len(tool_caller.script_token_ids) + 1
    # The tool's result: the model answers with its second script.
    call = calls[0]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": "bash", "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "MARKER-1"},
    ]
    answer = caller_group.client().chat.completions.create(model=name, messages=history, tools=TOOLS)
    assert answer.choices[0].message.content == AFTER_TOOL
    assert answer.choices[0].finish_reason == "stop"


def test_client_disconnect_stops_generation_on_every_rank(random_group, random_model):
    name = random_model.name
    with httpx.stream("POST", random_group.base_url + "/v1/chat/completions", timeout=120, json={
        "model": name, "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 200,
        "stream": True,
    }) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        health = random_group.get("/health").json()
        if health["requests"]["active"] == 0 and re.search(r"rank 1: removed sequences? \[\d+\]", random_group.log()):
            break
        time.sleep(0.2)
    assert health["requests"]["active"] == 0
    assert re.search(r"rank 1: removed sequences? \[\d+\]", random_group.log()), random_group.log()
    # The ranks are still in step: the next request is served.
    assert chat(random_group, name, "Hello there", max_tokens=4).usage.completion_tokens == 4


def test_killing_rank_1_mid_stream_errors_the_clients_and_rank_0_exits(tmp_path, random_model):
    group = GroupProcess(tmp_path, ["--distributed-timeout", str(GROUP_TIMEOUT_S), "--model", str(random_model)]).start()
    whole: list = []  # a non-streaming request in flight beside the stream
    body = {"model": random_model.name, "messages": [{"role": "user", "content": "Go on and on."}], "max_tokens": 220}
    waiting = threading.Thread(target=lambda: whole.append(group.post("/v1/chat/completions", json=body)))
    try:
        waiting.start()
        stream = group.client().chat.completions.create(
            model=random_model.name, messages=[{"role": "user", "content": "Go on forever."}], max_tokens=220,
            stream=True)
        with pytest.raises((openai.APIError, httpx.HTTPError)) as failed:
            for n, _ in enumerate(stream):
                if n == 3:
                    os.kill(group.rank_pid(1), signal.SIGKILL)
        assert "lost a rank" in str(failed.value)
        waiting.join(timeout=EXIT_WAIT_S)
        assert whole[0].status_code == 503, whole[0].text
        assert whole[0].json()["error"]["code"] == "engine_unavailable"
        assert group.proc.wait(timeout=EXIT_WAIT_S) == 1
        log = group.log()
        assert "the distributed group is broken" in log
        assert re.search(r"Node with rank 0 exited with code 1\b", log), log
    finally:
        group.stop()


def test_a_rank_that_stops_answering_fails_requests_with_503_and_rank_0_exits(tmp_path, random_model):
    group = GroupProcess(tmp_path, ["--distributed-timeout", str(GROUP_TIMEOUT_S), "--model", str(random_model)]).start()
    rank1 = group.rank_pid(1)
    try:
        stream = group.client().chat.completions.create(
            model=random_model.name, messages=[{"role": "user", "content": "Go on forever."}], max_tokens=220,
            stream=True)
        with pytest.raises(openai.APIError) as failed:
            for n, _ in enumerate(stream):
                if n == 3:  # alive, sockets open, silent: only the watchdog can tell
                    os.kill(rank1, signal.SIGSTOP)
        assert "lost a rank" in str(failed.value) and failed.value.code == "engine_unavailable"
        # Until it exits, rank 0 says why and refuses new requests.
        health = group.get("/health")
        assert health.status_code == 503 and "lost a rank" in health.text
        with pytest.raises(openai.APIStatusError) as refused:
            chat(group, random_model.name, "Hello", max_tokens=4)
        assert refused.value.status_code == 503 and refused.value.code == "engine_unavailable"
        os.kill(rank1, signal.SIGCONT)  # mlx.launch can stop it now
        assert group.proc.wait(timeout=EXIT_WAIT_S) == 1
        assert re.search(r"Node with rank 0 exited with code 1\b", group.log()), group.log()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rank1, signal.SIGCONT)
        group.stop()


def test_ranks_that_differ_are_named_at_start(tmp_path):
    script = tmp_path / "check.py"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    script.write_text(
        "import os, sys\n"
        "from mlxd.server.group import check_same, init_group\n"
        "group, info = init_group()\n"
        f"problem = check_same(group, '1.0.' + str(info.rank), {str(model)!r})\n"
        "print(f'rank {info.rank}: {problem}', flush=True)\n")
    launcher = Path(sys.executable).parent / "mlx.launch"
    out = subprocess.run([str(launcher), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2", "--starting-port",
                          str(free_port_pair()), "--", sys.executable, str(script)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, stdin=subprocess.PIPE)
    assert re.search(rf"rank 0: rank 1 on {re.escape(socket.gethostname())} runs mlxd 1.0.1, rank 0 on "
                     rf"\S+ runs mlxd 1.0.0", out.stdout), out.stdout + out.stderr


def test_doctor_under_the_launcher_shows_the_group(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mlxd.server.cli", "launch", "-n", "2", "--starting-port",
                          str(free_port_pair()), "--", "doctor", "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    data = json.loads(out.stdout)  # rank 0 alone prints
    group = data["distributed"]
    assert group["size"] == 2 and group["backend"] == "ring"
    assert [r["rank"] for r in group["ranks"]] == [0, 1]
    assert all(r["memory_bytes"] > 0 for r in group["ranks"])


def test_serve_distributed_outside_a_launch_says_how_to_start(random_model):
    out = subprocess.run([sys.executable, "-m", "mlxd.server.cli", "serve", "--distributed", "--model",
                          str(random_model)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "mlxd launch --hosts" in out.stderr


def test_launcher_command_runs_mlxd_with_this_python_and_serve_gets_distributed():
    import argparse

    from mlxd.server.launch import launcher_command

    args = argparse.Namespace(hosts="10.0.0.1,10.0.0.2", n=1, hostfile=None, backend="ring", starting_port=5000,
                              env=["A=1"], python=None)
    cmd = launcher_command(args, ["--", "serve", "--model", "m"])
    assert cmd[cmd.index("--hosts") + 1] == "10.0.0.1,10.0.0.2" and cmd[cmd.index("--backend") + 1] == "ring"
    assert cmd[cmd.index("--python") + 1] == sys.executable
    assert cmd[cmd.index("--env") + 1] == "A=1" and cmd[cmd.index("--starting-port") + 1] == "5000"
    assert cmd[-6:] == ["-m", "mlxd.server.cli", "serve", "--distributed", "--model", "m"]
    hostfile = argparse.Namespace(**{**vars(args), "hostfile": "hosts.json", "backend": None})
    cmd = launcher_command(hostfile, ["doctor"])
    assert "--hosts" not in cmd and cmd[cmd.index("--hostfile") + 1] == "hosts.json" and "--backend" not in cmd
    assert cmd[-3:] == ["-m", "mlxd.server.cli", "doctor"]


def test_model_digest_follows_config_and_weight_sizes(tmp_path):
    from mlxd.server.group import model_digest

    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    first = model_digest(tmp_path)
    assert model_digest(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"x" * 11)
    assert model_digest(tmp_path) != first
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "config.json").write_text('{"a": 2}')
    assert model_digest(tmp_path) != first
