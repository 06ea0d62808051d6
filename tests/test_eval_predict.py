"""tinygen.eval.predict: the recording cache against the full cache, kept sets and actual recoveries against
brute-force computations from the definitions, and a short run on the real model."""
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_one_line_error, kept_set

from tinygen.eval.predict import RecordingCache, actual_recovery, allocation_study, analyse, kept_masks, paper_kept, record
from tinygen.eval.predict_report import summarise
from tinygen.fastgen.budget import MENU, option_recoveries, rank_key
from tinygen.fastgen.policy import CANDIDATES, PUNCT, SPECIAL, FastGenConfig
from tinygen.fastgen.profile import ProfileStats, recoveries
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


def test_analyse_on_a_small_case():
    """analyse(): (a), (b), (c) of every option, and the paper candidates' predicted and actual recoveries."""
    L, R, heads = 40, 6, 3
    prompt = causal_map(heads, L, seed=7)
    gen = causal_map(heads, L + R, seed=8, rows=R)
    kinds = torch.zeros(L, dtype=torch.uint8)
    kinds[0], kinds[[5, 17, 30]] = SPECIAL, PUNCT
    cfg = FastGenConfig(profile="paper", local_ratio=0.3, frequent_ratio=0.3)
    res = analyse(prompt, gen, kinds, cfg)
    torch.testing.assert_close(res["a"], option_recoveries(prompt.sum(1), 0))
    torch.testing.assert_close(res["b"], option_recoveries(prompt[:, L - 32 :].sum(1), L - 32))
    # (c) of f20 for head 1, from scratch: the 8 keys ranked highest by mean observation attention
    i = [o.label for o in MENU].index("f20")
    o = prompt[1, L - 32 :].sum(0)
    mean = [float(o[j]) / (L - max(j, L - 32)) for j in range(L)]
    top = sorted(range(L), key=lambda j: (-mean[j], j))[:8]
    want = sum(float(gen[1, r, top].sum()) + float(gen[1, r, L:].sum()) for r in range(R)) / R
    assert float(res["c"][1, i]) == pytest.approx(want, abs=1e-6)
    assert torch.all(res["c"][:, -1] == 1)  # full
    # paper candidates: predicted = profile.recoveries; fixed sets recover colsum / L on the prompt
    stats = ProfileStats(heads, L, 12, torch.device("cpu"))
    stats.add(prompt, 0)
    torch.testing.assert_close(res["paper_pred"], recoveries(stats, kinds, cfg))
    keep = paper_kept(stats.colsum, kinds, cfg)
    assert torch.equal(keep[:, 0], (kinds == SPECIAL).expand(heads, L))
    assert torch.equal(keep[:, 1], (kinds != 0).expand(heads, L))
    assert torch.all(keep[:, 2].sum(-1) == 4 + 12) and torch.all(keep[:, 2, kinds != 0])
    assert torch.all(keep[:, 3, L - 12 :]) and torch.all(keep[:, 4])
    torch.testing.assert_close(res["paper_pred"][:, :2], (prompt.sum(1)[:, None] * keep[:, :2]).sum(-1) / L)
    torch.testing.assert_close(res["paper_c"], actual_recovery(gen, L, keep)[0])
    torch.testing.assert_close(res["gen_share"], gen[:, :, L:].sum(-1).mean(1))
    assert len(CANDIDATES) == res["paper_pred"].shape[1]


def test_summaries_run_on_synthetic_layers():
    L, R, heads, layers = 36, 4, 3, 2
    cfg = FastGenConfig(profile="paper")
    kinds = torch.zeros(L, dtype=torch.uint8)
    per = []
    for p in range(2):
        res = [analyse(causal_map(heads, L, seed=10 * p + l), causal_map(heads, L + R, seed=99 + 10 * p + l, rows=R),
                       kinds, cfg) for l in range(layers)]
        res = {k: torch.stack([x[k] for x in res]) for k in res[0]}
        res["alloc"] = allocation_study(res["b"].reshape(-1, len(MENU)), res["c"].reshape(-1, len(MENU)), L, MENU)
        per.append(res)
    S = summarise(per, MENU, layers, heads)
    assert S["prompts"] == 2 and len(S["by_layer"]) == layers and len(S["by_option"]) == len(MENU) - 1
    f70 = S["allocation"]["f70"]
    assert f70["kept"] == pytest.approx(math.ceil(0.7 * L) / L)
    for name in ("budget", "budget_floor0.5", "oracle"):
        assert S["allocation"][name]["kept"] <= 0.7 + 1e-9
    # the oracle maximises the actual recovery at the budget: never below the uniform f70 at equal or lower cost
    assert S["allocation"]["oracle"]["mean_actual"] >= f70["mean_actual"] - 0.02
    json.dumps(S)  # JSON-ready


def run_predict(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "tinygen.eval.predict", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_bad_input_is_one_line(tmp_path):
    for args, fragment in [(["--prompts", tmp_path / "missing.jsonl"], "cannot read"),
                           (["--prompts", "x", "--limit", "0"], "--limit"), ([], "--prompts")]:
        assert_one_line_error(run_predict(*args), fragment)


def test_end_to_end_on_the_real_model(default_model_dir, tmp_path):
    prompts = tmp_path / "two.jsonl"
    prompts.write_text('{"turns": ["Name a colour."]}\n{"instruction": "Say hello."}\n')
    r = run_predict("--prompts", prompts, "--max-new-tokens", 6, "--threads", 1, "--out", tmp_path / "out",
                    "--model", default_model_dir, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "out" / "eval_predict.json").read_text())
    S = data["summary"]
    assert S["prompts"] == 2 and len(S["by_layer"]) == 30 and data["max_new_tokens"] == 6
    assert 0 <= S["gen_share"] <= 1 and -1 <= S["overall"]["b_vs_c"]["r"] <= 1
    assert len(data["per_head"]["c"]) == 30 and len(data["per_head"]["c"][0]) == 3
    assert "| f70 |" in (tmp_path / "out" / "eval_predict.md").read_text()
