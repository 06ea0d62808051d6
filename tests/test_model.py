"""The tiny random-config Llama against HF transformers on the same files, and cache consistency and growth."""
import pytest
import torch
from conftest import DEVICES, save_tiny_model

from tinygen.attention import causal_attention, dense_attention
from tinygen.cache import FullCache
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


def test_full_cache_grows_in_blocks_and_keeps_what_it_wrote():
    """The full cache allocates what is written plus one block of max(16, rows // 16) rows, grows by such a block
    when full, copies what it holds unchanged, and never allocates the whole max_len up front."""
    n_kv, head_dim, prompt, steps = 2, 4, 40, 600
    g = torch.Generator().manual_seed(6)
    k, v = (torch.randn(n_kv, prompt + steps, head_dim, generator=g) for _ in range(2))
    cache = FullCache(n_kv, head_dim, 10**8, torch.device("cpu"), torch.float32)
    cache.append(k[:, :prompt], v[:, :prompt])
    assert cache.k.shape[1] == prompt + 16 and cache.nbytes() == 2 * n_kv * (prompt + 16) * head_dim * 4
    capacities = set()
    for t in range(prompt, prompt + steps):
        keys, values = cache.append(k[:, t : t + 1], v[:, t : t + 1])
        length = t + 1
        assert length <= cache.k.shape[1] <= length + max(16, length // 16)
        assert torch.equal(keys, k[:, :length]) and torch.equal(values, v[:, :length])  # growth moved them intact
        capacities.add(cache.k.shape[1])
    assert len(capacities) <= steps // 16  # growth copies amortize: at most one per 16 steps
    assert cache.nbytes() == 2 * n_kv * cache.k.shape[1] * head_dim * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (9, 3)])
def test_full_cache_decode_matches_dense_attention(dtype, n_heads, n_kv):
    """The CPU decode step (SDPA for a float32 cache, the grouped matmuls for bfloat16) attends each query head to
    its KV head's every key, as softmax(q k^T / sqrt(d)) v written out with repeated K/V."""
    head_dim, prompt, steps = 16, 37, 20
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(h, prompt + steps, head_dim, generator=g).to(dtype) for h in (n_heads, n_kv, n_kv))
    cache = FullCache(n_kv, head_dim, prompt + steps, torch.device("cpu"), dtype)
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
    cache = FullCache(1, 4, 50, torch.device("cpu"), torch.float32)
    cache.append(torch.zeros(1, 45, 4), torch.zeros(1, 45, 4))
    assert cache.k.shape[1] == 50  # one block would pass max_len: capped
    cache.append(torch.zeros(1, 5, 4), torch.zeros(1, 5, 4))
    with pytest.raises(AssertionError, match="cache full: 50 \\+ 1 > 50"):
        cache.append(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))
