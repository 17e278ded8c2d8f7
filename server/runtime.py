"""What the API layer talks to: resolve a model name, list models, submit generations."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from mlxd import registry

from .engine import Engine
from .errors import ModelNotFound, ModelUnavailable
from .models import DEFAULT_CONTEXT_LENGTH
from .output import output_format_for
from .prompt import request_prompt
from .requests import GenerationRequest, ModelRef

log = logging.getLogger("mlxd.runtime")


# Every name that does not resolve gets this answer, whatever exists on disk: the
# server never tells a client whether a path on this machine exists.
NOT_SERVED = "The model does not exist or is not served here: GET /v1/models lists the models this server serves."


@dataclass
class ModelInfo:
    id: str
    context_length: Optional[int]
    size_bytes: int
    repo: Optional[str] = None
    loaded: bool = False
    starter: Optional[bool] = None
    memory_bytes: Optional[int] = None
    idle_seconds: Optional[float] = None


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or "\\" in name or ".." in name.split("/")


class Runtime:
    """Composes the engine with the models it may serve: local directories given at
    start, and complete downloads in the registry's store. The starter model, when
    given, is served by its name; `starter_listed` also lists it and makes it the default.

    `trusted` names the served models whose own code may run (`--trust-remote-code-for`);
    `pull_any` lets requests download any hub repo, not only the catalog's."""

    def __init__(
        self,
        engine: Engine,
        local_models: dict[str, Path],
        *,
        pull_on_demand: bool = False,
        pull_any: bool = False,
        trusted: frozenset[str] = frozenset(),
        starter: Optional[Path] = None,
        starter_listed: bool = False,
        aliases: Optional[dict[str, str]] = None,
    ):
        self.engine = engine
        self.local_models = {name: Path(p).resolve() for name, p in local_models.items()}
        self.pull_on_demand = pull_on_demand or pull_any
        self.pull_any = pull_any
        self.trusted = trusted
        self.starter = Path(starter).resolve() if starter else None
        self.starter_listed = starter_listed and starter is not None
        # Names clients insist on (Claude Code's claude-sonnet-4-5) -> a served model's name.
        self.aliases = dict(aliases or {})
        for name, target in self.aliases.items():
            log.info("requests for %s are answered by %s", name, target)
        self._tokenizers: dict[Path, tuple] = {}

    def resolve(self, name: str) -> ModelRef:
        """A request's model name -> what to load. Requests may name served local
        directories, registry names, repo ids and aliases, never other paths on this machine."""
        name = name.strip()
        name = self.aliases.get(name, name)
        for known_name, known_path in self.local_models.items():
            if name == known_name or name == str(known_path):
                return self._ref(known_name, known_path)
        if self.starter and name == registry.STARTER:
            return self._ref(registry.STARTER, self.starter)
        if _looks_like_path(name):
            raise ModelNotFound(NOT_SERVED)
        try:
            resolved = registry.resolve(name, local=False)
            if resolved.path is None:
                resolved = self._pull(name, resolved)
        except registry.RegistryError as e:
            if e.kind == registry.UNAVAILABLE:
                raise ModelUnavailable(str(e)) from e
            raise ModelNotFound(f"{e}. {self._served_hint(name)}") from e
        return self._ref(resolved.name, resolved.path, resolved.family.tool_format if resolved.family else None)

    def _ref(self, name: str, path: Path, tool_format: Optional[str] = None) -> ModelRef:
        return ModelRef(name=name, path=path, tool_format=tool_format, trust_remote_code=name in self.trusted)

    def _pull(self, name: str, resolved: registry.ResolvedModel) -> registry.ResolvedModel:
        """Download a model a request named, when this server may."""
        if not self.pull_on_demand:
            raise ModelNotFound(f"The model '{name}' is not downloaded. Run: mlxd pull {name}")
        if resolved.family is None and not self.pull_any:
            raise ModelNotFound(
                f"The model '{name}' is not downloaded, and this server downloads only catalog models "
                f"(`mlxd catalog`; --pull-any allows any repo). Run: mlxd pull {name}"
            )
        log.info("pulling %s on demand", resolved.name)
        return registry.pull(name, progress=False, local=False)

    def _served_hint(self, name: str) -> str:
        """What is served, for a 404: clients with fixed model names need an alias."""
        served = sorted(self.local_models) + [m.name for m in registry.list_models()]
        listed = ", ".join(dict.fromkeys(served)) or "nothing yet"
        return f"Served here: {listed}. To serve '{name}' as one of them, start mlxd with --alias {name}=MODEL."

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """The token count of the prompt `request` would feed its model, templated exactly as
        the engine does; a model that is not loaded lends just its tokenizer."""
        tokenizer, fmt = self.engine.prompt_format(request.model.name) or self._tokenizer_of(request.model)
        return len(request_prompt(tokenizer, fmt, request, recent_checkpoints=False).tokens)

    def _tokenizer_of(self, ref: ModelRef) -> tuple:
        if ref.path not in self._tokenizers:
            from mlx_lm.utils import load_tokenizer

            tokenizer = load_tokenizer(ref.path, {"trust_remote_code": ref.trust_remote_code})
            self._tokenizers[ref.path] = (tokenizer, output_format_for(tokenizer, tool_format=ref.tool_format))
        return self._tokenizers[ref.path]

    def list_models(self) -> list[dict]:
        """Served local directories and complete downloads, with what is loaded (no paths:
        clients need not know where the files are)."""
        infos = [
            ModelInfo(
                id=name,
                context_length=registry.config_context_length(path) or DEFAULT_CONTEXT_LENGTH,
                size_bytes=registry.directory_size(path),
            )
            for name, path in sorted(self.local_models.items())
        ]
        local_paths = set(self.local_models.values())
        downloads = registry.list_models()
        # The starter steps aside as soon as another model is downloaded, even while serving.
        if self.starter_listed and all(Path(m.path).resolve() == self.starter for m in downloads):
            context = registry.config_context_length(self.starter) or DEFAULT_CONTEXT_LENGTH
            size = registry.directory_size(self.starter)
            infos.insert(0, ModelInfo(registry.STARTER, context, size, starter=True))
            local_paths.add(self.starter)
        for m in downloads:
            if Path(m.path).resolve() not in local_paths:
                infos.append(ModelInfo(m.name, m.context_length, m.size_bytes, repo=m.repo))
        loaded = {m["name"]: m for m in self.engine.loaded_models()}
        for info in infos:
            if info.id in loaded:
                info.loaded = True
                info.memory_bytes = loaded[info.id]["memory_bytes"]
                info.idle_seconds = loaded[info.id]["idle_seconds"]
        return [asdict(i) for i in infos]
