"""Token kinds (special, punctuation) over the vocabulary, and the running kinds of one sequence's tokens."""
from __future__ import annotations

import unicodedata
import weakref
from itertools import accumulate

import torch

from .policy import PUNCT, SPECIAL


def is_punctuation(text: str) -> bool:
    """Non-empty once white space is stripped, and made only of Unicode punctuation."""
    s = text.strip()
    return bool(s) and all(unicodedata.category(c).startswith("P") for c in s)


_VOCAB_CACHE: "weakref.WeakKeyDictionary[object, list[int]]" = weakref.WeakKeyDictionary()


def vocab_kinds(tokenizer) -> list[int]:
    """kind bits (SPECIAL, PUNCT) of every id; computed once per tokenizer object."""
    if tokenizer not in _VOCAB_CACHE:
        _VOCAB_CACHE[tokenizer] = [SPECIAL if i in tokenizer.special_ids else
                                   PUNCT if is_punctuation(tokenizer.token_text(i)) else 0
                                   for i in range(tokenizer.vocab_size)]
    return _VOCAB_CACHE[tokenizer]


class TokenKinds:
    """Kinds of the tokens of one sequence, shared by every layer's FastGen cache.

    Host side: prefix counts per protected-kind mask, so budgets need no device sync. Device side: a kind per
    position, for masking protected tokens during eviction. Feed it every token before the model sees it.
    """

    def __init__(self, vocab: list[int], max_len: int, device: torch.device):
        self.vocab = vocab
        self.by_position = torch.zeros(max_len, dtype=torch.uint8, device=device)
        self.kinds: list[int] = []
        # prefix[m][n]: tokens among the first n whose kind shares a bit with mask m (m in 0..3)
        self.prefix = {m: [0] for m in range(4)}

    def __len__(self):
        return len(self.kinds)

    def append(self, ids: list[int]):
        new = [self.vocab[i] if 0 <= i < len(self.vocab) else 0 for i in ids]
        start = len(self.kinds)
        assert start + len(new) <= self.by_position.shape[0], "more tokens than the caches were sized for"
        if len(new) == 1:
            self.by_position[start] = new[0]  # a scalar fill: no host sync
        else:
            self.by_position[start : start + len(new)] = torch.tensor(new, dtype=torch.uint8)
        self.kinds += new
        for m, counts in self.prefix.items():
            counts.extend(accumulate((1 if k & m else 0 for k in new), initial=counts[-1]))
            del counts[-len(new) - 1]  # accumulate repeats its initial value first

    def protected_before(self, mask: int, n: int) -> int:
        return self.prefix[mask][n]
