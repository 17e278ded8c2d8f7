"""Tokenizing only what a prompt adds to an earlier one's beginning gives exactly the
tokens of tokenizing it whole, for every chat family the tests build, the real
SmolLM2 tokenizer, and a tokenizer where cutting is not exact (which then never cuts)."""

from __future__ import annotations

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mlxd.server.prompt_tokens import PrefixTokenizer, encode_prompt
from scripts.testmodels import FAMILIES, build_tokenizer_files

ANSWERS = [
    "Hello! How can I help?",
    "Here is the file:\n\n```python\nx = 1  \n\ty = 2\n```\n",
    "  leading spaces, trailing spaces  ",
    "Unicode: héllo wörld — ✓ 日本語",
    "It says <|im_end|> and <|eot_id|> literally.",
]


def conversation_prompts(tokenizer) -> list[str]:
    """The rendered prompts of an agent conversation, each turn extending the last."""
    messages = [{"role": "system", "content": "You are a coding agent. " * 40},
                {"role": "user", "content": "Start."}]
    prompts = [tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)]
    for i, answer in enumerate(ANSWERS):
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"Turn {i}:\n {answer}"}]
        prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return prompts


def assert_same_as_whole(tokenizer) -> PrefixTokenizer:
    prefixes = PrefixTokenizer(tokenizer)
    prompts = conversation_prompts(tokenizer)
    for text in prompts + prompts[::-1] + [prompts[2] + "tail without an added token"]:
        assert prefixes.encode(text) == tokenizer.encode(text, add_special_tokens=False)
    return prefixes


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_chat_family_cuts_exactly(tmp_path, family):
    build_tokenizer_files(tmp_path, family)
    prefixes = assert_same_as_whole(load_tokenizer(tmp_path))
    assert prefixes.exact and prefixes._known  # it did reuse beginnings


def test_the_real_smollm2_tokenizer_cuts_exactly(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    prefixes = assert_same_as_whole(tokenizer)
    assert prefixes.exact
    # The module's entry point keeps one per tokenizer.
    text = conversation_prompts(tokenizer)[-1]
    assert encode_prompt(tokenizer, text) == encode_prompt(tokenizer, text) == tokenizer.encode(
        text, add_special_tokens=False)


def test_a_tokenizer_that_marks_only_the_first_word_is_never_cut():
    """SentencePiece's "prepend to the first piece" gives a piece after an added token
    no word mark when the text is whole, and one when it is tokenized alone."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    corpus = ["Hello world, two spaces and an indented user line.", "x = 1", "b a b a"] * 20
    backend.train_from_iterator(corpus, trainers.BpeTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        additional_special_tokens=["<s>", "</s>"])
    prefixes = PrefixTokenizer(tokenizer)
    assert not prefixes.exact
    for text in ("Hello world</s>", "Hello world</s>Hello world", "Hello</s>world</s> x = 1"):
        assert prefixes.encode(text) == tokenizer.encode(text, add_special_tokens=False)
    assert not prefixes._known
