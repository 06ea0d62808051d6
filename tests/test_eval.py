"""tinygen.eval: fidelity metrics on constructed distributions, teacher forcing, the sink+window baseline cache,
budget matching, prompt files and bad input, and a short end-to-end run on the real model."""
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_one_line_error

import tinygen.eval.runner as runner
from tinygen.attention import dense_attention
from tinygen.eval.methods import FIXED, Method, match_ratio, predicted_kept, with_ratio
from tinygen.eval.metrics import first_departure, step_metrics, summarize
from tinygen.eval.prompts import load_prompts
from tinygen.eval.runner import evaluate, reference_run, teacher_forced
from tinygen.eval.sinks import SinkWindowCache, sink_window_kept
from tinygen.errors import TinygenError
from tinygen.generate import decode_step


class FakeTok:
    """Enough of a tokenizer for the tiny random model: token 1 special, token 3 punctuation."""
    vocab_size, special_ids, eos_ids = 97, frozenset({1}), frozenset()

    def token_text(self, i):
        return "." if i == 3 else "a"


class Spy:
    """Wraps a model and records every token id it is fed."""

    def __init__(self, model):
        self.model, self.embed, self.cfg, self.fed = model, model.embed, model.cfg, []

    def __call__(self, tokens, caches, start_pos, last_only=False, on_layer=None):
        assert start_pos == len(self.fed), "positions must follow the tokens fed"
        self.fed += tokens.tolist()
        return self.model(tokens, caches, start_pos, last_only, on_layer)

    def decode_step(self, model, token, caches, pos):  # stands in for generate.decode_step (the batch's step)
        if model is not self:
            return decode_step(model, token, caches, pos)
        assert pos == len(self.fed), "positions must follow the tokens fed"
        self.fed += token.tolist()
        return decode_step(self.model, token, caches, pos)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from tinygen.loader import load_model

    torch.set_num_threads(1)
    return load_model(tiny_model_dir, "cpu", "float32")


def logp(*rows):
    return torch.tensor(rows, dtype=torch.float64).log()


def test_identical_distributions_agree_with_zero_kl():
    ref = torch.log_softmax(torch.randn(5, 11, generator=torch.Generator().manual_seed(0)), -1)
    m = step_metrics(ref, ref.clone(), [0, 1, 2, 3, 4])
    assert m["agree"] == [1.0] * 5
    assert max(m["kl"]) == pytest.approx(0.0, abs=1e-12)
    assert m["ll"] == m["ll_full"]


def test_kl_and_log_likelihood_by_hand():
    p, q = logp([0.5, 0.5, 0.0]), logp([0.25, 0.75, 0.0])
    m = step_metrics(p, q, [0])
    assert m["kl"][0] == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
    assert m["ll_full"][0] == pytest.approx(math.log(0.5)) and m["ll"][0] == pytest.approx(math.log(0.25))
    assert m["agree"] == [0.0]  # argmax 0 (first of a tie) against 1
    # p has a zero where q does not: that term is 0, not nan
    m = step_metrics(logp([1.0, 0.0]), logp([0.5, 0.5]), [0])
    assert m["kl"][0] == pytest.approx(math.log(2)) and m["agree"] == [1.0]


def test_first_departure_and_summary():
    assert first_departure([1, 2, 3], [1, 2, 3]) is None
    assert first_departure([1, 2, 3], [1, 5, 3]) == 1
    assert first_departure([1, 2, 3], [1, 2]) == 2
    recs = [dict(steps=4, agreement=a, kl=0.1, ll_full=-1.0, ll=-1.5, kept_fraction=0.5, kv_bytes=10,
                 kv_bytes_full=20, first_departure=d) for a, d in ((1.0, None), (0.5, 1), (0.75, 3))]
    s = summarize(recs)
    assert s["agreement"]["mean"] == pytest.approx(0.75) and s["agreement"]["median"] == 0.75
    assert s["never_departs"] == pytest.approx(1 / 3) and s["first_departure"]["median"] == 3
    assert s["ll_drop"]["mean"] == pytest.approx(0.5)


def test_teacher_forcing_feeds_exactly_the_reference(tiny, monkeypatch):
    prompt = [1, 5, 9, 3, 14, 22, 3, 7, 8, 40, 41, 42]
    ref = reference_run(tiny, prompt, 10, frozenset())
    assert len(ref.targets) == 10 and ref.logprobs.shape == (10, 97)
    spy, fed_kinds = Spy(tiny), []
    monkeypatch.setattr(runner, "decode_step", spy.decode_step)
    method = Method("local+frequent", local_ratio=0.2, frequent_ratio=0.2)
    from tinygen.eval.methods import build_caches

    caches, on_tokens = build_caches(tiny, FakeTok(), method, len(prompt) + 10)
    lp = teacher_forced(spy, prompt, ref.targets, caches, lambda ids: (fed_kinds.extend(ids), on_tokens(ids)))
    assert spy.fed == prompt + ref.targets[:-1]  # the reference tokens, never the cache's own choices
    assert fed_kinds == spy.fed  # the kinds feeder saw each token before the model
    assert lp.shape == (10, 97) and caches[0].length == len(prompt) + 9
    # With the full cache, teacher forcing reproduces the reference exactly.
    rec = evaluate(tiny, FakeTok(), ref, Method("full"))
    assert rec["agreement"] == 1.0 and rec["kl"] == pytest.approx(0, abs=1e-6) and rec["first_departure"] is None


@pytest.mark.parametrize("policy,ratio", [("local", 0.1), ("sinks", 0.05), ("auto", None)])
def test_free_run_departs_where_teacher_forcing_first_disagrees(tiny, policy, ratio):
    prompt = list(range(4, 40))
    ref = reference_run(tiny, prompt, 16, frozenset())
    m = Method("auto", threshold=0.9) if ratio is None else with_ratio(policy, ratio)
    forced, free = evaluate(tiny, FakeTok(), ref, m), evaluate(tiny, FakeTok(), ref, m, run_free=True)
    assert free["departure_from"] == "free_run"
    assert forced["first_departure"] == free["first_departure"]


@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.5, 1.0])
def test_sink_window_cache_attends_to_sinks_and_recent_tokens(ratio):
    torch.manual_seed(0)
    n_heads, n_kv, hd, L, steps = 4, 2, 8, 13, 12
    q, k, v = torch.randn(n_heads, L + steps, hd), torch.randn(n_kv, L + steps, hd), torch.randn(n_kv, L + steps, hd)
    cache = SinkWindowCache(n_kv, hd, L + steps, 4, ratio, torch.device("cpu"), torch.float32)
    out = cache.attend(q[:, :L], k[:, :L], v[:, :L])
    ref, _ = dense_attention(q[:, :L], k[:, :L], v[:, :L], torch.ones(L, L, dtype=torch.bool).tril())
    torch.testing.assert_close(out, ref)
    kept = sink_window_kept(L, 4, ratio)
    assert cache.k.shape[1] == min(L + steps, sink_window_kept(L + steps, 4, ratio) + 1)  # bounded storage
    for n in range(L + 1, L + steps + 1):
        out = cache.attend(q[:, n - 1 : n], k[:, n - 1 : n], v[:, n - 1 : n])
        visible = torch.zeros(1, n, dtype=torch.bool)
        visible[0, :4] = True
        visible[0, n - (kept + 1 - 4) :] = True  # the window held before this step, plus the new token
        ref, _ = dense_attention(q[:, n - 1 : n], k[:, :n], v[:, :n], visible)
        torch.testing.assert_close(out, ref)
        kept = min(sink_window_kept(n, 4, ratio), kept + 1)
        assert cache.kept() == kept
    assert cache.kept() / cache.length == pytest.approx(predicted_kept("sinks", ratio, L, L + steps))


@pytest.mark.parametrize("policy", FIXED)
def test_predicted_kept_fraction_is_what_the_caches_keep(tiny, policy):
    prompt = list(range(4, 34))
    ref = reference_run(tiny, prompt, 20, frozenset())
    for ratio in (0.1, 0.27, 0.4):
        rec = evaluate(tiny, FakeTok(), ref, with_ratio(policy, ratio))
        assert rec["kept_fraction"] == pytest.approx(predicted_kept(policy, ratio, len(prompt), rec["length"]))


@pytest.mark.parametrize("policy", FIXED)
@pytest.mark.parametrize("target", [0.35, 0.6, 0.8])
def test_budget_matching_reaches_the_target(policy, target):
    lengths = [(53, 116), (78, 141), (126, 189), (60, 80)]
    r = match_ratio(policy, lengths, target)
    got = sum(predicted_kept(policy, r, p, e) for p, e in lengths) / len(lengths)
    # Budgets are ceilings, so the mean kept fraction moves in steps: one more token of budget moves one run by
    # 1/end_len (two for local+frequent, whose two ratios move together). The nearest step is within half the
    # largest step, which bounds the error: 1/80 here, doubled for local+frequent.
    tol = (2 if policy == "local+frequent" else 1) / min(e for _, e in lengths)
    assert abs(got - target) <= tol, (r, got)


def test_prompt_files(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"question_id": 7, "turns": ["first", "second"]}\n\n{"instruction": "do"}\n{"prompt": "p"}\n')
    assert load_prompts(str(jl)) == [{"id": 7, "prompt": "first"}, {"id": 1, "prompt": "do"},
                                     {"id": 2, "prompt": "p"}]
    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"instruction": "a"}, {"prompt": "b"}]))
    assert [p["prompt"] for p in load_prompts(str(js), limit=1)] == ["a"]
    assert load_prompts(str(jl), limit=1, start=1) == [{"id": 1, "prompt": "do"}]
    with pytest.raises(TinygenError, match="no prompts from record 4 on"):
        load_prompts(str(jl), start=3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(TinygenError, match="line 2: no prompt"):
        load_prompts(str(bad))


def run_eval(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "tinygen.eval", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_bad_input_is_one_line(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "x"\n')
    empty = tmp_path / "noprompt.json"
    empty.write_text('[{"turns": []}]')
    for args, fragment in [(["--prompts", tmp_path / "missing.jsonl"], "cannot read"),
                           (["--prompts", broken], "bad JSON on line 1"),
                           (["--prompts", empty], "no prompt"),
                           (["--prompts", broken, "--threshold", "1.5"], "--threshold"),
                           (["--prompts", broken, "--policy", "nearby"], "unknown policy"),
                           (["--prompts", broken, "--shapes", "profile", "--threshold", "0.9"], "--shapes is for"),
                           (["--prompts", broken, "--shapes", "profile", "--policy", "local"], "--shapes is for"),
                           ([], "give --prompts")]:
        assert_one_line_error(run_eval(*args), fragment)


def test_end_to_end_on_the_real_model(default_model_dir, tmp_path):
    prompts = tmp_path / "two.jsonl"
    prompts.write_text('{"turns": ["Name a colour."]}\n{"instruction": "Say hello."}\n')
    r = run_eval("--prompts", prompts, "--max-new-tokens", 8, "--threshold", 0.95, "--threads", 1, "--out",
                 tmp_path / "out", "--model", default_model_dir, timeout=300)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "eval_auto_prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(1 <= r["steps"] <= 8 for r in rows)
    for row in rows:
        assert len(row["policies"]) == 30 and all(len(layer) == 3 for layer in row["policies"])
        assert len(row["per_step"]["kl"]) == row["steps"] and row["kv_bytes"] > 0
    # The same prompts in this process without tinygen.eval's runner or metrics: the full cache's greedy tokens, then
    # FastGen (the paper's profile at T = 0.95) fed the same tokens. What the run wrote must be exactly these figures,
    # and the compressed cache must really differ from the full one (kept < 1, KL > 0) for the check to mean anything.
    from tinygen.cache import kept_fraction
    from tinygen.eval.sweep import encode_prompts
    from tinygen.fastgen.cache import make_caches
    from tinygen.fastgen.policy import FastGenConfig
    from tinygen.generate import decode_step, full_caches, prefill
    from tinygen.loader import load_model
    from tinygen.tokenizer import Tokenizer

    torch.set_num_threads(1)
    model = load_model(default_model_dir)
    tok = Tokenizer(default_model_dir, model.cfg.eos_token_ids)
    kept_by_hand = []
    for row, p in zip(rows, encode_prompts(tok, load_prompts(str(prompts)))):
        ids, steps = p["ids"], row["steps"]
        full = full_caches(model, len(ids) + steps)
        logits, ref, targets = prefill(model, ids, full), [], []
        for i in range(steps):
            ref.append(torch.log_softmax(logits.float(), -1).double())
            targets.append(int(logits.argmax()))
            if i + 1 < steps:
                logits = decode_step(model, torch.tensor(targets[-1:]), full, len(ids) + i)
        caches, feed = make_caches(model, tok, FastGenConfig(profile="paper", threshold=0.95), len(ids) + steps)
        feed(ids)
        logits, got = prefill(model, ids, caches), []
        for i in range(steps):
            got.append(torch.log_softmax(logits.float(), -1).double())
            if i + 1 < steps:
                feed(targets[i : i + 1])
                logits = decode_step(model, torch.tensor(targets[i : i + 1]), caches, len(ids) + i)
        agree = sum(int(g.argmax() == t) for g, t in zip(got, targets)) / steps
        kl = sum(float((r.exp() * (r - g)).sum()) for r, g in zip(ref, got)) / steps
        assert row["agreement"] == pytest.approx(agree, abs=1e-12)
        assert row["kl"] == pytest.approx(kl, rel=1e-6, abs=1e-9) and kl > 1e-6
        assert row["kept_fraction"] == pytest.approx(kept_fraction(caches), abs=1e-12) and row["kept_fraction"] < 1
        kept_by_hand.append(kept_fraction(caches))
    summary = json.loads((out / "eval_auto_summary.json").read_text())
    assert summary["dtype"] == "float32" and summary["machine"]["cpu_count"] and summary["max_new_tokens"] == 8
    (m,) = summary["methods"]
    assert m["method"] == {"policy": "auto", "label": "auto T=0.95", "profile": "paper", "threshold": 0.95,
                           "local_ratio": 0.3, "frequent_ratio": 0.3}
    assert m["summary"]["prompts"] == 2
    assert m["summary"]["kept_fraction"]["mean"] == pytest.approx(sum(kept_by_hand) / 2, abs=1e-12)
    assert (out / "eval_auto.md").read_text().count("| auto T=0.95 |") == 1
    assert (out / "eval_auto_policy_heatmap.png").stat().st_size > 1000
    assert not list(out.glob(".*tmp*"))  # temp files renamed away


def test_table_plot_and_stability_on_constructed_results(tmp_path):
    from tinygen.eval.plots import stability, sweep_plot
    from tinygen.eval.sweep import table

    def summ(policy, kept, agree, kl, **m):
        s = dict(kept_fraction=kept, agreement=agree, kl=kl, ll_drop=0.01, first_departure=5, kv_bytes=2**20)
        s = {k: {"mean": v, "median": v} for k, v in s.items()}
        label = f"auto T={m.get('threshold', 0):g}" if policy == "auto" else f"{policy} r=0.300"
        return {"method": dict(policy=policy, label=label, **m), "summary": dict(s, never_departs=0.5)}

    sums = [summ("auto", 0.6, 0.9, 0.05, threshold=0.95), summ("auto", 0.7, 0.95, 0.01, threshold=0.98),
            summ("auto", 0.66, 0.93, 0.02, kv_budget=0.65, profile="budget"),
            summ("local", 0.66, 0.5, 1.0, matched_to_budget=0.65)]
    sums[2]["method"]["label"] = "auto budget=0.65"
    md = table(sums).splitlines()
    assert len(md) == 6 and md[2].startswith("| budget=0.65 | auto budget=0.65 | 0.660 | 0.930 / 0.930 | 0.0200")
    assert md[3].startswith("| budget=0.65 | local r=0.300 |")
    assert md[4].startswith("| T=0.95 | auto T=0.95 | 0.600 | 0.900 / 0.900 | 0.0500")
    sweep_plot(sums, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000
    a, b = "special+punct+frequent+local", "full"
    maps = [[[a, b]], [[a, a]], [[a, b]]]  # one layer, two heads, three prompts
    st = stability(maps, tmp_path / "st.png")
    assert st["share"] == [[1.0, pytest.approx(2 / 3)]] and st["mean_share"] == pytest.approx(5 / 6)
    assert st["per_layer"][0][st["policies"].index(b)] == pytest.approx(2 / 6)


def test_sweep_matches_fixed_policies_to_the_budget_profile(tiny):
    from tinygen.eval.sweep import summaries, sweep

    prompts = [{"id": i, "ids": list(range(4 + i, 44 + i))} for i in range(2)]
    records, matching = sweep(tiny, FakeTok(), prompts, 12, thresholds=(0.95,), kv_budgets=(0.4, 0.7),
                              fixed=("frequent", "sinks"))
    labels = [s["method"]["label"] for s in summaries(records)]
    assert labels[:3] == ["auto budget=0.4", "auto budget=0.7", "auto T=0.95"] and len(labels) == 7
    assert [(m["kv_budget"], m["policy"]) for m in matching] == [(0.4, "frequent"), (0.4, "sinks"),
                                                                 (0.7, "frequent"), (0.7, "sinks")]
    kept = {s["method"]["label"]: s["summary"]["kept_fraction"]["mean"] for s in summaries(records)}
    for s in summaries(records):
        m = s["method"]
        if m.get("matched_to_budget") is not None:  # equal memory: within a token or two of the auto point's
            assert abs(kept[m["label"]] - kept[f"auto budget={m['matched_to_budget']:g}"]) < 0.03, m
    assert abs(kept["auto budget=0.4"] - 0.4) < 0.05 and abs(kept["auto budget=0.7"] - 0.7) < 0.05
