"""What the API layer talks to: resolve a model name, list models, submit generations."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from .engine import Engine, ModelRef
from .errors import ModelNotFound
from .models import context_length_of, read_json


@dataclass
class ModelInfo:
    id: str
    path: str
    context_length: int
    size_bytes: int
    repo: Optional[str] = None
    loaded: bool = False
    memory_bytes: Optional[int] = None
    idle_seconds: Optional[float] = None


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Runtime:
    """Composes the engine with the models it may serve (local directories, for now)."""

    def __init__(self, engine: Engine, local_models: dict[str, Path]):
        self.engine = engine
        self.local_models = {name: Path(p).resolve() for name, p in local_models.items()}

    def resolve(self, name: str) -> ModelRef:
        path = self.local_models.get(name)
        if path is None:
            for known_name, known_path in self.local_models.items():
                if Path(name).expanduser().resolve() == known_path:
                    name, path = known_name, known_path
                    break
        if path is None:
            served = ", ".join(sorted(self.local_models)) or "none"
            raise ModelNotFound(f"The model '{name}' does not exist or is not served here (served: {served}).")
        return ModelRef(name=name, path=path)

    def list_models(self) -> list[dict]:
        loaded = {m["name"]: m for m in self.engine.loaded_models()}
        infos = []
        for name, path in sorted(self.local_models.items()):
            info = ModelInfo(
                id=name,
                path=str(path),
                context_length=context_length_of(read_json(path / "config.json")),
                size_bytes=directory_size(path),
            )
            if name in loaded:
                info.loaded = True
                info.memory_bytes = loaded[name]["memory_bytes"]
                info.idle_seconds = loaded[name]["idle_seconds"]
            infos.append(asdict(info))
        return infos
