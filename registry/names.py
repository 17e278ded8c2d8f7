"""The model-name grammar: `family[:size][-quant]`, hub repo ids, and local directories.

Repo ids are validated before they become cache paths, so no name can point outside
the model store (`../x`, `a/../../b`, `org/..` are all rejected).
"""

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id

from .catalog import CATALOG, Family, Variant, find_repo
from .errors import NOT_FOUND, RegistryError

_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+", re.ASCII)


@dataclass(frozen=True)
class ModelRef:
    """What a name refers to: a hub repo (maybe a catalog variant) or a local directory."""

    name: str
    repo: str | None
    local_path: Path | None
    family: Family | None


def parse(text: str, local: bool = True) -> ModelRef:
    """Resolve the syntax of a model name; nothing here touches the network.

    `local=False` (the server, for names a request sends) never reads the name as a
    directory, so no name can probe the filesystem or resolve against the working
    directory."""
    text = text.strip()
    if not text:
        raise RegistryError(NOT_FOUND, "empty model name")
    if local and text.startswith(("/", "./", "~")):
        return _local(text)
    catalog_ref = _parse_catalog_name(text.lower())
    if catalog_ref is not None:
        return catalog_ref
    if local and Path(text).is_dir():
        return _local(text)
    if "/" in text:
        return repo_ref(validate_repo(text))
    raise RegistryError(
        NOT_FOUND, f"unknown model '{text}'{_suggestions(text.lower())}"
    )


def validate_repo(text: str) -> str:
    """Return `text` if it is a well-formed `org/name` hub repo id, else raise NOT_FOUND."""
    try:
        validate_repo_id(text)
        valid = _REPO_ID.fullmatch(text) is not None
    except HFValidationError:
        valid = False
    if not valid:
        raise RegistryError(
            NOT_FOUND,
            f"invalid model name '{text}': a repo id is 'org/name' "
            "of letters, digits, '.', '_', '-'",
        )
    return text


def _local(text: str) -> ModelRef:
    path = Path(text).expanduser().resolve()
    return ModelRef(name=str(path), repo=None, local_path=path, family=None)


def repo_ref(repo: str) -> ModelRef:
    """A repo id by its registry name when the catalog serves it, else by the id itself."""
    found = find_repo(repo)
    if found is None:
        return ModelRef(name=repo, repo=repo, local_path=None, family=None)
    family, variant = found
    return _variant_ref(family, variant)


def _variant_ref(family: Family, variant: Variant) -> ModelRef:
    return ModelRef(
        name=family.tag(variant), repo=variant.repo, local_path=None, family=family
    )


def _parse_catalog_name(text: str) -> ModelRef | None:
    """`family[-quant]` or `family:[size][-quant]`; None when no family matches."""
    if ":" in text:
        family_name, tag = text.split(":", 1)
        family = CATALOG.get(family_name)
        if family is None:
            raise RegistryError(
                NOT_FOUND,
                f"unknown model family '{family_name}'{_suggestions(family_name)}",
            )
        size, quant = _split_tag(family, tag)
        return _variant_ref(family, _pick_variant(family, size, quant, text))
    if text in CATALOG:
        family = CATALOG[text]
        return _variant_ref(family, family.default)
    for family in CATALOG.values():
        for quant in family.quants:
            if text == f"{family.name}-{quant}":
                return _variant_ref(family, _pick_variant(family, None, quant, text))
    return None


def _split_tag(family: Family, tag: str) -> tuple[str | None, str | None]:
    for quant in family.quants:
        if tag == quant:
            return None, quant
        if tag.endswith(f"-{quant}"):
            return tag[: -len(quant) - 1], quant
    return tag, None


def _pick_variant(
    family: Family, size: str | None, quant: str | None, text: str
) -> Variant:
    """Fill in the family's default size, and its default quant where that size has it."""
    size = size or family.default_size
    candidates = [
        v for v in family.variants if v.size == size and quant in (None, v.quant)
    ]
    preferred = [v for v in candidates if v.quant == (quant or family.default_quant)]
    if preferred or candidates:
        return (preferred or candidates)[0]
    sizes = dict.fromkeys(v.size for v in family.variants)
    available = ", ".join(
        f"{s} ({'/'.join(v.quant for v in family.variants if v.size == s)})"
        for s in sizes
    )
    raise RegistryError(
        NOT_FOUND, f"'{text}' is not in the catalog; {family.name} comes in {available}"
    )


def _suggestions(text: str) -> str:
    names = [f.name for f in CATALOG.values()]
    names += [f.tag(v) for f in CATALOG.values() for v in f.variants]
    close = difflib.get_close_matches(text, names, n=5, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    return f"{hint} (`mlxd catalog` lists the models that can be pulled)"
