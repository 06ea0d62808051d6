"""FastGen profiling: recoveries of the candidate policies, the policy each head gets, block-wise profiling against
the whole attention map, and the token kinds (special, punctuation) over a vocabulary."""
import pytest
import torch

from conftest import DEVICES
from tinygen.attention import dense_attention
from tinygen.fastgen.kinds import is_punctuation, vocab_kinds
from tinygen.fastgen.policy import (CANDIDATES, FREQUENT, FULL, LOCAL, PUNCT, SPECIAL, FastGenConfig,
                                    frequent_budget, window)
from tinygen.fastgen.profile import (ProfileStats, choose_policies, profiled_attention, recoveries,
                                     recoveries_dense)

SP, SPF, SPFL = SPECIAL | PUNCT, SPECIAL | PUNCT | FREQUENT, SPECIAL | PUNCT | FREQUENT | LOCAL


def stats_from_map(attn: torch.Tensor, cfg: FastGenConfig, block: int) -> ProfileStats:
    """Feed a whole (n_kv, L, L) map to ProfileStats block by block, as profiled_attention does: rows r0..r1-1 over
    keys 0..r1-1 (keys beyond r1 are in the future of every row of the block)."""
    n_kv, L, _ = attn.shape
    stats = ProfileStats(n_kv, L, window(LOCAL, L, cfg), attn.device)
    for r0 in range(0, L, block):
        r1 = min(L, r0 + block)
        stats.add(attn[:, r0:r1, :r1], r0)
    return stats


def causal_rows(weights: torch.Tensor) -> torch.Tensor:
    """(L, L) non-negative weights -> row-stochastic causal map."""
    L = weights.shape[0]
    w = weights * torch.ones(L, L).tril()
    return w / w.sum(1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------------
# Hand-made maps -> expected policies


L_HAND = 40
PUNCT_POS = list(range(5, L_HAND, 5))  # 5, 10, ..., 35
HEAVY_POS = [3, 7, 12, 18]  # neither special nor punctuation


def hand_kinds() -> torch.Tensor:
    kinds = torch.zeros(L_HAND, dtype=torch.uint8)
    kinds[0] = SPECIAL  # BOS-like
    kinds[PUNCT_POS] = PUNCT
    return kinds


def hand_maps() -> torch.Tensor:
    """Five KV heads: special-dominated, punctuation-dominated, local, heavy-hitter, uniform. Every row puts 1% of
    its mass uniformly over its causal keys and the rest on the head's habit."""
    L = L_HAND
    tril = torch.ones(L, L).tril()
    uniform = tril / tril.sum(1, keepdim=True)

    def habit(weights):
        return 0.99 * causal_rows(weights) + 0.01 * uniform

    special = torch.zeros(L, L)
    special[:, 0] = 1.0
    punct = torch.zeros(L, L)
    punct[:, 0] = 0.3  # BOS alone is far from enough ...
    punct[:, PUNCT_POS] = 0.7  # ... with the punctuation it is all of it
    local = torch.zeros(L, L)
    for i in range(L):
        local[i, max(0, i - 2) : i + 1] = 1.0  # the last three tokens
    heavy = torch.zeros(L, L)
    heavy[:, [0] + HEAVY_POS] = 1.0  # rows before the first heavy hitter fall back on BOS
    return torch.stack([habit(special), habit(punct), habit(local), habit(heavy), uniform])


def test_hand_maps_are_row_stochastic_and_causal():
    maps = hand_maps()
    assert torch.allclose(maps.sum(-1), torch.ones(5, L_HAND), atol=1e-6)
    assert (maps.triu(1) == 0).all()


@pytest.mark.parametrize("block", [1, 7, 16, L_HAND])
def test_hand_made_maps_pick_expected_policies(block):
    cfg = FastGenConfig(threshold=0.98, local_ratio=0.3, frequent_ratio=0.3)
    maps, kinds = hand_maps(), hand_kinds()
    rec = recoveries(stats_from_map(maps, cfg, block), kinds, cfg)
    assert rec.shape == (5, len(CANDIDATES))
    assert choose_policies(rec, cfg.threshold) == [SPECIAL, SP, SPFL, SPF, FULL]
    # and each head's chosen candidate is the first to reach T: the one before it falls clearly short
    assert rec[0, 0] >= 0.99 - 1e-6
    assert rec[1, 0] < 0.5 and rec[1, 1] >= 0.99 - 1e-6
    assert rec[2, 2] < 0.7 and rec[2, 3] >= 0.99 - 1e-6
    assert rec[3, 1] < 0.5 and rec[3, 2] >= 0.99 - 1e-6
    assert rec[4, 3] < 0.96  # uniform: even local+frequent+special+punct misses a clear share
    assert torch.allclose(rec[:, 4], torch.ones(5))


def test_hand_made_maps_match_dense_reference():
    cfg = FastGenConfig(threshold=0.98, local_ratio=0.3, frequent_ratio=0.3)
    maps, kinds = hand_maps(), hand_kinds()
    # tie-free copy (the local and uniform heads have exactly equal column sums otherwise)
    torch.manual_seed(0)
    noisy = maps * (1 + 0.01 * torch.rand_like(maps))
    noisy = noisy / noisy.sum(-1, keepdim=True)
    rec = recoveries(stats_from_map(noisy, cfg, 9), kinds, cfg)
    assert torch.allclose(rec, recoveries_dense(noisy, kinds, cfg), atol=1e-5)


def test_threshold_changes_policy():
    """Lower T lets the local head get away with fewer components; T = 1 (only exact recovery) gives full to the
    heads whose map has mass everywhere."""
    maps, kinds = hand_maps(), hand_kinds()
    cfg = FastGenConfig(local_ratio=0.3, frequent_ratio=0.3)
    rec = recoveries(stats_from_map(maps, cfg, 8), kinds, cfg)
    assert choose_policies(rec, 1.0) == [FULL] * 5  # the 1% uniform share is everywhere
    assert choose_policies(rec, float(rec[4, 3]) - 1e-3)[4] == SPFL
    assert choose_policies(rec, float(rec[4, 0]))[4] == SPECIAL


# ---------------------------------------------------------------------------------------------------------------
# A tiny case worked out by hand


def test_recoveries_tiny_hand_computation():
    # L = 5; token 0 special (BOS), token 2 punctuation. r_l = r_f = 0.2 -> window = ceil(1.0) = 1,
    # heavy-hitter budget = ceil(1.0) = 1.
    #           key:  0    1    2    3    4
    A = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0],
                      [0.6, 0.4, 0.0, 0.0, 0.0],
                      [0.5, 0.1, 0.4, 0.0, 0.0],
                      [0.4, 0.1, 0.2, 0.3, 0.0],
                      [0.3, 0.1, 0.1, 0.2, 0.3]])
    # column sums: 2.8, 0.7, 0.7, 0.5, 0.3 (total 5)
    # special            {0}:        2.8 / 5             = 0.56
    # special+punct      {0, 2}:     (2.8 + 0.7) / 5     = 0.70
    # +frequent          heavy hitter among {1, 3, 4} by column sum: 1 (0.7 > 0.5 > 0.3)
    #                    {0, 1, 2}:  (2.8 + 0.7 + 0.7) / 5 = 0.84
    # +local (window 1: row i also keeps key i):
    #   rows 0..3 keep everything they attend to (1 each); row 4 keeps {0, 1, 2, 4} = 0.8 -> 4.8 / 5 = 0.96
    # full: 1
    expected = torch.tensor([[0.56, 0.70, 0.84, 0.96, 1.0]])
    kinds = torch.tensor([SPECIAL, 0, PUNCT, 0, 0], dtype=torch.uint8)
    cfg = FastGenConfig(local_ratio=0.2, frequent_ratio=0.2)
    assert window(LOCAL, 5, cfg) == 1 and frequent_budget(FREQUENT, 5, cfg) == 1
    for block in (1, 2, 5):
        rec = recoveries(stats_from_map(A[None], cfg, block), kinds, cfg)
        assert torch.allclose(rec, expected, atol=1e-6), (block, rec)
    assert torch.allclose(recoveries_dense(A[None], kinds, cfg), expected, atol=1e-6)
    assert choose_policies(expected, 0.98) == [FULL]
    assert choose_policies(expected, 0.95) == [SPFL]
    assert choose_policies(expected, 0.84) == [SPF]  # reaching T exactly counts (float slack)
    assert choose_policies(expected, 0.70) == [SP]
    assert choose_policies(expected, 0.56) == [SPECIAL]
    assert choose_policies(expected, 0.5) == [SPECIAL]


def test_recoveries_heavy_hitters_skip_protected_tokens():
    """The frequent budget goes to the heaviest tokens that special/punct do not already keep: a punctuation token
    with the largest column sum must not use up the budget."""
    # L = 4, r_f = 0.25 -> budget 1; token 1 (punctuation) is the heaviest column, token 2 the heaviest free one.
    A = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                      [0.2, 0.8, 0.0, 0.0],
                      [0.1, 0.5, 0.4, 0.0],
                      [0.1, 0.4, 0.3, 0.2]])
    # colsums 1.4, 1.7, 0.7, 0.2; sp = {0, 1} -> 3.1/4; + heavy {2} -> 3.8/4; local (window 1) adds row 3's key 3.
    kinds = torch.tensor([SPECIAL, PUNCT, 0, 0], dtype=torch.uint8)
    cfg = FastGenConfig(local_ratio=0.25, frequent_ratio=0.25)
    rec = recoveries(stats_from_map(A[None], cfg, 2), kinds, cfg)
    assert torch.allclose(rec, torch.tensor([[1.4 / 4, 3.1 / 4, 3.8 / 4, 1.0, 1.0]]), atol=1e-6)


def test_recoveries_more_budget_than_free_tokens():
    """Every token special or punctuation: nothing to choose heavy hitters from (topk of 0)."""
    A = causal_rows(torch.rand(6, 6) + 0.1)[None]
    kinds = torch.tensor([SPECIAL, PUNCT, PUNCT, SPECIAL, PUNCT, PUNCT], dtype=torch.uint8)
    cfg = FastGenConfig()
    rec = recoveries(stats_from_map(A, cfg, 4), kinds, cfg)
    assert torch.allclose(rec[0, 1:], torch.ones(4), atol=1e-6)
    assert torch.allclose(rec, recoveries_dense(A, kinds, cfg), atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_recoveries_random_maps_match_dense_and_are_monotone(seed):
    g = torch.Generator().manual_seed(seed)
    n_kv, L = 3, 37
    logits = torch.randn(n_kv, L, L, generator=g) * 2
    maps = torch.softmax(logits.masked_fill(torch.ones(L, L).triu(1).bool(), float("-inf")), -1)
    kinds = torch.zeros(L, dtype=torch.uint8)
    kinds[0] = SPECIAL
    kinds[torch.randperm(L - 1, generator=g)[:8] + 1] = PUNCT
    for lr, fr in [(0.3, 0.3), (0.1, 0.5), (0.0, 0.0), (1.0, 1.0)]:
        cfg = FastGenConfig(local_ratio=lr, frequent_ratio=fr)
        rec = recoveries(stats_from_map(maps, cfg, 5), kinds, cfg)
        assert torch.allclose(rec, recoveries_dense(maps, kinds, cfg), atol=1e-5), (lr, fr)
        # each candidate keeps a superset of the one before it
        assert (rec[:, 1:] >= rec[:, :-1] - 1e-6).all()
        if lr == 1.0:  # the window covers every row's whole causal past
            assert torch.allclose(rec[:, 3], torch.ones(n_kv), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Block-wise profiling from q, k, v against the whole attention map


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("L", [70, 16, 5])
def test_blockwise_profiling_equals_dense(device, L, monkeypatch):
    torch.manual_seed(L)
    n_heads, n_kv, hd = 6, 2, 16
    q = torch.randn(n_heads, L, hd, device=device) * 2  # peakier attention than unit scale
    k = torch.randn(n_kv, L, hd, device=device)
    v = torch.randn(n_kv, L, hd, device=device)
    kinds = torch.zeros(L, dtype=torch.uint8)
    kinds[0] = SPECIAL
    kinds[torch.arange(3, L, 7)] = PUNCT
    kinds = kinds.to(device)
    cfg = FastGenConfig()

    calls = []
    add = ProfileStats.add
    monkeypatch.setattr(ProfileStats, "add", lambda self, probs, r0: (calls.append((r0, tuple(probs.shape))),
                                                                      add(self, probs, r0)))
    stats = ProfileStats(n_kv, L, window(LOCAL, L, cfg), torch.device(device))
    out = profiled_attention(q, k, v, stats, max_block_bytes=4 * n_heads * L * 16)  # 16 rows per block
    # blocks of 16 rows cover every row exactly once, each over the keys up to its last row
    assert [r0 for r0, _ in calls] == list(range(0, L, 16))
    assert all(shape == (n_kv, min(16, L - r0), min(L, r0 + 16)) for r0, shape in calls)

    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    ref_out, ref_probs = dense_attention(q, k, v, causal)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    attn = ref_probs.view(n_kv, n_heads // n_kv, L, L).mean(1)  # GQA: group-averaged
    torch.testing.assert_close(stats.colsum, attn.sum(1), atol=1e-5, rtol=1e-5)
    rec = recoveries(stats, kinds, cfg)
    ref = recoveries_dense(attn.cpu(), kinds.cpu(), cfg)
    torch.testing.assert_close(rec.cpu(), ref, atol=1e-5, rtol=1e-5)
    assert choose_policies(rec, 0.9) == choose_policies(ref, 0.9)

    # a single block gives the same figures
    whole = ProfileStats(n_kv, L, window(LOCAL, L, cfg), torch.device(device))
    out1 = profiled_attention(q, k, v, whole)
    torch.testing.assert_close(out1, out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(recoveries(whole, kinds, cfg), rec, atol=1e-6, rtol=1e-6)


def test_profiled_attention_without_stats():
    torch.manual_seed(1)
    q, k, v = torch.randn(4, 20, 8), torch.randn(2, 20, 8), torch.randn(2, 20, 8)
    out = profiled_attention(q, k, v, None, max_block_bytes=1)
    ref, _ = dense_attention(q, k, v, torch.ones(20, 20, dtype=torch.bool).tril())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary kinds


@pytest.mark.parametrize("text,expected", [
    (".", True), (" ,", True), ("?!", True), ("\u2014", True), ("...", True), ("\u00bf", True), (" \u300c", True),
    (" the", False), ("", False), (" ", False), ("\n\t", False), ("a.", False), (".a", False), ("1.", False),
    ("+", False), ("$", False),  # math and currency symbols are S*, not punctuation
])
def test_is_punctuation(text, expected):
    assert is_punctuation(text) is expected


class FakeTokenizer:
    def __init__(self, texts, special):
        self.texts, self.special_ids, self.vocab_size = texts, frozenset(special), len(texts)

    def token_text(self, i):
        return self.texts[i]


def test_vocab_kinds_fake_tokenizer():
    tok = FakeTokenizer(["<s>", "</s>", " the", ".", " ,", "<|im_start|>", "!!", "a", ""], special={0, 1, 5})
    assert vocab_kinds(tok) == [SPECIAL, SPECIAL, 0, PUNCT, PUNCT, SPECIAL, PUNCT, 0, 0]


def test_vocab_kinds_special_wins_over_punctuation():
    tok = FakeTokenizer([".", ","], special={0})
    assert vocab_kinds(tok) == [SPECIAL, PUNCT]


def test_vocab_kinds_real_tokenizer(default_model_dir):
    from tinygen.tokenizer import Tokenizer

    tok = Tokenizer(default_model_dir)
    kinds = vocab_kinds(tok)
    assert len(kinds) == tok.vocab_size
    assert all(kinds[i] == SPECIAL for i in range(17))
    assert sum(k == SPECIAL for k in kinds) == len(tok.special_ids)
    (comma,) = tok.encode(",")
    (the,) = tok.encode(" the")
    (period,) = tok.encode(".")
    assert kinds[comma] == PUNCT and kinds[period] == PUNCT
    assert kinds[the] == 0
    assert 0 < sum(k == PUNCT for k in kinds) < len(kinds) // 10
    assert vocab_kinds(tok) is kinds  # computed once per tokenizer
