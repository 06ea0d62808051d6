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

    Host side: prefix counts per protected-kind mask, so the host's mirror of the budgets (block reservation) needs no
    device read. Device side: a kind per position (`by_position`) and the same prefix counts (`prefix_counts`, (4,
    max_len + 1): [m, n] = tokens among the first n whose kind shares a bit with mask m), from which a decode step
    computes budgets on the device. Feed it every token before the model sees it. A prompt or a chunk (several
    tokens) is written to the device here; a decode step's one token is written there by the step itself, from the
    sampled id (tinygen/step.py), so that the step is a function of device tensors alone.
    """

    def __init__(self, vocab: list[int], max_len: int, device: torch.device):
        self.vocab = vocab
        self.by_position = torch.zeros(max_len, dtype=torch.uint8, device=device)
        self.prefix_counts = torch.zeros(4, max_len + 1, dtype=torch.int32, device=device)
        self.kinds: list[int] = []
        # prefix[m][n]: tokens among the first n whose kind shares a bit with mask m (m in 0..3)
        self.prefix = {m: [0] for m in range(4)}
        self.written = 0  # positions whose kinds were written to the device here
        self.batch = None  # the PagedBatch whose tensors by_position and prefix_counts are views of (bind)

    def __len__(self):
        return len(self.kinds)

    def bind(self, by_position: torch.Tensor, prefix_counts: torch.Tensor) -> None:
        """Keep the device side in these tensors (a batch slot's rows of the batch's kinds: paged.py), what it holds
        so far copied over."""
        by_position.copy_(self.by_position[: by_position.shape[0]])
        prefix_counts.copy_(self.prefix_counts[:, : prefix_counts.shape[1]])
        self.by_position, self.prefix_counts = by_position, prefix_counts

    def append(self, ids: list[int]):
        new = [self.vocab[i] if 0 <= i < len(self.vocab) else 0 for i in ids]
        assert len(self.kinds) + len(new) <= self.by_position.shape[0], "more tokens than the caches were sized for"
        self.kinds += new
        for m, counts in self.prefix.items():
            counts.extend(accumulate((1 if k & m else 0 for k in new), initial=counts[-1]))
            del counts[-len(new) - 1]  # accumulate repeats its initial value first
        if len(new) > 1 or self.batch is None:  # one token in a batch: the decode step writes it (step.py)
            self.sync()

    def sync(self, n: int | None = None) -> None:
        """Write the kinds of positions [written, n) (default: every token) to the device: a prompt or a chunk does
        before it is attended. Positions a decode step wrote are written again, with the same values."""
        end = len(self.kinds) if n is None else n
        if end > self.written:
            a = self.written
            self.by_position[a:end] = torch.tensor(self.kinds[a:end], dtype=torch.uint8)
            self.prefix_counts[:, a + 1 : end + 1] = torch.tensor([self.prefix[m][a + 1 : end + 1] for m in range(4)],
                                                                 dtype=torch.int32)
            self.written = end

    def protected_before(self, mask: int, n: int) -> int:
        return self.prefix[mask][n]
