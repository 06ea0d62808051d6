"""The default model (SmolLM2-135M-Instruct) against HF transformers on the same float32 weights."""
import math

import pytest
import torch
from conftest import EVAL

from tinygen.generate import full_caches, generate
from tinygen.loader import load_model
from tinygen.perplexity import perplexity
from tinygen.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engine(default_model_dir):
    model = load_model(default_model_dir)
    return model, Tokenizer(default_model_dir, model.cfg.eos_token_ids)


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


def english_ids(tok, n):
    text = (EVAL / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    start = text.index("It is a truth universally acknowledged")
    return tok.encode(text[start : start + 20 * n])[:n]


def test_logits_match_hf(engine, hf_model):
    model, tok = engine
    ids = english_ids(tok, 300)
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits[0]
        got = model(torch.tensor(ids), full_caches(model, len(ids)), start_pos=0)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)


def test_perplexity_within_0_1_percent_of_hf(engine, hf_model):
    model, tok = engine
    ids = english_ids(tok, 1024)
    ppl, n = perplexity(model, ids, 256, lambda n: (full_caches(model, n), None))
    nll = 0.0
    with torch.no_grad():
        for s in range(0, 1024, 256):
            window = torch.tensor([ids[s : s + 256]])
            nll += hf_model(window, labels=window).loss.item() * 255
    hf_ppl = math.exp(nll / (4 * 255))
    assert n == 4 * 255
    assert abs(ppl - hf_ppl) / hf_ppl < 1e-3, (ppl, hf_ppl)
    assert 5 < ppl < 60  # English prose; a broken rotary layout gives hundreds


def test_greedy_answer_names_paris(engine):
    model, tok = engine
    ids = tok.encode(tok.render_chat([{"role": "user", "content": "What is the capital of France?"}]))
    out = list(generate(model, ids, full_caches(model, len(ids) + 32), 32, eos_ids=tok.eos_ids))
    assert "Paris" in tok.decode(out)


def test_greedy_tokens_match_hf_generate(engine, hf_model):
    model, tok = engine
    ids = english_ids(tok, 60)
    out = list(generate(model, ids, full_caches(model, 100), 40, ignore_eos=True))
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, min_new_tokens=40)
    assert out == ref[0, len(ids):].tolist()
