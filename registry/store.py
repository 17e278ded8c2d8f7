"""What is on disk: complete model snapshots in the Hugging Face cache, and local directories.

Models live in the standard HF hub cache (`HF_HUB_CACHE`, default `$HF_HOME/hub`), so
they are shared with mlx-lm and every other huggingface_hub user. A snapshot counts as
a model only when it is complete (see `missing_files`): an interrupted or partial
download never shows up in `list_models` and never resolves to a path.
"""

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants

from .catalog import Family
from .errors import NOT_FOUND, RegistryError
from .names import parse, repo_ref

_INDEX = "model.safetensors.index.json"
_SHARD = re.compile(r"model-(\d+)-of-(\d+)\.safetensors")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model")


@dataclass(frozen=True)
class ResolvedModel:
    """A model name and where its files are; `path` is None until fully downloaded."""

    name: str
    repo: str | None
    path: Path | None
    context_length: int | None
    family: Family | None

    @property
    def served_name(self) -> str:
        """What mlxd serves it as: its registry name, or a local directory's folder name."""
        return self.name if self.repo else self.path.name


@dataclass(frozen=True)
class LocalModel:
    """A complete download in the cache."""

    name: str
    repo: str
    path: Path
    size_bytes: int
    context_length: int | None


def resolve(name: str, local: bool = True) -> ResolvedModel:
    """Resolve a registry name, repo id or (with `local`) local path without touching the network."""
    ref = parse(name, local)
    if ref.local_path is not None:
        path = ref.local_path
        if not path.is_dir():
            raise RegistryError(NOT_FOUND, f"no such model directory: {path}")
        missing = missing_files(path)
        if missing:
            raise RegistryError(
                NOT_FOUND,
                f"{path} is not a complete model directory: missing {', '.join(missing)}",
            )
        return ResolvedModel(ref.name, None, path, config_context_length(path), None)
    if ref.family is None:  # the hub ignores the case of repo ids; so does the cache lookup
        ref = repo_ref(_cached_spelling(ref.repo))
    path = complete_snapshot(ref.repo)
    family_context = ref.family.context_length if ref.family else None
    context = (config_context_length(path) if path else None) or family_context
    return ResolvedModel(ref.name, ref.repo, path, context, ref.family)


def list_models() -> list[LocalModel]:
    """Every repo in the cache with a complete snapshot, by registry name."""
    models = []
    for repo in cached_repos():
        path = complete_snapshot(repo)
        if path is not None:
            ref = repo_ref(repo)
            context = config_context_length(path) or (
                ref.family.context_length if ref.family else None
            )
            models.append(LocalModel(ref.name, repo, path, directory_size(path), context))
    return sorted(models, key=lambda m: m.name)


def remove(name: str) -> int:
    """Delete a downloaded repo (complete or not) from the cache; returns the bytes freed."""
    ref = parse(name)
    if ref.repo is None:
        raise RegistryError(
            NOT_FOUND,
            f"{ref.name} is a local directory, not a download; delete it yourself",
        )
    folder = repo_folder(ref.repo)
    if not folder.is_dir():
        raise RegistryError(NOT_FOUND, f"{ref.name} is not downloaded")
    freed = sum(
        f.stat().st_size
        for f in folder.rglob("*")
        if f.is_file() and not f.is_symlink()
    )
    shutil.rmtree(folder)
    return freed


def cached_repos() -> list[str]:
    """Repo ids with a cache folder (`models--org--name`), complete or not."""
    cache = Path(constants.HF_HUB_CACHE)
    if not cache.is_dir():
        return []
    return sorted(
        folder.name.removeprefix("models--").replace("--", "/")
        for folder in cache.glob("models--*--*")
        if folder.is_dir()
    )


def _cached_spelling(repo: str) -> str:
    """`repo` as the cache spells it (`Org/Name` finds `org/name`), else as given."""
    return next((r for r in cached_repos() if r.lower() == repo.lower()), repo)


def repo_folder(repo: str) -> Path:
    """huggingface_hub's cache folder for a model repo; `repo` must be a validated repo id."""
    return Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"


def complete_snapshot(repo: str) -> Path | None:
    """The snapshot to load: `refs/main`'s if complete, else the newest complete one."""
    snapshots = repo_folder(repo) / "snapshots"
    if not snapshots.is_dir():
        return None
    main = repo_folder(repo) / "refs" / "main"
    main_commit = main.read_text().strip() if main.is_file() else None
    ranked = sorted(
        snapshots.iterdir(),
        key=lambda p: (p.name == main_commit, p.stat().st_mtime),
        reverse=True,
    )
    return next((s for s in ranked if s.is_dir() and not missing_files(s)), None)


def missing_files(path: Path) -> list[str]:
    """What a directory lacks to be loadable by mlx-lm; empty means complete.

    Complete means: config.json; every shard the safetensors index lists (or, without an
    index, a `model*.safetensors` file or a whole numbered set of them: the only weight
    files mlx-lm loads); and a tokenizer. Files in a snapshot are links to finished blobs, so a half-written file
    is simply absent, and a dangling link (blob deleted) counts as missing.
    """
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    index = path / _INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError, TypeError):
            shards = [f"{_INDEX} (unreadable)"]
        missing += [s for s in shards if not (path / s).is_file()]
    else:
        missing += _missing_weights_without_index(path)
    has_tokenizer = any((path / f).is_file() for f in _TOKENIZER_FILES) or any(
        path.glob("*.tiktoken")
    )
    if not has_tokenizer:
        missing.append("tokenizer (tokenizer.json, tokenizer.model or *.tiktoken)")
    return missing


def _missing_weights_without_index(path: Path) -> list[str]:
    """Without an index: at least one `model*.safetensors`, and numbered shards
    (`model-00001-of-00004.safetensors`) only as a whole set (the index may be
    the file a broken download lacks)."""
    names = {p.name for p in path.glob("model*.safetensors") if p.is_file()}
    if not names:
        return ["model*.safetensors"]
    expected = set()
    for match in filter(None, map(_SHARD.fullmatch, names)):
        total = match.group(2)
        expected |= {f"model-{i:0{len(total)}d}-of-{total}.safetensors" for i in range(1, int(total) + 1)}
    return sorted(expected - names)


def config_context_length(path: Path) -> int | None:
    """The longest sequence the model was trained for, from its config.json (or
    the `text_config` of a multimodal one); None when the config does not say."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    text_config = config.get("text_config")
    sections = (config, text_config if isinstance(text_config, dict) else {})
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        for section in sections:
            value = section.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
