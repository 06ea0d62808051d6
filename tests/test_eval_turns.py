"""tinygen.eval's multi-turn mode: the reference conversation (its chunked catch-up changes nothing for the full
cache), teacher forcing along it, per-turn records and summaries, and the command line, on a tiny random model with
the default tokenizer."""
import json

import pytest
import torch
from conftest import assert_one_line_error, save_tiny_chat_model
from test_eval import run_eval

import tinygen.eval.turns as turns
from tinygen.conversation import Conversation
from tinygen.errors import TinygenError
from tinygen.generate import decode_step
from tinygen.eval.methods import Method, build_caches
from tinygen.eval.runner import reference_run
from tinygen.eval.turns import evaluate_turns, forced_turns, load_conversations, reference_conversation
from tinygen.eval.turns_report import turn_summaries, turns_table

QUESTIONS = ["Name three rivers.", "Now sort them by length."]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, default_model_dir):
    """A tiny random model with the default tokenizer and room for a two-turn conversation (256 positions)."""
    return save_tiny_chat_model(tmp_path_factory.mktemp("tinychat256"), default_model_dir, 256)


@pytest.fixture(scope="module")
def chat(chat_dir):
    from tinygen.loader import load_model
    from tinygen.tokenizer import Tokenizer

    torch.set_num_threads(1)
    model = load_model(chat_dir, "cpu", "float32")
    return model, Tokenizer(chat_dir, model.cfg.eos_token_ids)


class EosTok:
    """The tokenizer with another set of stop tokens (to make the random model stop where a test wants)."""

    def __init__(self, tok, eos_ids):
        self.tok, self.eos_ids = tok, frozenset(eos_ids)

    def __getattr__(self, name):
        return getattr(self.tok, name)


class Spy:
    """Wraps a model and records each call's (start_pos, token ids)."""

    def __init__(self, model):
        self.model, self.embed, self.cfg, self.calls = model, model.embed, model.cfg, []

    def __call__(self, tokens, caches, start_pos, last_only=False, **kw):
        self.calls.append((start_pos, tokens.tolist()))
        return self.model(tokens, caches, start_pos, last_only, **kw)

    def decode_step(self, model, token, caches, pos):  # stands in for generate.decode_step (the batch's step)
        if model is not self:
            return decode_step(model, token, caches, pos)
        self.calls.append((pos, token.tolist()))
        return decode_step(self.model, token, caches, pos)


def stop_at_third_token(model, tok):
    """A tokenizer whose stop token is the third token of the first answer (one that is not among the first two)."""
    first = reference_conversation(model, tok, QUESTIONS[:1], 8).turns[0].targets
    assert first[2] not in first[:2], "pick another position: the random model repeats itself"
    return EosTok(tok, {first[2]})


def two_turns(chat, stop):
    """The reference conversation of QUESTIONS, 6 new tokens a turn, its first answer ending at the length limit
    or at an EOS (the third token): (model, tokenizer, reference)."""
    model, tok = chat
    tok = stop_at_third_token(model, tok) if stop == "eos" else tok
    return model, tok, reference_conversation(model, tok, QUESTIONS, 6)


@pytest.mark.parametrize("stop", ["length", "eos"])
def test_second_turn_equals_a_from_scratch_run_on_the_whole_conversation(chat, stop):
    model, tok, ref = two_turns(chat, stop)
    t1, t2 = ref.turns
    assert t1.stop == stop and len(t1.targets) == (3 if stop == "eos" else 6)
    assert t1.answer == (t1.targets[:-1] if stop == "eos" else t1.targets)
    # The conversation: turn 1's rendering, the answer without its EOS, turn 2's rendering as a difference.
    conv = Conversation(tok)
    assert ref.ids[: t1.start] == conv.user_turn(QUESTIONS[0])
    conv.assistant_turn(t1.answer)
    assert ref.ids[t1.start : t2.start] == t1.answer + conv.user_turn(QUESTIONS[1])
    assert ref.ids[t2.start :] == t2.answer and t2.start > t1.start + len(t1.answer) + 5
    # A fresh full cache prefilled with the whole history at once answers turn 2 the same, with the same
    # distributions: the chunked catch-up into the persisted cache changes nothing.
    scratch = reference_run(model, ref.ids[: t2.start], 6, tok.eos_ids)
    assert scratch.targets == t2.targets and scratch.stop == t2.stop
    torch.testing.assert_close(scratch.logprobs, t2.logprobs, atol=2e-5, rtol=0)


@pytest.mark.parametrize("stop", ["length", "eos"])
def test_teacher_forcing_walks_the_conversation_with_one_chunk_per_turn(chat, stop, monkeypatch):
    model, tok, ref = two_turns(chat, stop)
    t1, t2 = ref.turns
    spy, kinds_fed = Spy(model), []
    monkeypatch.setattr(turns, "decode_step", spy.decode_step)
    caches, _ = build_caches(model, tok, Method("full"), len(ref.ids))
    out = forced_turns(spy, ref, caches, kinds_fed.extend)
    # Turn 1's prompt, its answer token by token, then one chunk: the answer token a length stop never fed back
    # (none after an EOS stop, which was fed as the last answer token) and turn 2's prompt.
    fed_before_chunk = t1.start + len(t1.targets) - 1
    assert spy.calls[0] == (0, ref.ids[: t1.start])
    assert spy.calls[1 : len(t1.targets)] == [(t1.start + j, [tok_]) for j, tok_ in enumerate(t1.targets[:-1])]
    chunk = spy.calls[len(t1.targets)]
    assert chunk == (fed_before_chunk, ref.ids[fed_before_chunk : t2.start])
    assert len(chunk[1]) == t2.start - t1.start - len(t1.answer) + (1 if stop == "length" else 0)
    fed = [i for _, ids in spy.calls for i in ids]
    assert fed == kinds_fed == ref.ids[: t2.start + len(t2.targets) - 1]  # the reference's tokens, in order
    assert [lp.shape for lp in out] == [(len(t1.targets), 49152), (len(t2.targets), 49152)]


def test_the_full_cache_as_method_agrees_on_both_turns(chat):
    model, tok = chat
    ref = reference_conversation(model, tok, QUESTIONS, 6)
    rec = evaluate_turns(model, tok, ref, Method("full"))
    t1, t2 = rec["turns"]
    for t, r in zip(rec["turns"], ref.turns):
        assert t["agreement"] == 1.0 and t["kl"] == pytest.approx(0, abs=1e-9) and t["first_departure"] is None
        assert t["kept_fraction"] == 1.0 and t["steps"] == 6 and t["ll"] == pytest.approx(t["ll_full"], abs=1e-9)
        assert t["length"] == r.start + 5 and t["context_tokens"] == r.start
    assert t1["prompt_tokens"] == ref.turns[0].start and t2["prompt_tokens"] == ref.turns[1].start - t1["length"]
    assert t1["policy_counts"] is None and t2["heads_changed"] is None  # no FastGen map for the full cache
    # 3 layers x 2 KV heads x length x head_dim 16 x 4 bytes x (K, V)
    assert t2["kv_bytes_full"] == 2 * 3 * 2 * t2["length"] * 16 * 4


def test_a_compressed_cache_is_scored_per_turn(chat):
    model, tok = chat
    ref = reference_conversation(model, tok, QUESTIONS, 8)
    rec = evaluate_turns(model, tok, ref, Method("frequent", frequent_ratio=0.5))
    for t in rec["turns"]:
        assert 0 <= t["agreement"] <= 1 and t["kl"] >= 0 and len(t["per_step"]["kl"]) == 8
        assert t["kept_fraction"] == pytest.approx(0.5, abs=0.03) and t["kv_bytes"] < t["kv_bytes_full"]
    # Agreement is the per-step mean and the first departure is its first miss.
    t1 = rec["turns"][0]
    assert t1["agreement"] == sum(t1["per_step"]["agree"]) / 8
    assert t1["first_departure"] == next((i for i, a in enumerate(t1["per_step"]["agree"]) if not a), None)


def test_fresh_starts_each_turn_from_an_empty_cache(chat, monkeypatch):
    model, tok = chat
    ref = reference_conversation(model, tok, QUESTIONS, 6)
    t1, t2 = ref.turns
    spy = Spy(model)
    monkeypatch.setattr(turns, "decode_step", spy.decode_step)
    full = evaluate_turns(model, tok, ref, Method("full"), fresh=True)
    assert full["method"] == {"policy": "full", "label": "full, fresh each turn", "fresh": True}
    for t in full["turns"]:
        assert t["agreement"] == 1.0 and t["kl"] == pytest.approx(0, abs=1e-6)
    assert [t["prompt_tokens"] for t in full["turns"]] == [t1.start, t2.start]  # the whole history each turn
    rec = evaluate_turns(spy, tok, ref, Method("frequent", frequent_ratio=0.5), fresh=True)
    starts = [(pos, len(ids)) for pos, ids in spy.calls if len(ids) > 1]
    assert starts == [(0, t1.start), (0, t2.start)]  # two prefills from position 0, no chunk
    fresh2 = rec["turns"][1]
    assert fresh2["kept_fraction"] == pytest.approx(0.5, abs=0.03) and fresh2["length"] == t2.start + 5
    # The fresh turn 2 is teacher-forced exactly like a single-turn run on the history: the same distributions.
    from tinygen.eval.runner import Reference, evaluate

    single = evaluate(model, tok, Reference(ref.ids[: t2.start], t2.targets, t2.logprobs, t2.stop, 0),
                      Method("frequent", frequent_ratio=0.5))
    assert single["agreement"] == fresh2["agreement"] and single["kl"] == pytest.approx(fresh2["kl"], abs=1e-9)


def test_a_conversation_past_the_context_is_a_one_line_error(chat):
    model, tok = chat  # 256 positions: turn 1's prompt plus 250 new tokens do not fit
    with pytest.raises(TinygenError, match=r"passes the model's context of 256"):
        reference_conversation(model, tok, QUESTIONS, 250)


def test_summaries_and_table_on_constructed_records():
    def turn(agreement, kl, ctx):
        return dict(agreement=agreement, kl=kl, ll_full=-1.0, ll=-1.5, steps=4, first_departure=1, stop="length",
                    kept_fraction=0.7, kv_bytes=2**20, kv_bytes_full=2 * 2**20, context_tokens=ctx,
                    heads_changed=3)
    recs = [{"id": i, "method": {"label": "auto budget=0.7"}, "turns": [turn(a1, 0.1, 100), turn(a2, 0.2, 200)]}
            for i, (a1, a2) in enumerate([(1.0, 0.5), (0.5, 0.75)])]
    (s,) = turn_summaries(recs)
    assert s["turns"][0]["agreement"]["mean"] == 0.75 and s["turns"][1]["agreement"]["mean"] == 0.625
    # per-conversation changes -0.5 and +0.25: mean -0.125, standard error 0.75 / sqrt(2) / sqrt(2) = 0.375
    assert s["turns"][1]["agreement_change"]["mean"] == pytest.approx(-0.125)
    assert s["turns"][1]["agreement_change"]["sem"] == pytest.approx(0.375)
    assert s["turns"][1]["kl_change"]["mean"] == pytest.approx(0.1) and s["turns"][1]["heads_changed"]["mean"] == 3
    table = turns_table([s])
    assert "| auto budget=0.7 | 1 | 100 | 0.700 | 0.750 / 0.750 |  |" in table
    assert "| auto budget=0.7 | 2 | 200 | 0.700 | 0.625 / 0.625 | -0.125 ± 0.375 |" in table
    assert "| 1.00 / 2.00 |" in table


def test_conversation_files(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"question_id": 81, "turns": ["a", "b", "c"]}\n{"turns": ["d", "e"]}\n')
    assert load_conversations(str(f), 2) == [{"id": 81, "turns": ["a", "b"]}, {"id": 1, "turns": ["d", "e"]}]
    assert load_conversations(str(f), 2, limit=1) == [{"id": 81, "turns": ["a", "b"]}]
    assert load_conversations(str(f), 2, start=1) == [{"id": 1, "turns": ["d", "e"]}]
    with pytest.raises(TinygenError, match="no prompts from record 3 on"):
        load_conversations(str(f), 2, start=2)
    with pytest.raises(TinygenError, match="line 2: 3 turns needed"):
        load_conversations(str(f), 3)
    f.write_text('{"turns": ["a", " "]}\n')
    with pytest.raises(TinygenError, match="line 1: each of the first 2 turns must be a non-empty string"):
        load_conversations(str(f), 2)


def test_bad_flags_are_one_line(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"turns": ["only one"]}\n')
    for args, fragment in [(["--prompts", f, "--turns", "0"], "--turns must be at least 1"),
                           (["--long-context", f, "--turns", "2"], "--turns needs --prompts"),
                           (["--prompts", f, "--turns", "2", "--sweep"], "--turns runs on its own"),
                           (["--prompts", f, "--turns", "2", "--free-run"], "--turns runs on its own"),
                           (["--prompts", f, "--fixed", "frequent"], "--fixed goes with --turns"),
                           (["--prompts", f, "--fresh"], "--fresh goes with --turns"),
                           (["--prompts", f, "--turns", "2", "--policy", "local", "--fixed", "frequent"],
                            "--fixed is matched to auto"),
                           (["--prompts", f, "--turns", "2", "--fixed", "special+frequent"], "cannot be matched"),
                           (["--prompts", f, "--turns", "2", "--fixed", "nearby"], "unknown policy"),
                           (["--prompts", f, "--turns", "2", "--fixed", "sinks"], "sinks cannot take a later turn"),
                           (["--prompts", f, "--turns", "2"], "line 1: 2 turns needed")]:
        assert_one_line_error(run_eval(*args), fragment)


def test_command_line_writes_the_two_turn_report(chat_dir, tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"question_id": 5, "turns": QUESTIONS}) + "\n"
                 + json.dumps({"question_id": 6, "turns": ["Say hi.", "Again."]}) + "\n")
    out = tmp_path / "out"
    r = run_eval("--prompts", f, "--turns", 2, "--policy", "full", "--max-new-tokens", 4, "--threads", 1,
                 "--model", chat_dir, "--out", out)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "eval_two_turn.json").read_text())
    assert summary["turns"] == 2 and summary["max_new_tokens"] == 4 and summary["machine"]["cpu_count"]
    (m,) = summary["methods"]
    assert [t["agreement"]["mean"] for t in m["turns"]] == [1.0, 1.0] and m["turns"][1]["agreement_change"]["mean"] == 0
    rows = [json.loads(line) for line in (out / "eval_two_turn_conversations.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [5, 6] and all(len(r["turns"]) == 2 for r in rows)
    md = (out / "eval_two_turn.md").read_text()
    assert md.count("| full | 1 |") == 1 and md.count("| full | 2 |") == 1 and "2 conversations of 2 turns" in md
