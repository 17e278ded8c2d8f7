"""Tokenizing a prompt that begins like an earlier one without tokenizing that part again.

An agent sends its whole conversation every turn, so a turn's prompt is the last
turn's prompt plus a little. A fast tokenizer first cuts text at its added tokens
(`<|im_start|>`, `<|im_end|>`, ...) and tokenizes each piece on its own, so the
tokens of a text are the tokens of its part up to an added token followed by the
tokens of the rest. `PrefixTokenizer` remembers, for the last prompts, their text
up to their last added token and its tokens; a prompt that starts with one of these
texts only tokenizes what follows.

Where this does not hold, the result would differ from tokenizing the whole text:
added tokens that strip the spaces beside them, or a tokenizer that marks only the
text's first word (SentencePiece's "prepend to the first piece"). A check at first
use tokenizes probes both ways; a tokenizer that fails it always tokenizes whole.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections import deque

# Prompts whose beginnings are remembered, per tokenizer: the conversations in flight.
REMEMBERED = 16
# How far from a prompt's end its last added token is looked for (a template's
# generation prompt ends with one; a prompt without one near its end is not remembered).
TAIL_CHARS = 4096
_PROBE_PIECES = ("Hello", " world", "\n\nuser\n  indented", "  two spaces", "\n", "x = 1\n")


_by_tokenizer: "weakref.WeakKeyDictionary[object, PrefixTokenizer]" = weakref.WeakKeyDictionary()
_by_tokenizer_lock = threading.Lock()


def encode_prompt(tokenizer, text: str) -> list[int]:
    """`tokenizer.encode(text, add_special_tokens=False)`, reusing what is known of its beginning."""
    with _by_tokenizer_lock:
        prefixes = _by_tokenizer.get(tokenizer)
        if prefixes is None:
            prefixes = _by_tokenizer[tokenizer] = PrefixTokenizer(tokenizer)
    return prefixes.encode(text)


class PrefixTokenizer:
    """Encodes prompts (add_special_tokens=False) reusing the known tokens of their beginning.
    Thread-safe: the prompt builders share one per tokenizer."""

    def __init__(self, tokenizer):
        self._encode_whole = lambda text: tokenizer.encode(text, add_special_tokens=False)
        added = _added_tokens(tokenizer)
        self._added_ids = {t: i for i, t in added}
        self._added_texts = sorted(self._added_ids, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, self._added_texts))) if added else None
        self._ids = set(self._added_ids.values())
        self._known: deque[tuple[str, list[int]]] = deque(maxlen=REMEMBERED)
        self._lock = threading.Lock()
        self.exact = bool(added) and self._splits_exactly(tokenizer)

    def encode(self, text: str) -> list[int]:
        if not self.exact:
            return self._encode_whole(text)
        with self._lock:
            known = max((k for k in self._known if text.startswith(k[0])), key=lambda k: len(k[0]), default=None)
        if known is None:
            tokens = self._encode_whole(text)
        else:
            tokens = known[1] + self._encode_whole(text[len(known[0]):])
        self._remember(text, tokens)
        return tokens

    def _remember(self, text: str, tokens: list[int]) -> None:
        """Keep the text up to its last added token, with its tokens, when the last added
        token found in the text is the last one among the tokens."""
        start = max(0, len(text) - TAIL_CHARS)
        last = None
        for last in self._added_re.finditer(text, start):
            pass
        if last is None:
            return
        k = len(tokens) - 1
        while k >= 0 and tokens[k] not in self._ids:
            k -= 1
        if k < 0 or tokens[k] != self._added_ids[last.group()]:
            return
        head = text[: last.end()]
        with self._lock:
            for i, (known, _) in enumerate(self._known):
                if known == head:
                    del self._known[i]
                    break
            self._known.append((head, tokens[: k + 1]))

    def _splits_exactly(self, tokenizer) -> bool:
        """Whether text cut right after each added token tokenizes the same in two parts as whole."""
        for added in self._added_texts[:8]:
            for before in _PROBE_PIECES:
                for after in _PROBE_PIECES:
                    head, tail = before + added, after + added + after
                    if self._encode_whole(head) + self._encode_whole(tail) != self._encode_whole(head + tail):
                        return False
        return True


def _added_tokens(tokenizer) -> list[tuple[int, str]]:
    """The tokenizer's added tokens that it cuts text at first: (id, text); none if it strips spaces beside them."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    if not isinstance(decoder, dict):
        return []
    added = []
    for token_id, token in decoder.items():
        if getattr(token, "lstrip", False) or getattr(token, "rstrip", False):
            return []
        content = getattr(token, "content", None)
        if content:
            added.append((token_id, content))
    return added
