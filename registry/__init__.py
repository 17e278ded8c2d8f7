"""What models exist and where their files are: catalog, names, downloads, the local store."""

from .catalog import CATALOG, Family, Variant, families
from .errors import NOT_FOUND, UNAVAILABLE, RegistryError
from .hub import pull
from .starter import STARTER
from .store import LocalModel, ResolvedModel, config_context_length, directory_size, list_models, remove, resolve

__all__ = [
    "CATALOG",
    "NOT_FOUND",
    "UNAVAILABLE",
    "Family",
    "LocalModel",
    "RegistryError",
    "ResolvedModel",
    "STARTER",
    "Variant",
    "config_context_length",
    "directory_size",
    "families",
    "list_models",
    "pull",
    "remove",
    "resolve",
]
