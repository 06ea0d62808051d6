"""tinygen.eval.recording (what the calibration measures): the recording cache against the full cache, kept sets and
actual recoveries against brute-force computations from the definitions."""
import pytest
import torch
from conftest import kept_set

from tinygen.eval.recording import RecordingCache, actual_recovery, kept_masks, record
from tinygen.fastgen.budget import MENU, option_recoveries, rank_key
from tinygen.generate import decode_step, full_caches, prefill


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from tinygen.loader import load_model

    torch.set_num_threads(1)
    return load_model(tiny_model_dir, "cpu", "float32")


def causal_map(heads, L, seed, rows=None):
    """Random causal attention (heads, rows or L, L) with peaked rows; generated rows when rows is given (row r sees
    keys 0..L-R+r, i.e. the prompt and the generated tokens up to itself)."""
    g = torch.Generator().manual_seed(seed)
    R = rows or L
    scores = torch.randn(heads, R, L, generator=g) * 3
    visible = torch.arange(L)[None, :] <= (L - R) + torch.arange(R)[:, None]
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)


def test_recording_cache_matches_the_full_cache(tiny):
    cfg = tiny.cfg
    prompt, steps = [1, 5, 9, 3, 17, 22, 40, 3, 8, 11, 60, 2], [7, 31, 3, 88, 12]
    max_len = len(prompt) + len(steps)
    rec = [RecordingCache(cfg.n_kv_heads, cfg.head_dim, max_len, "cpu", torch.float32) for _ in range(cfg.n_layers)]
    full = full_caches(tiny, max_len)
    torch.testing.assert_close(prefill(tiny, prompt, rec), prefill(tiny, prompt, full), atol=1e-4, rtol=1e-4)
    for i, t in enumerate(steps):
        pos = len(prompt) + i
        got = decode_step(tiny, torch.tensor([t]), rec, pos)
        torch.testing.assert_close(got, decode_step(tiny, torch.tensor([t]), full, pos), atol=1e-4, rtol=1e-4)
    L, R = len(prompt), len(steps)
    for c in rec:
        assert c.prompt_attn.shape == (cfg.n_kv_heads, L, L) and len(c.gen_rows) == R
        assert c.kept_tokens() == max_len * cfg.n_kv_heads and c.nbytes() > 0
        torch.testing.assert_close(c.prompt_attn.sum(-1), torch.ones(cfg.n_kv_heads, L))
        assert torch.all(c.prompt_attn.triu(diagonal=1) == 0)  # causal
        gen = c.gen_attn()
        assert gen.shape == (cfg.n_kv_heads, R, L + R)
        torch.testing.assert_close(gen.sum(-1), torch.ones(cfg.n_kv_heads, R))
        for r in range(R):
            assert torch.all(gen[:, r, L + r + 1 :] == 0) and torch.all(gen[:, r, L + r] > 0)
    # record() runs the same greedy loop: its tokens are the full cache's argmax chain
    caches, out = record(tiny, prompt, 4)
    full = full_caches(tiny, len(prompt) + 4)
    logits, ref = prefill(tiny, prompt, full), []
    for i in range(4):
        ref.append(int(logits.argmax()))
        logits = decode_step(tiny, torch.tensor(ref[-1:]), full, len(prompt) + i)
    assert out == ref and len(caches[0].gen_rows) == 4  # the last token's row is recorded too


@pytest.mark.parametrize("L,obs", [(23, 8), (40, 32), (9, 32)])
def test_kept_masks_match_definitions_and_option_recoveries(L, obs):
    attn = causal_map(3, L, seed=L)
    start = max(0, L - obs)
    o = attn[:, start:].sum(1)
    key = rank_key(o, start)
    key[1, 2] = key[1, 5]  # a tie: the earlier position goes first
    masks = kept_masks(key, MENU)
    for h in range(3):
        for i, opt in enumerate(MENU):
            assert torch.equal(masks[h, i], kept_set(opt, key[h], L)), (h, opt.label)
    # the recovery option_recoveries predicts is the observation attention on exactly these sets
    key = rank_key(o, start)
    masks = kept_masks(key, MENU)
    pred = option_recoveries(o, start, MENU)
    torch.testing.assert_close(pred, (o[:, None, :] * masks).sum(-1) / (L - start))


def test_actual_recovery_brute_force():
    L, R, heads = 14, 5, 2
    gen = causal_map(heads, L + R, seed=3, rows=R)  # rows at positions L..L+R-1
    keep = torch.rand(heads, 4, L, generator=torch.Generator().manual_seed(1)) < 0.4
    keep[:, 0] = False  # keeps nothing of the prompt: c is then the mass on generated tokens, c' zero
    keep[:, 1] = True  # keeps the whole prompt: c = 1, c' = 1
    c, cp = actual_recovery(gen, L, keep)
    for h in range(heads):
        for o in range(4):
            tot_c = tot_cp = 0.0
            for r in range(R):
                prompt_mass = sum(float(gen[h, r, j]) for j in range(L))
                kept = sum(float(gen[h, r, j]) for j in range(L) if keep[h, o, j])
                generated = sum(float(gen[h, r, j]) for j in range(L, L + r + 1))
                tot_c += kept + generated
                tot_cp += kept / prompt_mass
            assert float(c[h, o]) == pytest.approx(tot_c / R, abs=1e-6)
            assert float(cp[h, o]) == pytest.approx(tot_cp / R, abs=1e-6)
    torch.testing.assert_close(c[:, 1], torch.ones(heads))
    torch.testing.assert_close(cp[:, 0], torch.zeros(heads))
