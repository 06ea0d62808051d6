"""The paged KV pool (tinygen/kvpool.py) and the batch's decode step through it (tinygen/paged.py) on synthetic
tensors: sequences of different lengths and policies (full, the paper's mixes with special/punct-only heads, the
budget profile, fixed policies, and a batch mixing them) join and leave; every step must give each sequence what its
caches give it stepping alone (a batch of one in a pool of its own) and what dense attention over exactly the tokens
each row's bitmap holds gives; blocks are owned by one row at most and come back when a sequence leaves; the pool's
byte figures are its tensors' storage. The same harness runs the batch through the Triton paged kernel (under
Triton's interpreter on the CPU), its sequences alone through the PyTorch path."""
import itertools

import pytest
import torch
from conftest import DEVICES, decode_one

import tinygen.fastgen.cache as fg_cache
from tinygen.attention import dense_attention
from test_triton_paged import kernels  # noqa: F401  (a fixture: the kernel module under the interpreter)
from tinygen.cache import FullRows, storage_bytes
from tinygen.fastgen.cache import FastGenCache
from tinygen.fastgen.kinds import TokenKinds
from tinygen.fastgen.policy import FREQUENT, FULL, LOCAL, PUNCT, SPECIAL, FastGenConfig
from tinygen.kvpool import KVPool, PoolFull
from tinygen.paged import PagedBatch

N_HEADS, N_KV, HD = 8, 4, 8
VOCAB = [SPECIAL if i < 3 else PUNCT if i < 10 else 0 for i in range(50)]  # ids 0-2 special, 3-9 punctuation
SP, SPF, SPFL = SPECIAL | PUNCT, SPECIAL | PUNCT | FREQUENT, SPECIAL | PUNCT | FREQUENT | LOCAL
MAX_LEN, BLOCK = 120, 4
# (prompt length, step it joins, step it leaves (None: runs to the end)): different lengths, an early leave whose
# blocks the late joins take, and the longest sequence leaving first
SEQS = [(12, 0, 8), (31, 0, None), (20, 15, None), (25, 20, 50), (70, 25, 40)]
STEPS = 70
PAPER = FastGenConfig(profile="paper", local_ratio=0.2, frequent_ratio=0.25)
MIXES = [[SPECIAL, SP, SPF, SPFL], [FULL, SPFL, SP, LOCAL], [FREQUENT, LOCAL | FREQUENT, SPF, SPECIAL],
         [SPFL, SPFL, FREQUENT, FULL], [FULL, SPECIAL, SPF, LOCAL | FREQUENT]]
SCENARIOS = {  # per sequence, its config (None: the full cache)
    "full": [None] * 5,
    "paper-mixed": [PAPER] * 5,  # each sequence its own mix of policies (forced below)
    "local+frequent": [FastGenConfig("local+frequent", local_ratio=0.15, frequent_ratio=0.3)] * 5,
    "budget": [FastGenConfig(kv_budget=0.5, observation=8)] * 5,
    "all-kinds": [None, PAPER, FastGenConfig(kv_budget=0.5, observation=8), FastGenConfig("special+punct"), PAPER],
}


class Sequence:
    """One sequence twice: caches that step alone (a batch of one, its own pool, the PyTorch path) and rows in the
    shared pool, with the same prompt, kinds and new tokens, and its dense K/V history."""

    def __init__(self, L0, cfg, g, dev, paged: PagedBatch, slot: int):
        self.cfg, self.slot = cfg, slot
        self.ids = torch.randint(0, 50, (MAX_LEN,), generator=g).tolist()
        self.K, self.V = torch.randn(2, N_KV, MAX_LEN, HD, generator=g).to(dev)
        q = torch.randn(N_HEADS, L0, HD, generator=g).to(dev)
        pool = KVPool(4, BLOCK, HD, N_KV, MAX_LEN, torch.device(dev), torch.float32, growable=True)
        lone = PagedBatch(pool, 1, N_HEADS, N_KV, kernel=False)
        if cfg is None:
            self.alone, self.pooled = FullRows(lone, 0, 0, N_KV), FullRows(paged, slot, 0, N_KV)
        else:
            self.alone, self.pooled = [FastGenCache(b, i, 0, N_HEADS, N_KV,
                                                    TokenKinds(VOCAB, MAX_LEN, torch.device(dev)), cfg)
                                       for b, i in ((lone, 0), (paged, slot))]
        lone.set_batch([(0, [self.alone])])
        for c in (self.alone, self.pooled):
            if cfg is not None:
                c.kinds.append(self.ids[:L0])
            c.attend(q, self.K[:, :L0], self.V[:, :L0])  # the pooled one straight into the shared pool
        if cfg is not None:
            assert self.alone.policies == self.pooled.policies

    def resident_alone(self):
        c = self.alone
        return c.pool.resident_mask(torch.tensor(c.rows(), device=self.K.device), c.length)

    def resident_pooled(self, paged):
        rows = torch.tensor([paged.row(self.slot, 0, h) for h in range(N_KV)], device=self.K.device)
        return paged.pool.resident_mask(rows, self.pooled.length)

    def kept(self, cache):
        return [s.kept for s in cache.stores]


def pool_bytes(pool: KVPool) -> int:
    return storage_bytes(pool.k, pool.v, pool.pos, pool.prot, pool.score, pool.tables, pool.bitmap, *pool.row_state())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_paged_steps_equal_each_sequence_alone(device, scenario, monkeypatch):
    run_scenario(device, scenario, monkeypatch, kernel=False)


def test_the_kernel_path_equals_each_sequence_alone(kernels, monkeypatch):  # noqa: F811
    """The batch attends through the Triton paged kernel and its score update (on CUDA, or under the interpreter
    on the CPU): the same answers, residency and kept counts as each sequence alone on the PyTorch path, for a
    batch holding every kind (a full cache, paper mixes, the budget profile, special+punct)."""
    run_scenario("cuda" if torch.cuda.is_available() else "cpu", "all-kinds", monkeypatch, kernel=True)


def run_scenario(device, scenario, monkeypatch, kernel: bool):
    forced = itertools.chain.from_iterable([m, m] for m in MIXES)  # alone and pooled twins, in order
    monkeypatch.setattr(fg_cache, "choose_policies", lambda rec, threshold: list(next(forced)))
    g = torch.Generator().manual_seed(len(scenario))
    # blocks for about 3 sequences at full length: the late joins take the blocks of those that left
    pool = KVPool(3 * N_KV * (MAX_LEN // BLOCK), BLOCK, HD, 4 * N_KV, MAX_LEN, torch.device(device), torch.float32)
    paged = PagedBatch(pool, 1, N_HEADS, N_KV, kernel=kernel)
    assert pool.nbytes() == pool_bytes(pool)
    free_slots, running, seqs = [3, 2, 1, 0], [], {}
    for step in range(STEPS):
        for i, (L0, at, end) in enumerate(SEQS):
            if end == step:
                s = seqs.pop(i)
                pool.release(paged.slot_rows(s.slot))
                free_slots.append(s.slot)
                running.remove(s)
            if at == step:
                seqs[i] = Sequence(L0, SCENARIOS[scenario][i], g, device, paged, free_slots.pop())
                running.append(seqs[i])
        pool.check()
        for s in running:
            paged.reserve([s.pooled])
        pool.check()
        held = sum(len(pool.blocks[r]) for s in running for r in paged.slot_rows(s.slot))
        assert pool.used_blocks() == held and held + len(pool.free) == pool.n_blocks
        for s in running:  # a row holds the blocks its kept tokens and the new one need, no more
            for st in s.pooled.stores:
                for h in st.kv_heads:
                    assert len(pool.blocks[paged.row(s.slot, 0, h)]) == -(-(st.kept + 1) // BLOCK)
        paged.set_batch([(s.slot, [s.pooled]) for s in running])
        masks = [s.resident_pooled(paged) for s in running]  # what each row holds before the step
        q = torch.randn(len(running), N_HEADS, 1, HD, generator=g).to(device)
        n = [s.pooled.length for s in running]
        k = torch.stack([s.K[:, i : i + 1] for s, i in zip(running, n)])  # (B, n_kv_heads, 1, head_dim)
        v = torch.stack([s.V[:, i : i + 1] for s, i in zip(running, n)])
        for s, i in zip(running, n):
            if s.cfg is not None:
                for c in (s.alone, s.pooled):
                    c.kinds.append([s.ids[i]])
        paged.begin_layers([s.ids[i] for s, i in zip(running, n)], n)
        out = paged.attend_layer(0, q, k, v)  # (B, n_heads, 1, head_dim)
        for b, (s, i, before) in enumerate(zip(running, n, masks)):
            assert torch.equal(before, s.resident_alone()), (scenario, step, b)
            want = decode_one(s.alone, s.ids[i], q[b], k[b], v[b])
            torch.testing.assert_close(out[b], want, atol=1e-5, rtol=1e-5)
            visible = torch.cat([before, torch.ones(N_KV, 1, dtype=torch.bool, device=device)], dim=1)
            dense, _ = dense_attention(q[b], s.K[:, : i + 1], s.V[:, : i + 1],
                                       visible.repeat_interleave(N_HEADS // N_KV, dim=0)[:, None])
            torch.testing.assert_close(out[b], dense, atol=1e-5, rtol=1e-5)
            assert s.pooled.length == s.alone.length and s.kept(s.pooled) == s.kept(s.alone)
            assert torch.equal(s.resident_pooled(paged), s.resident_alone()), (scenario, step, b)
            assert s.resident_pooled(paged).sum().item() == sum(
                k * len(st.kv_heads) for k, st in zip(s.kept(s.pooled), s.pooled.stores))  # popcount = kept
        assert pool.nbytes() == pool_bytes(pool)  # allocated once: the figure never moves
    if scenario != "full":
        assert any(s.alone.kept_tokens() < s.alone.length * N_KV for s in running), "the caches evicted"
    for s in running:
        pool.release(paged.slot_rows(s.slot))
    pool.check()
    assert pool.used_blocks() == 0 and sorted(pool.free) == list(range(1, pool.n_blocks + 1))


def test_pool_full_leaves_rows_consistent():
    """Reserving past the free list raises PoolFull having given what it could; the rows stay owned and come back."""
    pool = KVPool(5, 4, HD, 3, 40, torch.device("cpu"), torch.float32)
    pool.reserve([0, 1], 8)  # 2 blocks each
    with pytest.raises(PoolFull):
        pool.reserve([2], 12)
    pool.check()
    assert len(pool.blocks[2]) == 1 and pool.free == []
    pool.release([0, 2])
    pool.check()
    assert len(pool.free) == 3 and pool.used_blocks() == 2
    pool.reserve([2], 12)
    pool.check()
    assert pool.tables[2, :3].tolist() == pool.blocks[2] and 0 not in pool.blocks[2]  # the null block is nobody's


def test_a_sequences_caches_bytes_are_the_blocks_its_rows_hold():
    """What a sequence's caches report (nbytes) is the pool blocks its rows hold: a full sequence's and a FastGen
    one's sum to the pool's blocks in use, and a budget of 0.5 holds about half as many."""
    g = torch.Generator().manual_seed(0)
    pool = KVPool(96, BLOCK, HD, 2 * N_KV, MAX_LEN, torch.device("cpu"), torch.float32)  # both prompts whole
    paged = PagedBatch(pool, 1, N_HEADS, N_KV)
    full = Sequence(40, None, g, "cpu", paged, 0)
    auto = Sequence(40, FastGenConfig(kv_budget=0.5, observation=8), g, "cpu", paged, 1)
    assert full.pooled.nbytes() == N_KV * 10 * pool.block_bytes()  # 40 tokens: 10 blocks of 4 per row
    assert auto.pooled.nbytes() == N_KV * 5 * pool.block_bytes()  # 20 kept: the prompt's other blocks given back
    assert full.pooled.nbytes() + auto.pooled.nbytes() == pool.used_blocks() * pool.block_bytes()
