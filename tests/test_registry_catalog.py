"""The catalog's data: well-formed, chat-tuned repos only, consistent defaults and formats."""

import importlib.util
import re
from pathlib import Path

import pytest

from mlxd.registry import catalog
from mlxd.registry.names import parse

FAMILIES = catalog.families()
VARIANTS = [(f, v) for f in FAMILIES for v in f.variants]

# A chat-tuned repo says so in its name, except these releases, whose published
# (and only non-"Base") checkpoints are the chat models themselves.
CHAT_MARKER = re.compile(r"Instruct|instruct|-it-|Chat")
CHAT_WITHOUT_MARKER = {
    "phi-4": "Microsoft released phi-4 only post-trained",
    "qwen3": "Qwen3 hybrid-thinking releases; base checkpoints are named -Base",
    "qwen3-coder-next": "released only as the instruct model",
    "gpt-oss": "released only as reasoning/chat models",
    "glm-4.5-air": "chat model; the base is GLM-4.5-Air-Base",
    "glm-4.7-flash": "released only as the chat model",
}
# Format names mlxd adds: two formats mlx-lm has no parser for, and the mistral
# parser under the name of the v0.3/NeMo syntax (its calls are forced differently).
OUR_FORMAT_NAMES = {"llama3_json", "harmony", "mistral_json"}
_PARSER_DIR = (
    Path(importlib.util.find_spec("mlx_lm").submodule_search_locations[0])
    / "tool_parsers"
)
MLX_LM_PARSERS = {p.stem for p in _PARSER_DIR.glob("*.py")} - {"__init__"}


def test_covers_the_planned_families():
    planned = {
        "qwen2.5-coder", "deepseek-coder", "codellama", "llama-3.2", "phi-4",
        "gemma-2", "starcoder2", "qwen3", "qwen3-coder", "llama-3.1", "llama-3.3",
        "gemma-3", "mistral", "devstral", "gpt-oss", "glm-4.5-air", "glm-4.7-flash", "smollm2",
    }  # fmt: skip
    assert planned <= set(catalog.CATALOG)


@pytest.mark.parametrize(
    "family,variant", VARIANTS, ids=lambda x: getattr(x, "repo", "")
)
def test_repo_ids_are_well_formed_mlx_community_chat_models(family, variant):
    assert re.fullmatch(r"mlx-community/[A-Za-z0-9][\w.-]*", variant.repo, re.ASCII)
    assert ".." not in variant.repo and "--" not in variant.repo
    assert "base" not in variant.repo.lower()
    assert CHAT_MARKER.search(variant.repo) or family.name in CHAT_WITHOUT_MARKER


def test_repo_ids_and_tags_are_unique():
    repos = [v.repo.lower() for _, v in VARIANTS]
    tags = [f.tag(v) for f, v in VARIANTS]
    assert len(set(repos)) == len(repos)
    assert len(set(tags)) == len(tags)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_family_metadata_is_consistent(family):
    assert family.default is not None, "default size/quant must be a listed variant"
    assert family.description and family.source
    assert family.context_length >= 4096
    assert (
        family.tool_format is None
        or family.tool_format in MLX_LM_PARSERS | OUR_FORMAT_NAMES
    )
    assert family.reasoning in (None, "think_tags", "harmony")
    assert family.calls_tools == (family.tool_format is not None)
    for variant in family.variants:
        assert re.fullmatch(r"\d+(\.\d+)?[mb](-a\d+b)?", variant.size)
        assert re.fullmatch(r"\d+bit|bf16|mxfp4", variant.quant)


@pytest.mark.parametrize(
    "family,variant", VARIANTS, ids=lambda x: getattr(x, "repo", "")
)
def test_every_tag_and_repo_resolves_back_to_its_variant(family, variant):
    by_tag = parse(family.tag(variant))
    by_repo = parse(variant.repo.upper())
    assert (by_tag.repo, by_tag.family) == (variant.repo, family)
    assert (by_repo.name, by_repo.repo) == (family.tag(variant), variant.repo)


def test_mlx_lm_parser_names_exist_for_the_formats_we_claim():
    assert {"json_tools", "qwen3_coder", "mistral", "glm47"} <= MLX_LM_PARSERS
    assert not OUR_FORMAT_NAMES & MLX_LM_PARSERS
