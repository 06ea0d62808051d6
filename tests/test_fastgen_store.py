"""FastGen's compressed cache on synthetic tensors (no model): hundreds of random decode steps with mixed policies,
checked at every step against a dense reference over exactly the tokens each KV head holds, and the budgets,
protection, eviction order, bookkeeping (bitmaps, slots, scores) and physical size (the pool blocks its rows hold).
A cache here is one layer of a sequence on its own: a batch of one in a pool that starts small and doubles."""
import math

import pytest
import torch

import tinygen.fastgen.cache as fg_cache
from conftest import DEVICES, decode_one
from tinygen.attention import dense_attention
from tinygen.cache import FullRows
from tinygen.fastgen.cache import FastGenCache
from tinygen.kvpool import KVPool
from tinygen.paged import PagedBatch
from tinygen.fastgen.kinds import TokenKinds
from tinygen.fastgen.policy import CANDIDATES, FREQUENT, FULL, LOCAL, PUNCT, SPECIAL, FastGenConfig
from tinygen.fastgen.profile import recoveries_dense

N_HEADS, N_KV, HD = 8, 4, 8
GROUPS = N_HEADS // N_KV
L0 = 30  # prompt length
VOCAB = [SPECIAL if i < 3 else PUNCT if i < 10 else 0 for i in range(50)]  # ids 0-2 special, 3-9 punctuation
SP, SPF, SPFL = SPECIAL | PUNCT, SPECIAL | PUNCT | FREQUENT, SPECIAL | PUNCT | FREQUENT | LOCAL


def expected_budgets(policy: int, L: int, kinds: list[int], cfg: FastGenConfig):
    """(window, frequent budget, most tokens kept) at length L, from the definitions (decisions 3 and 4)."""
    if policy & FULL:
        return L, 0, L
    w = min(L, math.ceil(cfg.local_ratio * L)) if policy & LOCAL else 0
    b = min(L, math.ceil(cfg.frequent_ratio * L)) if policy & FREQUENT else 0
    prot = sum(1 for kd in kinds[: L - w] if kd & policy & (SPECIAL | PUNCT))
    return w, b, w + prot + min(b, L - w - prot)


def lone(max_len: int, device, block_size: int = 16, first_blocks: int = 4) -> PagedBatch:
    """A batch of one for one layer: a pool of `first_blocks` blocks that doubles when they run out."""
    pool = KVPool(first_blocks, block_size, HD, N_KV, max_len, torch.device(device), torch.float32, growable=True)
    return PagedBatch(pool, 1, N_HEADS, N_KV)


def one_layer(cache_type, paged: PagedBatch, *args):
    cache = cache_type(paged, 0, 0, *args)
    paged.set_batch([(0, [cache])])
    return cache


def resident(cache: FastGenCache, L: int) -> torch.Tensor:
    """(n_kv_heads, L) bool: which tokens each KV head holds, from the stores' bitmaps."""
    idx = torch.cat([s.kv_index for s in cache.stores]).cpu()
    assert sorted(idx.tolist()) == list(range(N_KV)), "every KV head in exactly one store"
    mask = torch.zeros(N_KV, L, dtype=torch.bool)
    for s in cache.stores:
        mask[s.kv_index.cpu()] = s.resident_mask(L).cpu()
    return mask


class Reference:
    """Dense history of everything the cache was given, and reference cumulative scores."""

    def __init__(self, max_len, device):
        self.K = torch.zeros(N_KV, max_len, HD, device=device)
        self.V = torch.zeros(N_KV, max_len, HD, device=device)
        self.score = torch.zeros(N_KV, max_len, dtype=torch.float64)
        self.kinds: list[int] = []
        self.grew = 0


def check_state(cache: FastGenCache, ref: Reference, L: int, cfg: FastGenConfig, before: torch.Tensor | None,
                max_gone: int = 1):
    """Invariants after prefill (before=None), or after a decode step or a chunk (before = what it attended over,
    max_gone = the most tokens it may evict per head)."""
    mask = resident(cache, L)
    kinds = torch.tensor(ref.kinds[:L], dtype=torch.uint8)
    assert cache.kept_tokens() == int(mask.sum())
    bound = 0
    for s in cache.stores:
        policy, heads = s.policy, s.kv_index.cpu().tolist()
        assert all(cache.policies[h] == policy for h in heads)
        w, b, most = expected_budgets(policy, L, ref.kinds, s.cfg)  # a store's own ratios (budget profile: per head)
        protect = policy & (SPECIAL | PUNCT)
        prot = (kinds & protect) != 0
        outside = torch.arange(L) < L - w
        # bitmap: nothing set beyond the length, popcount == kept, the same for every head of the store
        full_bits = s.resident_mask(cache.pool.bitmap.shape[1] * 8).cpu()
        assert not full_bits[:, L:].any()
        assert (full_bits.sum(1) == s.kept).all(), (policy, full_bits.sum(1), s.kept)
        if before is None:
            assert s.kept == most
        else:
            assert s.kept == min(int(before[heads[0]].sum()), most), (policy, L)
        # the slots: positions in use are exactly the set bits, and hold that token's K, V (and score)
        kv = cache.pool
        for i, h in enumerate(heads):
            freed = int(kv.freed[s.rows[i]])
            r = [x for x in range(s.kept + 1 if s.hole else s.kept) if not (s.hole and x == freed)]
            assert len(r) == s.kept
            k, v, pos, _, score = s._read(torch.tensor(r, dtype=torch.long, device=kv.k.device).expand(len(heads), -1))
            pos = pos[i].long().cpu()
            assert sorted(pos.tolist()) == mask[h].nonzero()[:, 0].tolist(), (policy, h, L)
            assert torch.equal(k[i], ref.K[h, pos.to(k.device)])
            assert torch.equal(v[i], ref.V[h, pos.to(v.device)])
            if policy & FREQUENT:
                torch.testing.assert_close(score[i].cpu().double(), ref.score[h, pos], atol=1e-5, rtol=1e-5)
            # budgets
            m = mask[h]
            if policy & FULL:
                assert m.all()
                continue
            assert m[L - w :].all(), "the local window is held whole"
            assert m[prot].all(), "protected tokens are never evicted"
            pool = int((m & ~prot & outside).sum())
            assert pool <= b, (policy, pool, b)
            if before is not None:
                prev = before[h]
                assert not (m & ~prev).any(), "an evicted token never comes back"
                gone = (prev & ~m).nonzero()[:, 0]
                assert len(gone) == int(prev.sum()) - s.kept <= max_gone
                if len(gone):
                    evictable = prev & ~prot & outside
                    assert evictable[gone].all()
                    stayed = evictable & m
                    if policy & FREQUENT:  # the lowest mean attention (score / rows that saw it) among the evictable
                        mean = ref.score[h, :L] / torch.arange(L, 0, -1, dtype=torch.float64)
                        lowest = mean.masked_fill(~stayed, math.inf).min()
                        assert mean[gone].max() <= lowest + 1e-6, (policy, L, gone, lowest)
                    else:  # the oldest (the token that just left the window, or a new unprotected token)
                        assert torch.equal(gone, evictable.nonzero()[: len(gone), 0]), (policy, L, gone)
        # physical size: each row holds the blocks of its slots in use and of the next token's slot, no more
        bs = cache.pool.block_size
        for row in s.rows:
            held = len(cache.pool.blocks[row])
            assert -(-s.kept // bs) <= held <= -(-(s.kept + 1) // bs), (policy, s.kept, held)
        bound += len(heads) * -(-(s.kept + 1) // bs) * cache.pool.block_bytes()
    cache.pool.check()
    assert cache.nbytes() == cache.pool.used_blocks() * cache.pool.block_bytes() <= bound
    return mask


def feed(cache: FastGenCache, ref: Reference, tk: TokenKinds, g, dev, mask: torch.Tensor, T: int,
         cfg: FastGenConfig, where: str) -> torch.Tensor:
    """T random tokens after the prompt (T = 1: a decode step; T > 1: a chunk), checked against dense attention
    over exactly what each KV head held before plus the new tokens up to each query. Returns the new residency."""
    ids = torch.randint(0, len(VOCAB), (T,), generator=g).tolist()
    tk.append(ids)
    ref.kinds += [VOCAB[i] for i in ids]
    L = cache.length + T
    q = torch.randn(N_HEADS, T, HD, generator=g).to(dev) * 1.5
    k = torch.randn(N_KV, T, HD, generator=g).to(dev)
    v = torch.randn(N_KV, T, HD, generator=g).to(dev)
    before = torch.zeros(N_KV, L, dtype=torch.bool)
    before[:, : L - T] = mask
    before[:, L - T :] = True  # every new token is attended (causally) and then competes for its head's budget
    out = decode_one(cache, ids[0], q, k, v) if T == 1 else cache.attend(q, k, v)
    assert cache.length == L
    ref.K[:, L - T : L], ref.V[:, L - T : L] = k, v
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    visible = before[:, None, :].repeat(1, T, 1)  # (n_kv_heads, T, L)
    visible[:, :, L - T :] = causal
    qmask = visible.repeat_interleave(GROUPS, 0).to(dev)  # query head h reads KV head h // GROUPS
    ref_out, probs = dense_attention(q, ref.K[:, :L], ref.V[:, :L], qmask)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5, msg=lambda m: f"{where}: {m}")
    ref.score[:, :L] += probs.view(N_KV, GROUPS, T, L).mean(1).sum(1).cpu().double()
    return check_state(cache, ref, L, cfg, before, max_gone=T)


def run(cfg: FastGenConfig, device: str, steps: int, seed: int = 0, expect_policies=None,
        chunks: dict[int, int] | None = None):
    """Prefill a random prompt, then `steps` random decode steps, checking everything at every step. `chunks`
    {step: T} makes those steps chunks of T tokens (a chat's next turn) instead."""
    g = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    chunks = chunks or {}
    max_len = L0 + steps + sum(T - 1 for T in chunks.values())
    ids = [1] + torch.randint(0, len(VOCAB), (L0 - 1,), generator=g).tolist()  # BOS first
    tk = TokenKinds(VOCAB, max_len, dev)
    tk.append(ids)
    ref = Reference(max_len, dev)
    ref.kinds = [VOCAB[i] for i in ids]
    cache = one_layer(FastGenCache, lone(max_len, device), N_HEADS, N_KV, tk, cfg)

    q = (torch.randn(N_HEADS, L0, HD, generator=g) * 1.5).to(dev)
    k = torch.randn(N_KV, L0, HD, generator=g).to(dev)
    v = torch.randn(N_KV, L0, HD, generator=g).to(dev)
    out = cache.attend(q, k, v)
    assert cache.length == L0
    ref_out, probs = dense_attention(q, k, v, torch.ones(L0, L0, dtype=torch.bool, device=dev).tril())
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    ref.K[:, :L0], ref.V[:, :L0] = k, v
    attn = probs.view(N_KV, GROUPS, L0, L0).mean(1).cpu()
    ref.score[:, :L0] = attn.sum(1).double()
    ref.attn = attn  # the prompt's group-averaged attention, (n_kv_heads, L0, L0)
    seen = torch.arange(L0, 0, -1, dtype=torch.float64)  # rows that saw each prompt token
    if expect_policies is not None:
        assert cache.policies == list(expect_policies)
    if cfg.fixed_policy is None and not cfg.budgeted:
        kinds = torch.tensor(ref.kinds, dtype=torch.uint8)
        torch.testing.assert_close(cache.recovery.cpu(), recoveries_dense(attn, kinds, cfg), atol=1e-5, rtol=1e-5)

    # prefill residency: protected kinds, the window, and the heaviest of the rest by mean prompt attention
    mask = check_state(cache, ref, L0, cfg, None)
    head_cfg = {h: s.cfg for s in cache.stores for h in s.kv_index.tolist()}
    for h, policy in enumerate(cache.policies):
        w, b, most = expected_budgets(policy, L0, ref.kinds, head_cfg[h])
        keep = torch.ones(L0, dtype=torch.bool)
        if not policy & FULL:
            keep = (torch.tensor(ref.kinds) & policy & (SPECIAL | PUNCT)) != 0
            keep[L0 - w :] = True
            n = min(b, int((~keep).sum()))
            if n:
                paper = cfg.fixed_policy is None and not cfg.budgeted  # Eq. 1's set: the largest column sums
                rank = ref.score[h, :L0] if paper else ref.score[h, :L0] / seen
                keep[rank.masked_fill(keep, -math.inf).topk(n).indices] = True
        assert torch.equal(mask[h], keep), (h, policy)
        if cfg.fixed_policy is None and not cfg.budgeted and policy in CANDIDATES and not policy & (LOCAL | FULL):
            # what the head stores recovers exactly what its profile chose it for (a windowed candidate's recovery
            # counts each row's own window, which no fixed set of tokens equals)
            stored = float(attn[h][:, mask[h]].sum()) / L0
            assert stored == pytest.approx(float(cache.recovery[h, CANDIDATES.index(policy)]), abs=1e-5)

    blocks = cache.pool.n_blocks
    for step in range(steps):
        T = chunks.get(step, 1)
        mask = feed(cache, ref, tk, g, dev, mask, T, cfg, f"step {step}")
        ref.grew += cache.pool.n_blocks > blocks
        blocks = cache.pool.n_blocks
    return cache, ref


@pytest.fixture
def force_policies(monkeypatch):
    """Make profiling (policy auto) hand out the given policies, one per KV head."""
    def force(policies):
        monkeypatch.setattr(fg_cache, "choose_policies", lambda rec, threshold: list(policies))
    return force


MIXED = {  # name: (policy per KV head, (r_l, r_f))
    "paper-candidates": ([SPECIAL, SP, SPF, SPFL], (0.3, 0.3)),
    "fixed-baselines": ([LOCAL, FREQUENT, LOCAL | FREQUENT, FULL], (0.3, 0.3)),
    "shared-noncontiguous": ([SPFL, FREQUENT | LOCAL, SPFL, FREQUENT | LOCAL], (0.1, 0.2)),
    "reversed": ([FULL, SPFL, SP, SPECIAL], (0.2, 0.1)),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add contention (10x slower on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", MIXED)
def test_mixed_policies_300_steps(device, mix, force_policies):
    policies, (r_l, r_f) = MIXED[mix]
    force_policies(policies)
    cfg = FastGenConfig(policy="auto", profile="paper", local_ratio=r_l, frequent_ratio=r_f)
    cache, ref = run(cfg, device, steps=300, seed=len(mix), expect_policies=policies)
    assert len(cache.stores) == len(set(policies))
    assert ref.grew > 0, "the pool grew during decoding"
    # something was evicted from every compressible head
    for s in cache.stores:
        if s.policy != FULL:
            assert s.kept < cache.length


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ratios", [(0.5, 0.05), (0.0, 0.0), (1.0, 1.0)])
def test_mixed_policies_extreme_ratios(device, ratios, force_policies):
    force_policies([LOCAL, FREQUENT, SPFL, SPECIAL])
    cfg = FastGenConfig(profile="paper", local_ratio=ratios[0], frequent_ratio=ratios[1])
    cache, _ = run(cfg, device, steps=100, seed=7)
    kept = {s.policy: s.kept for s in cache.stores}
    L = cache.length
    if ratios == (1.0, 1.0):
        assert kept[LOCAL] == kept[FREQUENT] == kept[SPFL] == L
    if ratios == (0.0, 0.0):
        assert kept[LOCAL] == kept[FREQUENT] == 0  # nothing to keep: each new token attends to itself only
        assert kept[SPFL] == kept[SPECIAL] + sum(1 for i in range(L) if cache.kinds.kinds[i] & PUNCT)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["special", "special+punct", "special+punct+frequent",
                                    "special+punct+frequent+local", "local", "frequent", "local+frequent",
                                    "punct", "full"])
def test_fixed_policy_every_head(device, policy):
    cfg = FastGenConfig(policy=policy)
    cache, _ = run(cfg, device, steps=60, seed=3)
    assert len(cache.stores) == 1 and cache.stores[0].kv_index.tolist() == list(range(N_KV))
    assert cache.recovery is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threshold,expected", [(0.5, [SPF] * 4), (0.83, [SPFL, SPF, SPF, SPF]),
                                                (0.96, [FULL, SPFL, FULL, FULL]), (0.98, [FULL] * 4)])
def test_auto_policies_follow_profile(device, threshold, expected):
    """Unpatched auto: recoveries equal the dense reference (checked in run) and each head gets the first candidate
    reaching T. This seed's recoveries (rows: KV heads; S, SP, SPF, SPFL, full):
    [.252 .325 .814 .950 1], [.228 .311 .875 .975 1], [.180 .273 .836 .958 1], [.170 .243 .835 .954 1]."""
    cfg = FastGenConfig(profile="paper", threshold=threshold)
    cache, _ = run(cfg, device, steps=40, seed=11)
    assert cache.policies == expected


@pytest.mark.parametrize("device", DEVICES)
def test_full_policy_equals_full_cache(device):
    """FastGen's `full` policy and the plain full cache (FullRows): the same attention as dense attention over every
    token, 300 steps, every token held in blocks that never hold more than the tokens need."""
    torch.manual_seed(5)
    steps, max_len = 300, L0 + 300
    tk = TokenKinds(VOCAB, max_len, torch.device(device))
    tk.append(torch.randint(0, len(VOCAB), (L0,)).tolist())
    fg = one_layer(FastGenCache, lone(max_len, device), N_HEADS, N_KV, tk, FastGenConfig(policy="full"))
    full = one_layer(FullRows, lone(max_len, device), N_KV)
    q, k, v = torch.randn(N_HEADS, L0, HD), torch.randn(N_KV, L0, HD), torch.randn(N_KV, L0, HD)
    q, k, v = q.to(device), k.to(device), v.to(device)
    K, V = k, v
    want, _ = dense_attention(q, K, V, torch.ones(L0, L0, dtype=torch.bool, device=device).tril())
    torch.testing.assert_close(fg.attend(q, k, v), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(full.attend(q, k, v), want, atol=1e-6, rtol=1e-6)
    for step in range(steps):
        token = int(torch.randint(0, len(VOCAB), (1,)))
        tk.append([token])
        q = torch.randn(N_HEADS, 1, HD, device=device) * 2
        k, v = torch.randn(N_KV, 1, HD, device=device), torch.randn(N_KV, 1, HD, device=device)
        K, V = torch.cat([K, k], 1), torch.cat([V, v], 1)
        want, _ = dense_attention(q, K, V)
        for c in (fg, full):
            torch.testing.assert_close(decode_one(c, token, q, k, v), want, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"step {step}: {m}")
    for c in (fg, full):
        assert c.length == max_len and c.kept_tokens() == N_KV * max_len
        assert c.nbytes() == N_KV * -(-max_len // 16) * c.pool.block_bytes()  # the last step's slot: its own block
        assert torch.equal(c.pool.resident_mask(torch.tensor(c.rows()), max_len + 8).sum(1), torch.full((N_KV,), max_len))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", MIXED)
def test_chunks_after_decoding(device, mix, force_policies):
    """A chat's next turn: chunks of several tokens between decode steps attend over what each head holds plus the
    chunk causally (dense reference), then each head evicts down to its budget by the decode ranking, compacts, and
    decoding goes on from the compacted store (including right after an eviction left a freed row)."""
    policies, (r_l, r_f) = MIXED[mix]
    force_policies(policies)
    cfg = FastGenConfig(policy="auto", profile="paper", local_ratio=r_l, frequent_ratio=r_f)
    chunks = {5: 2, 20: 37, 21: 3, 60: 150}
    cache, _ = run(cfg, device, steps=80, seed=len(mix) + 1, expect_policies=policies, chunks=chunks)
    assert cache.length == L0 + 80 + sum(T - 1 for T in chunks.values())
    for s in cache.stores:
        if s.policy != FULL:
            assert s.kept < cache.length


@pytest.mark.parametrize("policy", ["frequent", "local+frequent", "special+punct", "full"])
def test_chunk_right_after_prompt_and_budget_profile(policy):
    """A chunk as the first thing after the prompt (no decode step between), for fixed policies."""
    cfg = FastGenConfig(policy=policy)
    run(cfg, "cpu", steps=10, seed=2, chunks={0: 40, 9: 5})


def test_chunk_budget_profile():
    """Chunks into the budget profile's stores (per-head ratios): the kept fraction stays near the budget."""
    cfg = FastGenConfig(policy="auto", kv_budget=0.5)
    cache, _ = run(cfg, "cpu", steps=12, seed=4, chunks={0: 25, 6: 60})
    assert cache.kept_tokens() / (cache.length * N_KV) == pytest.approx(0.5, abs=0.05)
