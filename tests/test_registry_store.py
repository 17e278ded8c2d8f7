"""The store: completeness, listing, resolving and removing models in a real HF cache.

The cache is filled by huggingface_hub's own snapshot_download from the fake hub, so the
on-disk layout (blobs, snapshot links, refs) is the real one.
"""

import json
import shutil

import httpx2
import pytest
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HfHubHTTPError

from mlxd.registry import NOT_FOUND, RegistryError, list_models, pull, remove, resolve
from mlxd.registry.hub import ALLOW_PATTERNS
from mlxd.registry.store import config_context_length, missing_files
from tests.fakehub import FakeHub, write_model

CODER = "mlx-community/Qwen2.5-Coder-0.5B-Instruct-4bit"
OTHER = "someone/tiny-model"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def hub(tmp_path):
    repos = {
        CODER: write_model(tmp_path / "coder", max_position_embeddings=32768),
        OTHER: write_model(tmp_path / "other", shards=3, max_position_embeddings=2048),
    }
    with FakeHub(repos) as hub:
        yield hub


def download(hub, repo, cache):
    return snapshot_download(
        repo, endpoint=hub.url, cache_dir=cache, allow_patterns=ALLOW_PATTERNS
    )


def test_missing_files_names_what_a_directory_lacks(tmp_path):
    model = write_model(tmp_path / "m", shards=2)
    assert missing_files(model) == []
    (model / "model-00002-of-00002.safetensors").unlink()
    (model / "tokenizer.json").unlink()
    assert missing_files(model) == [
        "model-00002-of-00002.safetensors",
        "tokenizer (tokenizer.json, tokenizer.model or *.tiktoken)",
    ]
    (model / "model.safetensors.index.json").write_text("not json")
    (model / "o200k_base.tiktoken").write_text("")
    assert missing_files(model) == ["model.safetensors.index.json (unreadable)"]


def test_numbered_shards_without_their_index_count_only_as_a_whole_set(tmp_path):
    model = write_model(tmp_path / "m", shards=3)
    (model / "model.safetensors.index.json").unlink()
    assert missing_files(model) == []
    (model / "model-00003-of-00003.safetensors").unlink()
    assert missing_files(model) == ["model-00003-of-00003.safetensors"]


def test_old_weights_layout_is_not_a_model(tmp_path):
    model = write_model(tmp_path / "m")
    (model / "model.safetensors").rename(model / "weights.00.safetensors")
    assert missing_files(model) == ["model*.safetensors"]


def test_context_length_comes_from_config_or_its_text_config(tmp_path):
    model = write_model(tmp_path / "m", max_position_embeddings=8192)
    assert config_context_length(model) == 8192
    (model / "config.json").write_text(
        json.dumps({"text_config": {"max_position_embeddings": 131072}})
    )
    assert config_context_length(model) == 131072


def test_downloads_are_listed_by_registry_name(hub, cache):
    download(hub, CODER, cache)
    download(hub, OTHER, cache)
    models = list_models()
    assert [(m.name, m.repo, m.context_length) for m in models] == [
        ("qwen2.5-coder:0.5b-4bit", CODER, 32768),
        (OTHER, OTHER, 2048),
    ]
    assert {p.name for p in models[0].path.iterdir()} == {
        "config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors",
    }  # fmt: skip
    assert models[0].size_bytes == sum(
        p.stat().st_size for p in models[0].path.iterdir()
    )
    assert models[1].size_bytes > 3 * 64_000


def test_resolve_points_at_the_complete_snapshot(hub, cache):
    before = resolve("qwen2.5-coder:0.5b")
    assert (before.path, before.context_length) == (
        None,
        32768,
    )  # catalog value until downloaded
    snapshot = download(hub, CODER, cache)
    after = resolve("qwen2.5-coder:0.5b")
    assert (str(after.path), after.repo, after.family.name) == (
        snapshot,
        CODER,
        "qwen2.5-coder",
    )
    assert resolve(CODER).path == after.path


def test_a_broken_download_is_never_listed_or_resolved(hub, cache):
    hub.cut_next_get("model-00002-of-00003.safetensors")
    hub.fail_gets("model-00002-of-00003.safetensors")
    with pytest.raises((HfHubHTTPError, httpx2.HTTPError)):
        download(hub, OTHER, cache)
    snapshot = next((cache / "models--someone--tiny-model" / "snapshots").iterdir())
    assert (snapshot / "config.json").is_file()  # the rest of the repo did arrive
    assert missing_files(snapshot) == ["model-00002-of-00003.safetensors"]
    assert list_models() == []
    assert resolve(OTHER).path is None

    hub.heal()
    download(hub, OTHER, cache)
    assert [m.repo for m in list_models()] == [OTHER]


def test_remove_deletes_complete_and_broken_downloads(hub, cache):
    download(hub, CODER, cache)
    freed = remove("qwen2.5-coder:0.5b-4bit")
    assert freed >= 64_000
    assert list_models() == []
    assert not (
        cache / "models--mlx-community--Qwen2.5-Coder-0.5B-Instruct-4bit"
    ).exists()
    with pytest.raises(RegistryError, match="is not downloaded") as err:
        remove(CODER)
    assert err.value.kind == NOT_FOUND


def test_local_directories_resolve_only_when_complete(tmp_path, cache):
    model = write_model(tmp_path / "local", max_position_embeddings=1024)
    resolved = resolve(str(model))
    assert (resolved.path, resolved.repo, resolved.context_length) == (
        model.resolve(),
        None,
        1024,
    )
    assert pull(str(model)) == resolved  # nothing to download
    shutil.rmtree(model)
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(
        RegistryError, match="not a complete model directory: missing model"
    ):
        resolve(str(model))
    with pytest.raises(RegistryError, match="local directory, not a download"):
        remove(str(model))
