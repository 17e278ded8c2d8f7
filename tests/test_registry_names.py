"""The name grammar: family[:size][-quant], repo ids, local paths, and the errors in between."""

import pytest

from mlxd.registry import CATALOG, NOT_FOUND, RegistryError
from mlxd.registry.names import parse


@pytest.mark.parametrize(
    "text,name,repo",
    [
        (
            "qwen2.5-coder",
            "qwen2.5-coder:7b-4bit",
            "mlx-community/Qwen2.5-Coder-7B-Instruct-4bit",
        ),
        (
            "Qwen2.5-Coder",
            "qwen2.5-coder:7b-4bit",
            "mlx-community/Qwen2.5-Coder-7B-Instruct-4bit",
        ),
        (
            "qwen2.5-coder:14b",
            "qwen2.5-coder:14b-4bit",
            "mlx-community/Qwen2.5-Coder-14B-Instruct-4bit",
        ),
        (
            "qwen2.5-coder:7b-8bit",
            "qwen2.5-coder:7b-8bit",
            "mlx-community/Qwen2.5-Coder-7B-Instruct-8bit",
        ),
        (
            "qwen2.5-coder-8bit",
            "qwen2.5-coder:7b-8bit",
            "mlx-community/Qwen2.5-Coder-7B-Instruct-8bit",
        ),
        (
            "qwen2.5-coder:bf16",
            "qwen2.5-coder:7b-bf16",
            "mlx-community/Qwen2.5-Coder-7B-Instruct-bf16",
        ),
        ("qwen3:30b-a3b", "qwen3:30b-a3b-4bit", "mlx-community/Qwen3-30B-A3B-4bit"),
        (
            "qwen3:30b-a3b-8bit",
            "qwen3:30b-a3b-8bit",
            "mlx-community/Qwen3-30B-A3B-8bit",
        ),
        (
            "codellama:34b-6bit",
            "codellama:34b-6bit",
            "mlx-community/CodeLlama-34b-Instruct-hf-6bit-mlx",
        ),
        ("gpt-oss:120b", "gpt-oss:120b-mxfp4", "mlx-community/gpt-oss-120b-MXFP4-Q8"),
        # A size without the family's default quant falls back to what that size has.
        (
            "codellama:34b",
            "codellama:34b-4bit",
            "mlx-community/CodeLlama-34b-Instruct-hf-4bit",
        ),
        (
            "codellama:70b",
            "codellama:70b-4bit",
            "mlx-community/CodeLlama-70b-Instruct-hf-4bit-MLX",
        ),
        # Repo ids in the catalog get their registry name; others keep the id.
        ("mlx-community/qwen3-8b-4bit", "qwen3:8b-4bit", "mlx-community/Qwen3-8B-4bit"),
        ("someone/My_Model-v1.5", "someone/My_Model-v1.5", "someone/My_Model-v1.5"),
    ],
)
def test_names_resolve_to_repos(text, name, repo):
    ref = parse(text)
    assert (ref.name, ref.repo, ref.local_path) == (name, repo, None)


def test_catalog_names_carry_their_family():
    assert parse("gemma-3:27b").family is CATALOG["gemma-3"]
    assert parse("someone/model").family is None


@pytest.mark.parametrize(
    "text",
    [
        "../x",
        "a/../../b",
        "org/..",
        "../../etc/passwd",
        "org/a--b",
        "a/b/c",
        "org/na me",
    ],
)
def test_names_cannot_escape_the_store(text):
    with pytest.raises(RegistryError) as err:
        parse(text)
    assert err.value.kind == NOT_FOUND
    assert "invalid model name" in str(err.value)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("qwen2.5-cder", "did you mean: qwen2.5-coder"),
        ("qwen:7b", "unknown model family 'qwen'; did you mean: qwen3"),
        ("llama3.2", "did you mean: llama-3.2"),
        ("qwen2.5-coder:9b", "qwen2.5-coder comes in 0.5b (4bit/8bit/bf16), 1.5b"),
        ("qwen3:14b-8bit", "14b (4bit)"),
    ],
)
def test_unknown_names_list_close_matches(text, expected):
    with pytest.raises(RegistryError) as err:
        parse(text)
    assert err.value.kind == NOT_FOUND
    assert expected in str(err.value)


def test_local_paths(tmp_path, monkeypatch):
    model_dir = tmp_path.resolve() / "my-model"
    model_dir.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for text in (str(model_dir), "./my-model", "~/my-model", "my-model"):
        ref = parse(text)
        assert (ref.local_path, ref.repo, ref.name) == (model_dir, None, str(model_dir))


def test_catalog_name_wins_over_a_directory_of_the_same_name(tmp_path, monkeypatch):
    (tmp_path / "qwen3").mkdir()
    monkeypatch.chdir(tmp_path)
    assert parse("qwen3").repo == "mlx-community/Qwen3-8B-4bit"
    assert parse("./qwen3").local_path == tmp_path.resolve() / "qwen3"


def test_empty_name():
    with pytest.raises(RegistryError, match="empty model name"):
        parse("  ")
