"""Model families that can be pulled by name, each mapped to mlx-community chat-tuned repos.

Only instruction/chat-tuned conversions are listed: base models cannot follow a chat
or call tools. Every repo id was checked against public references (noted in each
family's `source`); a size or quantization that could not be confirmed, or whose only
conversion predates mlx-lm's `model*.safetensors` layout (old `weights.00.safetensors`
uploads that mlx-lm cannot load), is left out with a comment saying why.

`tool_format` names the tool-call syntax the model emits, using mlx-lm's parser module
names (mlx_lm/tool_parsers/) where one exists: "json_tools" (Hermes/Qwen `<tool_call>`
JSON), "qwen3_coder" (`<function=...>` XML), "mistral" (`[TOOL_CALLS]NAME[ARGS]`), "glm47"
(`<arg_key>`/`<arg_value>`); "mistral_json" (v0.3/NeMo `[TOOL_CALLS][{...}]`, mlx-lm's
mistral parser); and two without an mlx-lm parser: "llama3_json" (Llama 3.x bare JSON)
and "harmony" (gpt-oss channels). `reasoning` is "think_tags" (`<think>`) or
"harmony" (gpt-oss analysis channel). `context_length` is the family's advertised
window; a downloaded model's own config.json takes precedence.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Variant:
    """One downloadable size x quantization of a family."""

    size: str
    quant: str
    repo: str


@dataclass(frozen=True)
class Family:
    """A model family and what the server needs to know to chat with it."""

    name: str
    description: str
    context_length: int
    tool_format: str | None
    reasoning: str | None
    default_size: str
    default_quant: str
    variants: tuple[Variant, ...] = field(repr=False)
    source: str = field(repr=False)

    @property
    def calls_tools(self) -> bool:
        return self.tool_format is not None

    @property
    def default(self) -> Variant:
        return self.variant(self.default_size, self.default_quant)

    @property
    def quants(self) -> list[str]:
        return sorted({v.quant for v in self.variants})

    def variant(self, size: str, quant: str) -> Variant | None:
        return next(
            (v for v in self.variants if v.size == size and v.quant == quant), None
        )

    def tag(self, variant: Variant) -> str:
        """The canonical registry name of a variant, e.g. `qwen2.5-coder:7b-4bit`."""
        return f"{self.name}:{variant.size}-{variant.quant}"


def _grid(
    template: str, sizes: dict[str, str], quants: tuple[str, ...]
) -> tuple[Variant, ...]:
    """Variants for families whose repos are named uniformly, keyed by our lower-case size."""
    return tuple(
        Variant(size, quant, template.format(size=repo_size, quant=quant))
        for size, repo_size in sizes.items()
        for quant in quants
    )


_FAMILIES = (
    Family(
        name="qwen2.5-coder",
        description="Alibaba's Qwen2.5 code model, strong at completion and edits for its size",
        context_length=32768,
        tool_format="json_tools",
        reasoning=None,
        default_size="7b",
        default_quant="4bit",
        variants=_grid(
            "mlx-community/Qwen2.5-Coder-{size}-Instruct-{quant}",
            {
                "0.5b": "0.5B",
                "1.5b": "1.5B",
                "3b": "3B",
                "7b": "7B",
                "14b": "14B",
                "32b": "32B",
            },
            ("4bit", "8bit", "bf16"),
        ),
        source="exo model list (exo-explore/exo exo/models.py, all 18 repos); HF model cards "
        "for 1.5B-4bit, 7B-4bit, 32B-8bit",
    ),
    Family(
        name="qwen3",
        description="Qwen3 hybrid thinking models with tool use; 30b-a3b is a fast MoE",
        context_length=32768,
        tool_format="json_tools",
        reasoning="think_tags",
        default_size="8b",
        default_quant="4bit",
        variants=(
            Variant("0.6b", "4bit", "mlx-community/Qwen3-0.6B-4bit"),
            Variant("0.6b", "8bit", "mlx-community/Qwen3-0.6B-8bit"),
            Variant("1.7b", "4bit", "mlx-community/Qwen3-1.7B-4bit"),
            Variant("4b", "4bit", "mlx-community/Qwen3-4B-4bit"),
            Variant("8b", "4bit", "mlx-community/Qwen3-8B-4bit"),
            Variant("8b", "8bit", "mlx-community/Qwen3-8B-8bit"),
            Variant("14b", "4bit", "mlx-community/Qwen3-14B-4bit"),
            Variant("32b", "4bit", "mlx-community/Qwen3-32B-4bit"),
            Variant("30b-a3b", "4bit", "mlx-community/Qwen3-30B-A3B-4bit"),
            Variant("30b-a3b", "8bit", "mlx-community/Qwen3-30B-A3B-8bit"),
        ),
        source="mlx-swift-examples LLMRegistry (0.6B/1.7B/4B/8B-4bit); exo model "
        "cards (0.6B-8bit, 30B-A3B-4bit/8bit); widely used in public code "
        "(8B-8bit, 14B/32B-4bit)",
    ),
    Family(
        name="qwen3-coder",
        description="Qwen3-Coder agentic coding MoE, native tool calls, 256K context",
        context_length=262144,
        tool_format="qwen3_coder",
        reasoning=None,
        default_size="30b-a3b",
        default_quant="4bit",
        variants=(
            Variant(
                "30b-a3b", "4bit", "mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit"
            ),
            Variant(
                "30b-a3b", "8bit", "mlx-community/Qwen3-Coder-30B-A3B-Instruct-8bit"
            ),
            Variant(
                "480b-a35b", "4bit", "mlx-community/Qwen3-Coder-480B-A35B-Instruct-4bit"
            ),
        ),
        source="exo model card (480B-A35B-4bit); public code and server configs "
        "(30B-A3B 4bit/8bit)",
    ),
    Family(
        name="qwen3-coder-next",
        description="Qwen3-Coder-Next 80B-A3B hybrid-attention MoE for coding agents",
        context_length=262144,
        tool_format="qwen3_coder",
        reasoning=None,
        default_size="80b-a3b",
        default_quant="4bit",
        variants=(
            Variant("80b-a3b", "4bit", "mlx-community/Qwen3-Coder-Next-4bit"),
            Variant("80b-a3b", "8bit", "mlx-community/Qwen3-Coder-Next-8bit"),
        ),
        source="exo model card (4bit, context 262144); public server configs (8bit)",
    ),
    Family(
        name="deepseek-coder",
        description="DeepSeek Coder instruct (2023), a dense code model",
        context_length=16384,
        tool_format=None,
        reasoning=None,
        default_size="33b",
        default_quant="4bit",
        # 1.3b and 6.7b: the only mlx-community instruct conversions
        # (deepseek-coder-{1.3b,6.7b}-instruct*-mlx) ship weights.00.safetensors,
        # a pre-mlx-lm layout that mlx-lm cannot load.
        variants=(Variant("33b", "4bit", "mlx-community/deepseek-coder-33b-instruct"),),
        source="HF model card mlx-community/deepseek-coder-33b-instruct (4-bit, mlx-lm 0.25.2)",
    ),
    Family(
        name="deepseek-coder-v2",
        description="DeepSeek-Coder-V2-Lite instruct, a 16B MoE with 2.4B active",
        context_length=163840,
        tool_format=None,
        reasoning=None,
        default_size="16b",
        default_quant="4bit",
        variants=(
            Variant(
                "16b", "4bit", "mlx-community/DeepSeek-Coder-V2-Lite-Instruct-4bit-mlx"
            ),
            Variant(
                "16b", "8bit", "mlx-community/DeepSeek-Coder-V2-Lite-Instruct-8bit"
            ),
        ),
        source="HF model cards and file listings for both repos; exo model list (4bit)",
    ),
    Family(
        name="codellama",
        description="Meta's Code Llama instruct (Llama 2 based)",
        context_length=16384,
        tool_format=None,
        reasoning=None,
        default_size="13b",
        default_quant="8bit",
        # 7b: the only instruct conversion found (CodeLlama-7b-Instruct-hf-4bit-MLX) uses the
        # weights.00.safetensors layout mlx-lm cannot load. 13b 4bit: not confirmed in
        # mlx-lm's layout, so only the 8bit conversion is listed.
        variants=(
            Variant("13b", "8bit", "mlx-community/CodeLlama-13b-Instruct-hf-8bit-mlx"),
            Variant("34b", "4bit", "mlx-community/CodeLlama-34b-Instruct-hf-4bit"),
            Variant("34b", "6bit", "mlx-community/CodeLlama-34b-Instruct-hf-6bit-mlx"),
            Variant("70b", "4bit", "mlx-community/CodeLlama-70b-Instruct-hf-4bit-MLX"),
        ),
        source="HF model cards / file listings (model-*.safetensors) for all four repos",
    ),
    Family(
        name="llama-3.2",
        description="Meta Llama 3.2 small instruct models with JSON tool calls",
        context_length=131072,
        tool_format="llama3_json",
        reasoning=None,
        default_size="3b",
        default_quant="4bit",
        variants=(
            Variant("1b", "4bit", "mlx-community/Llama-3.2-1B-Instruct-4bit"),
            Variant("1b", "8bit", "mlx-community/Llama-3.2-1B-Instruct-8bit"),
            Variant("3b", "4bit", "mlx-community/Llama-3.2-3B-Instruct-4bit"),
            Variant("3b", "8bit", "mlx-community/Llama-3.2-3B-Instruct-8bit"),
        ),
        source="mlx-swift-examples LLMRegistry (4bit); exo model list and cards (4bit, 8bit)",
    ),
    Family(
        name="llama-3.1",
        description="Meta Llama 3.1 instruct with JSON tool calls",
        context_length=131072,
        tool_format="llama3_json",
        reasoning=None,
        default_size="8b",
        default_quant="4bit",
        variants=(
            Variant("8b", "4bit", "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit"),
            Variant("8b", "8bit", "mlx-community/Meta-Llama-3.1-8B-Instruct-8bit"),
            Variant("8b", "bf16", "mlx-community/Meta-Llama-3.1-8B-Instruct-bf16"),
            Variant("70b", "4bit", "mlx-community/Meta-Llama-3.1-70B-Instruct-4bit"),
        ),
        source="exo model cards (8B 4bit/8bit/bf16, 70B-4bit); mlx-swift-examples (8B-4bit)",
    ),
    Family(
        name="llama-3.3",
        description="Meta Llama 3.3 70B instruct with JSON tool calls",
        context_length=131072,
        tool_format="llama3_json",
        reasoning=None,
        default_size="70b",
        default_quant="4bit",
        variants=(
            Variant("70b", "4bit", "mlx-community/Llama-3.3-70B-Instruct-4bit"),
            Variant("70b", "8bit", "mlx-community/Llama-3.3-70B-Instruct-8bit"),
        ),
        source="exo model cards (4bit, 8bit)",
    ),
    Family(
        name="phi-4",
        description="Microsoft Phi-4 14B (released chat-tuned only; no base model)",
        context_length=16384,
        tool_format=None,
        reasoning=None,
        default_size="14b",
        default_quant="4bit",
        variants=(Variant("14b", "4bit", "mlx-community/phi-4-4bit"),),
        source="public code and benchmarks linking huggingface.co/mlx-community/phi-4-4bit",
    ),
    Family(
        name="phi-4-mini",
        description="Microsoft Phi-4-mini-instruct 3.8B",
        context_length=131072,
        tool_format=None,
        reasoning=None,
        default_size="3.8b",
        default_quant="4bit",
        variants=(Variant("3.8b", "4bit", "mlx-community/Phi-4-mini-instruct-4bit"),),
        source="public app model lists (several independent projects)",
    ),
    Family(
        name="gemma-2",
        description="Google Gemma 2 instruction-tuned (-it) models",
        context_length=8192,
        tool_format=None,
        reasoning=None,
        default_size="9b",
        default_quant="4bit",
        variants=_grid(
            "mlx-community/gemma-2-{size}-it-{quant}",
            {"2b": "2b", "9b": "9b", "27b": "27b"},
            ("4bit", "8bit"),
        ),
        source="exo model list (2b/9b/27b x 4bit/8bit); mlx-swift-examples (2b/9b-4bit)",
    ),
    Family(
        name="smollm2",
        description="Hugging Face SmolLM2 small instruct models; 135m is mlxd's starter model",
        context_length=8192,
        tool_format=None,
        reasoning=None,
        default_size="1.7b",
        default_quant="8bit",  # so that `smollm2:135m`, the starter, is the 8-bit conversion
        variants=(
            Variant("135m", "8bit", "mlx-community/SmolLM2-135M-Instruct-8bit"),
            Variant("135m", "4bit", "mlx-community/SmolLM2-135M-Instruct-4bit"),
            Variant("135m", "bf16", "mlx-community/SmolLM2-135M-Instruct"),
            Variant("360m", "4bit", "mlx-community/SmolLM2-360M-Instruct-4bit"),
            Variant("360m", "6bit", "mlx-community/SmolLM2-360M-Instruct-6bit"),
            Variant("360m", "bf16", "mlx-community/SmolLM2-360M-Instruct"),
            Variant("1.7b", "8bit", "mlx-community/SmolLM2-1.7B-Instruct-8bit"),
            Variant("1.7b", "4bit", "mlx-community/SmolLM2-1.7B-Instruct-4bit"),
            Variant("1.7b", "bf16", "mlx-community/SmolLM2-1.7B-Instruct"),
        ),
        source="public code, model lists and benchmark notes pinning each repo (135M-8bit and "
        "360M-6bit with revisions); the unsuffixed repos are the bf16 conversions",
    ),
    Family(
        name="gemma-3",
        description="Google Gemma 3 instruction-tuned (-it) models, 128K context from 4b up",
        context_length=131072,
        tool_format=None,
        reasoning=None,
        default_size="12b",
        default_quant="4bit",
        variants=(
            Variant("1b", "4bit", "mlx-community/gemma-3-1b-it-4bit"),
            Variant("4b", "4bit", "mlx-community/gemma-3-4b-it-4bit"),
            Variant("12b", "4bit", "mlx-community/gemma-3-12b-it-4bit"),
            Variant("27b", "4bit", "mlx-community/gemma-3-27b-it-4bit"),
        ),
        source="public code and server configs (mlx_lm.server / vllm-mlx) for all four",
    ),
    Family(
        name="starcoder2",
        description="BigCode StarCoder2 15B instruct (self-aligned), a code model",
        context_length=16384,
        tool_format=None,
        reasoning=None,
        default_size="15b",
        default_quant="4bit",
        # 3b and 7b: BigCode released no instruct versions, and mlx-community only has
        # base conversions (starcoder2-3b-4bit, starcoder2-7b-4bit), which cannot chat.
        variants=(
            Variant("15b", "4bit", "mlx-community/starcoder2-15b-instruct-v0.1-4bit"),
        ),
        source="HF model card mlx-community/starcoder2-15b-instruct-v0.1-4bit",
    ),
    Family(
        name="mistral",
        description="Mistral 7B Instruct v0.3 with native function calling",
        context_length=32768,
        tool_format="mistral_json",
        reasoning=None,
        default_size="7b",
        default_quant="4bit",
        variants=(
            Variant("7b", "4bit", "mlx-community/Mistral-7B-Instruct-v0.3-4bit"),
        ),
        source="mlx-swift-examples LLMRegistry",
    ),
    Family(
        name="mistral-nemo",
        description="Mistral NeMo 12B instruct (2407), 128K context",
        context_length=131072,
        tool_format="mistral_json",
        reasoning=None,
        default_size="12b",
        default_quant="4bit",
        variants=(
            Variant("12b", "4bit", "mlx-community/Mistral-Nemo-Instruct-2407-4bit"),
        ),
        source="mlx-swift-examples LLMRegistry; exo model list",
    ),
    Family(
        name="mistral-small",
        description="Mistral Small 3.2 24B instruct (2506)",
        context_length=131072,
        tool_format="mistral",
        reasoning=None,
        default_size="24b",
        default_quant="4bit",
        variants=(
            Variant(
                "24b", "4bit", "mlx-community/Mistral-Small-3.2-24B-Instruct-2506-4bit"
            ),
            Variant(
                "24b", "8bit", "mlx-community/Mistral-Small-3.2-24B-Instruct-2506-8bit"
            ),
        ),
        source="public code and configs pinning both repos",
    ),
    Family(
        name="devstral",
        description="Mistral Devstral Small 2 (2512), a 24B agentic coding model",
        context_length=262144,
        tool_format="mistral",
        reasoning=None,
        default_size="24b",
        default_quant="4bit",
        variants=(
            Variant(
                "24b", "4bit", "mlx-community/Devstral-Small-2-24B-Instruct-2512-4bit"
            ),
            Variant(
                "24b", "5bit", "mlx-community/Devstral-Small-2-24B-Instruct-2512-5bit"
            ),
        ),
        source="public model lists and evaluation reports naming both repos",
    ),
    Family(
        name="gpt-oss",
        description="OpenAI gpt-oss open-weight reasoning models (harmony format)",
        context_length=131072,
        tool_format="harmony",
        reasoning="harmony",
        default_size="20b",
        default_quant="mxfp4",
        variants=(
            Variant("20b", "mxfp4", "mlx-community/gpt-oss-20b-MXFP4-Q8"),
            Variant("120b", "mxfp4", "mlx-community/gpt-oss-120b-MXFP4-Q8"),
        ),
        source="exo model cards (both, context 131072); Swift MLX LLMRegistry copies (20b)",
    ),
    Family(
        name="glm-4.5-air",
        description="Zhipu GLM-4.5-Air 106B-A12B MoE with thinking and tool use",
        context_length=131072,
        tool_format="glm47",
        reasoning="think_tags",
        default_size="106b-a12b",
        default_quant="4bit",
        variants=(
            Variant("106b-a12b", "4bit", "mlx-community/GLM-4.5-Air-4bit"),
            Variant("106b-a12b", "8bit", "mlx-community/GLM-4.5-Air-8bit"),
        ),
        source="exo model card (8bit); public code and configs (4bit)",
    ),
    Family(
        name="glm-4.7-flash",
        description="Zhipu GLM-4.7-Flash 30B-A3B MoE with thinking and tool use",
        context_length=202752,
        tool_format="glm47",
        reasoning="think_tags",
        default_size="30b-a3b",
        default_quant="4bit",
        variants=(
            Variant("30b-a3b", "4bit", "mlx-community/GLM-4.7-Flash-4bit"),
            Variant("30b-a3b", "5bit", "mlx-community/GLM-4.7-Flash-5bit"),
            Variant("30b-a3b", "6bit", "mlx-community/GLM-4.7-Flash-6bit"),
            Variant("30b-a3b", "8bit", "mlx-community/GLM-4.7-Flash-8bit"),
        ),
        source="exo model cards (all four)",
    ),
)

CATALOG: dict[str, Family] = {family.name: family for family in _FAMILIES}

_BY_REPO: dict[str, tuple[Family, Variant]] = {
    variant.repo.lower(): (family, variant)
    for family in _FAMILIES
    for variant in family.variants
}


def families() -> list[Family]:
    return list(_FAMILIES)


def find_repo(repo: str) -> tuple[Family, Variant] | None:
    """The catalog entry serving `repo`, ignoring case as the hub does."""
    return _BY_REPO.get(repo.lower())
