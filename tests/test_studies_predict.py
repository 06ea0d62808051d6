"""bench/studies/predict.py (a study): its per-layer analysis and summaries on hand-made attention maps, and a short
run on the real model. The recording it reads is tested in test_eval_recording.py."""
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_one_line_error
from test_eval_recording import causal_map

from bench.studies.predict import allocation_study, analyse, paper_kept
from bench.studies.predict_report import summarise
from tinygen.eval.recording import actual_recovery
from tinygen.fastgen.budget import MENU, option_recoveries
from tinygen.fastgen.policy import CANDIDATES, PUNCT, SPECIAL, FastGenConfig
from tinygen.fastgen.profile import ProfileStats, recoveries


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
    return subprocess.run([sys.executable, str(ROOT / "bench" / "studies" / "predict.py"), *map(str, args)], capture_output=True,
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
    # The same prompts recorded in this process: the generated rows' share of attention on generated tokens straight
    # from the recorded maps, and b-vs-c's correlation over every (prompt, layer, head, option but full) by
    # torch.corrcoef over this process's own analysis, must be what the run wrote.
    from tinygen.eval.prompts import load_prompts
    from tinygen.eval.recording import record
    from tinygen.eval.sweep import encode_prompts
    from tinygen.fastgen.kinds import vocab_kinds
    from tinygen.loader import load_model
    from tinygen.tokenizer import Tokenizer

    torch.set_num_threads(1)
    model = load_model(default_model_dir)
    tok = Tokenizer(default_model_dir, model.cfg.eos_token_ids)
    vocab = torch.tensor(vocab_kinds(tok), dtype=torch.uint8)
    shares, bs, cs = [], [], []
    for p in encode_prompts(tok, load_prompts(str(prompts))):
        caches, _ = record(model, p["ids"], 6, tok.eos_ids)
        L = len(p["ids"])
        gen = torch.stack([c.gen_attn() for c in caches])  # (layers, heads, rows, keys)
        shares.append(float((1 - gen[..., :L].sum(-1)).mean()))
        for c in caches:
            res = analyse(c.prompt_attn, c.gen_attn(), vocab[torch.tensor(p["ids"])], FastGenConfig(profile="paper"))
            bs.append(res["b"][:, :-1].flatten())
            cs.append(res["c"][:, :-1].flatten())
    assert S["gen_share"] == pytest.approx(sum(shares) / 2, abs=1e-6) and 0 < S["gen_share"] < 1
    r = float(torch.corrcoef(torch.stack([torch.cat(bs), torch.cat(cs)]).double())[0, 1])
    assert S["overall"]["b_vs_c"]["r"] == pytest.approx(r, abs=1e-5)
    assert len(data["per_head"]["c"]) == 30 and len(data["per_head"]["c"][0]) == 3
    assert "| f70 |" in (tmp_path / "out" / "eval_predict.md").read_text()
