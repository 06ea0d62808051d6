"""The tiny random-config Llama against HF transformers on the same files, and cache consistency and growth."""
import pytest
import torch
from conftest import DEVICES, save_tiny_model

from tinygen.attention import causal_attention, dense_attention
from tinygen.cache import FullRows
from tinygen.kvpool import KVPool
from tinygen.paged import PagedBatch
from tinygen.generate import full_caches
from tinygen.loader import load_model

LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)
VARIANTS = {
    "gqa-untied": {},
    "gqa-tied": dict(tie_word_embeddings=True),
    "mha": dict(num_key_value_heads=4),
    "llama3-rope": dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_hf(tmp_path, variant):
    hf = save_tiny_model(tmp_path, **VARIANTS[variant])
    model = load_model(tmp_path)
    tokens = torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(1))  # past the 32-token rope boundary
    with torch.no_grad():
        expected = hf(tokens[None]).logits[0]
        got = model(tokens, full_caches(model, 150), start_pos=0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    hf = save_tiny_model(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a, b = load_model(tmp_path / "one"), load_model(tmp_path / "sharded")
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_then_decode_equals_one_forward(tiny_model_dir, device):
    model = load_model(tiny_model_dir, device=device)
    tokens = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        whole = model(tokens, full_caches(model, 40), start_pos=0)
        caches = full_caches(model, 40)
        parts = [model(tokens[:10], caches, start_pos=0)]  # prefill
        parts.append(model(tokens[10:25], caches, start_pos=10))  # a second chunk after earlier tokens
        parts += [model(tokens[i : i + 1], caches, start_pos=i) for i in range(25, 40)]  # decode steps
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_close_to_float32(tiny_model_dir, device):
    tokens = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(3)).to(device)
    ref = load_model(tiny_model_dir, device=device)
    with torch.no_grad():
        expected = ref(tokens, full_caches(ref, 30), 0)
        for dtype in ("bfloat16", "float16"):
            model = load_model(tiny_model_dir, device=device, dtype=dtype)
            assert model.embed.weight.dtype == getattr(torch, dtype)
            got = model(tokens, full_caches(model, 30), 0)
            assert (got - expected).abs().max() < 0.1 * expected.abs().max()


def test_dense_reference_attention_equals_fast_path():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(h, 12, 16, generator=g) for h in (4, 2, 2))
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    out, probs = dense_attention(q, k, v, causal)
    fast = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, fast, atol=1e-5, rtol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 12))
    assert probs[:, 0, 1:].abs().max() == 0  # row 0 sees only itself


@pytest.mark.parametrize("start,T,rows", [(0, 50, 16), (0, 50, 128), (13, 37, 16)])
def test_blockwise_causal_attention_equals_dense(start, T, rows):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(6, T, 16, generator=g)
    k, v = torch.randn(2, start + T, 16, generator=g), torch.randn(2, start + T, 16, generator=g)
    seen = []
    out = causal_attention(q, k, v, start, on_block=lambda p, r0: seen.append((r0, tuple(p.shape))),
                           max_block_rows=rows)
    visible = torch.ones(T, start + T, dtype=torch.bool).tril(diagonal=start)
    expected, _ = dense_attention(q, k, v, visible)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    block = max(16, rows)
    assert [r0 for r0, _ in seen] == list(range(0, T, block))
    assert all(shape[3] == start + min(T, r0 + block) for r0, shape in seen)  # a block sees keys up to its last row


def full_rows(n_kv: int, head_dim: int, max_len: int, dtype=torch.float32, first_blocks: int | None = None, n_heads=None):
    """One layer's full cache for a sequence on its own: a batch of one in a pool of `first_blocks` blocks (default:
    room for max_len tokens) that doubles when they run out."""
    first_blocks = first_blocks or n_kv * -(-(max_len + 1) // 16)
    pool = KVPool(first_blocks, 16, head_dim, n_kv, max_len, torch.device("cpu"), dtype, growable=True)
    paged = PagedBatch(pool, 1, n_heads or n_kv, n_kv)
    cache = FullRows(paged, 0, 0, n_kv)
    paged.set_batch([(0, [cache])])
    return cache


def test_full_cache_holds_blocks_of_what_it_wrote():
    """The full cache's rows hold ceil(length / 16) blocks each (the next token's slot at most one more); the pool
    of a sequence on its own doubles when its blocks run out, moving what it holds unchanged (block ids and tables
    stay), log2 times, never allocating max_len up front. K/V read back through the tables are what was written."""
    n_kv, head_dim, prompt, steps = 2, 4, 40, 600
    g = torch.Generator().manual_seed(6)
    q = torch.randn(n_kv, prompt + steps, head_dim, generator=g)
    k, v = (torch.randn(n_kv, prompt + steps, head_dim, generator=g) for _ in range(2))
    cache = full_rows(n_kv, head_dim, 10**5, first_blocks=8)
    pool = cache.pool
    cache.attend(q[:, :prompt], k[:, :prompt], v[:, :prompt])
    assert cache.nbytes() == n_kv * 3 * pool.block_bytes() and pool.n_blocks == 8
    sizes = {pool.n_blocks}
    for t in range(prompt, prompt + steps):
        cache.attend(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1])
        length = t + 1
        assert all(-(-length // 16) <= len(pool.blocks[r]) <= -(-(length + 1) // 16) for r in cache.rows())
        sizes.add(pool.n_blocks)
    keys, values, _ = pool.gather(torch.tensor(cache.rows()), length)
    assert torch.equal(keys[:, :length], k) and torch.equal(values[:, :length], v)  # growth moved them intact
    assert sorted(sizes) == [8, 16, 32, 64, 128]  # doubling: 2 x 640 / 16 = 80 blocks needed
    assert cache.nbytes() == n_kv * -(-length // 16) * pool.block_bytes()
    pool.check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (9, 3)])
def test_full_cache_decode_matches_dense_attention(dtype, n_heads, n_kv):
    """The CPU decode step (the batch's gather through the block tables and masked matmuls) attends each query head
    to its KV head's every key, as softmax(q k^T / sqrt(d)) v written out with repeated K/V."""
    head_dim, prompt, steps = 16, 37, 20
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(h, prompt + steps, head_dim, generator=g).to(dtype) for h in (n_heads, n_kv, n_kv))
    cache = full_rows(n_kv, head_dim, prompt + steps, dtype, n_heads=n_heads)
    cache.attend(q[:, :prompt], k[:, :prompt], v[:, :prompt])
    for t in range(prompt, prompt + steps):
        got = cache.attend(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1])  # (n_heads, 1, head_dim)
        kr, vr = (x[:, : t + 1].float().repeat_interleave(n_heads // n_kv, dim=0) for x in (k, v))
        probs = torch.softmax(q[:, t : t + 1].float() @ kr.transpose(1, 2) / head_dim**0.5, dim=-1)
        want = probs @ vr
        assert got.dtype == dtype and got.shape == (n_heads, 1, head_dim)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_full_cache_stops_at_max_len():
    cache = full_rows(1, 4, 50)
    cache.attend(torch.zeros(1, 45, 4), torch.zeros(1, 45, 4), torch.zeros(1, 45, 4))
    cache.attend(torch.zeros(1, 5, 4), torch.zeros(1, 5, 4), torch.zeros(1, 5, 4))
    with pytest.raises(AssertionError, match="cache full: 50 \\+ 1 > 50"):
        cache.attend(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))
