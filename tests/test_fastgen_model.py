"""FastGen on the real default model: the all-full store is the full cache; auto really holds fewer bytes."""
import pytest
import torch
from conftest import EVAL

from tinygen.cache import full_kv_bytes
from tinygen.cache import kept_fraction
from tinygen.fastgen.cache import fastgen_caches
from tinygen.fastgen.kinds import TokenKinds, vocab_kinds
from tinygen.fastgen.policy import FREQUENT, FastGenConfig
from tinygen.generate import decode_step, full_caches, generate, prefill
from tinygen.loader import load_model
from tinygen.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engine(default_model_dir):
    model = load_model(default_model_dir)
    return model, Tokenizer(default_model_dir, model.cfg.eos_token_ids)


def book_prompt(tok, n):
    text = (EVAL / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    start = text.index("It is a truth universally acknowledged")
    return tok.encode(text[start : start + 8 * n])[:n]


def run_steps(model, ids, caches, on_tokens, steps):
    """Greedy prefill + decode, returning every step's logits."""
    if on_tokens:
        on_tokens(ids)
    logits = [prefill(model, ids, caches)]
    for i in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        if on_tokens:
            on_tokens([int(token)])
        logits.append(decode_step(model, token, caches, len(ids) + i))
    return torch.stack(logits)


def test_all_full_store_is_the_full_cache(engine):
    model, tok = engine
    ids = book_prompt(tok, 120)
    kinds = TokenKinds(vocab_kinds(tok), 160, torch.device("cpu"))
    store = run_steps(model, ids, fastgen_caches(model, kinds, FastGenConfig(policy="full"), 160), kinds.append, 30)
    full = run_steps(model, ids, full_caches(model, 160), None, 30)
    # prefill: block-wise attention vs the fused kernel differ by float rounding; decode steps run the same ops
    torch.testing.assert_close(store, full, atol=1e-4, rtol=0)
    assert torch.equal(store.argmax(-1), full.argmax(-1))


def test_auto_holds_fewer_physical_bytes_in_line_with_kept_fraction(engine):
    model, tok = engine
    ids = book_prompt(tok, 600)
    max_len = len(ids) + 40
    kinds = TokenKinds(vocab_kinds(tok), max_len, torch.device("cpu"))
    caches = fastgen_caches(model, kinds, FastGenConfig(policy="auto"), max_len)
    out = list(generate(model, ids, caches, 40, ignore_eos=True, on_tokens=kinds.append))
    assert len(out) == 40
    length = caches[0].length
    full = full_kv_bytes(model.cfg.n_layers, model.cfg.n_kv_heads, model.cfg.head_dim, length, torch.float32)
    kept = kept_fraction(caches)
    held = sum(c.nbytes() for c in caches)
    pool = caches[0].pool
    assert held == pool.used_blocks() * pool.block_bytes()  # the pool's blocks in use: its only sequence's
    # each row holds the blocks of its kept slots and of the next token's: per slot K, V, position, flag, score
    slot_bytes, bs = 2 * model.cfg.head_dim * 4 + 4 + 1 + 4, pool.block_size
    assert pool.block_bytes() == bs * slot_bytes == pool.k[0].nbytes + pool.v[0].nbytes + pool.pos[0].nbytes + \
        pool.prot[0].nbytes + pool.score[0].nbytes
    kept_bytes = sum(len(s.kv_heads) * s.kept * slot_bytes for c in caches for s in c.stores)
    slack = sum(len(s.kv_heads) * bs * slot_bytes for c in caches for s in c.stores)
    assert kept < 0.9, "auto should compress real prose"
    assert kept_bytes <= held <= kept_bytes + slack
    assert held < full
    assert held <= full * (kept + 0.1)
