"""FastGen's pooled decode step (tinygen/fastgen/pool.py) on synthetic tensors: sequences of different lengths and
policies join and leave a batch whose stores of the same policy share one pool; every step must give each sequence
what its stores give it alone, and what dense attention over exactly the tokens each pair holds gives."""
import itertools

import pytest
import torch
from conftest import DEVICES, TRITON_DEVICES
from test_triton_decode import kernels  # noqa: F401  (fixture: the interpreter on a machine without a GPU)

import tinygen.fastgen.cache as fg_cache
import tinygen.fastgen.pool as pool_module
from tinygen.attention import dense_attention
from tinygen.fastgen.cache import FastGenCache
from tinygen.fastgen.kinds import TokenKinds
from tinygen.fastgen.policy import FREQUENT, FULL, LOCAL, PUNCT, SPECIAL, FastGenConfig
from tinygen.fastgen.pool import FastGenBatch

N_HEADS, N_KV, HD = 8, 4, 8
VOCAB = [SPECIAL if i < 3 else PUNCT if i < 10 else 0 for i in range(50)]  # ids 0-2 special, 3-9 punctuation
SP, SPF, SPFL = SPECIAL | PUNCT, SPECIAL | PUNCT | FREQUENT, SPECIAL | PUNCT | FREQUENT | LOCAL
MAX_LEN = 120
# (prompt length, step it joins the batch, step it leaves (None: runs to the end)): different lengths, an early
# leave that gives a store its rows back and leaves one sequence stepping alone, late joins that rebuild the pools
# from pooled and fresh stores, and the longest sequence leaving first (the pools shrink).
SEQS = [(12, 0, 8), (31, 0, None), (20, 15, None), (25, 20, 50), (70, 25, 40)]
STEPS = 70


class Sequence:
    """One sequence twice: caches that step alone (batch-1 code) and caches that step in the pools, with the same
    prompt, kinds and new tokens, and its dense K/V history."""

    def __init__(self, L0, cfg, g, dev):
        self.ids = torch.randint(0, 50, (MAX_LEN,), generator=g).tolist()
        self.K, self.V = torch.randn(2, N_KV, MAX_LEN, HD, generator=g).to(dev)
        q = torch.randn(N_HEADS, L0, HD, generator=g).to(dev)
        self.alone, self.pooled = [self.cache(cfg, dev) for _ in range(2)]
        for c in (self.alone, self.pooled):
            c.kinds.append(self.ids[:L0])
            c.attend(q, self.K[:, :L0], self.V[:, :L0])
        assert self.alone.policies == self.pooled.policies

    @staticmethod
    def cache(cfg, dev):
        return FastGenCache(N_HEADS, N_KV, HD, MAX_LEN, TokenKinds(VOCAB, MAX_LEN, torch.device(dev)), cfg)

    def resident(self, cache):
        mask = torch.zeros(N_KV, cache.length, dtype=torch.bool, device=self.K.device)
        for s in cache.stores:
            mask[s.kv_index] = s.resident_mask(cache.length)
        return mask


SCENARIOS = {
    # paper profile, each sequence its own mix: pools hold different heads of different sequences
    "paper-mixed": (FastGenConfig(profile="paper", local_ratio=0.2, frequent_ratio=0.25, growth_block=4),
                    [[SPECIAL, SP, SPF, SPFL], [FULL, SPFL, SP, LOCAL], [FREQUENT, LOCAL | FREQUENT, SPF, SPECIAL],
                     [SPFL, SPFL, FREQUENT, FULL], [FULL, SPECIAL, SPF, LOCAL | FREQUENT]]),
    # one fixed policy: one pool, every head of every sequence in order
    "local+frequent": (FastGenConfig("local+frequent", local_ratio=0.15, frequent_ratio=0.3, growth_block=4), None),
    "budget": (FastGenConfig(kv_budget=0.5, observation=8, growth_block=4), None),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pooled_steps_equal_each_sequence_alone(device, scenario, monkeypatch):
    run_batch(device, scenario, monkeypatch, SEQS, STEPS)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("scenario", ["paper-mixed", "budget"])
def test_triton_pooled_steps_equal_each_sequence_alone(device, scenario, kernels, monkeypatch):  # noqa: F811
    """The pools on the kernel path (CUDA's; here Triton's interpreter): each pair one row of the kernel's tables,
    read in place up to its own length. Shorter, as the interpreter is slow."""
    monkeypatch.setattr(pool_module, "attention_paths", lambda device: ("blocks", "triton"))
    # the twins stepping alone stay on the PyTorch path (on CUDA they would take the kernel too): the pools' kernel
    # launches are then the only ones counted, and are checked against the reference
    monkeypatch.setattr(fg_cache, "attention_paths", lambda device: ("blocks", "torch"))
    launches = []
    for name in ("ragged_decode_rows", "ragged_group_probs_rows"):
        def counted(*args, fn=getattr(kernels, name), name=name, **kw):
            launches.append(name)
            return fn(*args, **kw)
        monkeypatch.setattr(kernels, name, counted)
    pool_steps = run_batch(device, scenario, monkeypatch, [(12, 0, 6), (31, 0, None), (20, 9, None), (25, 12, 24)], 30)
    assert launches.count("ragged_decode_rows") == pool_steps > 20, "one launch per pool and step"
    assert 0 < launches.count("ragged_group_probs_rows") <= pool_steps


def run_batch(device, scenario, monkeypatch, schedule, steps):
    """Run `schedule` ((prompt length, join step, leave step or None) per sequence) for `steps` steps through a
    FastGenBatch, checking every step against each sequence's twin stepping alone and against dense attention.
    Returns how many pool steps ran (pools per step, summed)."""
    cfg, mixes = SCENARIOS[scenario]
    if mixes is not None:
        forced = itertools.chain.from_iterable([m, m] for m in mixes)  # alone and pooled twins, in order
        monkeypatch.setattr(fg_cache, "choose_policies", lambda rec, threshold: list(next(forced)))
    g = torch.Generator().manual_seed(len(scenario))
    seqs = [Sequence(L0, cfg, g, device) for L0, _, _ in schedule]
    batch, running, rebuilt, pool_steps = FastGenBatch(N_HEADS, N_KV), [], 0, 0
    for step in range(steps):
        joined = [s for s, (_, at, _) in zip(seqs, schedule) if at == step]
        leaving = [s for s, (_, _, end) in zip(seqs, schedule) if end == step]
        for s in leaving:
            batch.release(s.pooled)
            assert all(st.pool is None and st.k is not None for st in s.pooled.stores)
            running.remove(s)
        running += joined
        if joined or leaving:
            batch.update([s.pooled for s in running])
            rebuilt += 1
        masks = [s.resident(s.pooled) for s in running]  # what each pair holds before the step
        q = torch.randn(len(running), N_HEADS, 1, HD, generator=g).to(device)
        n = [s.pooled.length for s in running]
        k = torch.stack([s.K[:, i : i + 1] for s, i in zip(running, n)])  # (B, n_kv_heads, 1, head_dim)
        v = torch.stack([s.V[:, i : i + 1] for s, i in zip(running, n)])
        for s, i in zip(running, n):
            for c in (s.alone, s.pooled):
                c.kinds.append([s.ids[i]])
        out = batch.attend(q, k, v)  # (B, n_heads, 1, head_dim)
        pool_steps += len(batch.pools)
        assert bool(batch.pools) == (len(running) > 1), "one sequence steps through its own stores"
        for b, (s, i, before) in enumerate(zip(running, n, masks)):
            want = s.alone.attend(q[b], k[b], v[b])
            torch.testing.assert_close(out[b], want, atol=1e-5, rtol=1e-5)
            visible = torch.cat([before, torch.ones(N_KV, 1, dtype=torch.bool, device=device)], dim=1)
            dense, _ = dense_attention(q[b], s.K[:, : i + 1], s.V[:, : i + 1],
                                       visible.repeat_interleave(N_HEADS // N_KV, dim=0)[:, None])
            torch.testing.assert_close(out[b], dense, atol=1e-5, rtol=1e-5)
            assert torch.equal(s.resident(s.pooled), s.resident(s.alone)), (scenario, step, b)
            assert [x.kept for x in s.pooled.stores] == [x.kept for x in s.alone.stores]
        if scenario != "budget":  # one pool of every head of every sequence in order: no gathers
            assert [p.in_order for p in batch.pools] == [scenario == "local+frequent"] * len(batch.pools)
        for pool in batch.pools:  # padded to the longest pair, but never past what its longest member may need
            longest = max(st.kept for st in pool.stores)
            assert pool.k.shape[1] <= min(max(st.most_rows for st in pool.stores),
                                          longest + 1 + pool.stores[0].block_rows(longest))
            assert pool.k.shape[0] == sum(st.kv_index.numel() for st in pool.stores)
    assert rebuilt == len({x for _, at, end in schedule for x in (at, end) if x is not None})
    assert len(running) == sum(end is None for _, _, end in schedule)
    pools = batch.pools
    assert pools, "the schedule ends with sequences in pools"
    alone = [sum(st.pool.own_bytes(st) for st in s.pooled.stores) for s in running]  # what `leave` reports
    for s, want in zip(running, alone):
        batch.release(s.pooled)
        assert s.pooled.nbytes() == want
    for s in seqs:  # every store got its rows back, as its twin holds them
        assert s.alone.kept_tokens() < s.alone.length * N_KV  # the caches evicted along the way
        for a, p in zip(s.alone.stores, s.pooled.stores):
            assert p.kept == a.kept and p.hole == a.hole and torch.equal(p.bitmap, a.bitmap)
            rows = list(range(a.kept + 1 if a.hole else a.kept))
            torch.testing.assert_close(p.k[:, rows], a.k[:, rows])
            assert torch.equal(p.pos[:, rows], a.pos[:, rows])
            if a.hole:
                assert torch.equal(p.free, a.free)
            assert p.k.shape[1] <= max(a.kept + 1, a.kept + p.block_rows(a.kept))
    assert all(p.kernel == (pool_module.attention_paths(device)[1] == "triton") for p in pools)
    batch.update([])
    assert batch.nbytes() == 0
    return pool_steps
