"""Model lifecycle through a real server: load on first use once, keep-alive, max loaded models."""

from __future__ import annotations

import threading
import time

from tests.ground_truth import GREETING
from tests.server_process import ServerProcess, downloaded

HELLO = [{"role": "user", "content": "Say hello."}]


def loaded(server) -> set[str]:
    return {m["id"] for m in server.get("/v1/models").json()["data"] if m["loaded"]}


def test_loads_once_on_first_use_and_evicts_the_least_recently_used(tmp_path, greeting_model, random_model):
    # --max-loaded-models 1 (default): the greeter is loaded at start; a downloaded
    # model that requests name loads on first use, in its place.
    env = downloaded(tmp_path / "hf", random_model, "test/random-qwen2")
    server = ServerProcess(tmp_path, ["--model", str(greeting_model.path)], env=env).start()
    try:
        deadline = time.monotonic() + 60
        while loaded(server) != {"greeter"} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert loaded(server) == {"greeter"}

        # Two requests at once for a model that is not loaded yet: it loads once.
        results = []
        threads = [
            threading.Thread(target=lambda: results.append(
                server.client().chat.completions.create(model="test/random-qwen2", messages=HELLO, max_tokens=3)))
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.usage.completion_tokens for r in results] == [3, 3]
        assert server.log().count("loading model test/random-qwen2") == 1
        # The old model goes once the new one has loaded.
        log = server.log()
        assert log.index("loaded model test/random-qwen2") < log.index("unloaded model greeter (to make room")
        assert loaded(server) == {"test/random-qwen2"}

        answer = server.client().chat.completions.create(model="greeter", messages=HELLO, temperature=0)
        assert answer.choices[0].message.content == GREETING
        assert loaded(server) == {"greeter"}
    finally:
        server.stop()


def test_idle_models_unload_after_keep_alive(tmp_path, greeting_model):
    server = ServerProcess(tmp_path, ["--model", str(greeting_model.path), "--keep-alive", "1"]).start()
    try:
        server.client().chat.completions.create(model="greeter", messages=HELLO, max_tokens=2)
        deadline = time.monotonic() + 30
        while loaded(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert loaded(server) == set()
        assert "unloaded model greeter (idle for 1 s)" in server.log()
        # And it comes back on the next request.
        answer = server.client().chat.completions.create(model="greeter", messages=HELLO, temperature=0)
        assert answer.choices[0].message.content == GREETING
    finally:
        server.stop()
