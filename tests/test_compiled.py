"""The decode step as one function of tensors (tinygen/compiled.py): run eagerly it equals `decode_step`; compiled by
torch.compile it equals itself run eagerly; where compiling fails it falls back with one line on stderr."""
import json

import pytest
import torch
from conftest import assert_one_line_error
from test_cli import cli

import tinygen.compiled as compiled
from tinygen.compiled import CompiledDecoder
from tinygen.generate import decode_step, full_caches, generate, prefill
from tinygen.loader import load_model

PROMPT = [3, 17, 5, 40, 22, 9, 61, 2, 33, 7, 12]


def steps(model, decode, n, max_len=None):
    """Greedy steps after PROMPT through `decode`: the logits of each, and the caches."""
    caches = full_caches(model, max_len or len(PROMPT) + n + 1)
    token = prefill(model, PROMPT, caches).argmax(-1, keepdim=True)
    out = []
    for pos in range(len(PROMPT), len(PROMPT) + n):
        out.append(decode(model, token, caches, pos))
        token = out[-1].argmax(-1, keepdim=True)
    return torch.stack(out), caches


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 0.0)])
def test_static_step_equals_decode_step(tiny_model_dir, dtype, tol):
    """Eagerly, the position-as-tensor step over whole masked buffers is the model's own decode step, across two
    growths of the caches up to their last row (the prompt's 11 tokens get 16 spare rows: 27, then 28 + 16 = 44,
    then max_len 51 with no row to spare at the end)."""
    model = load_model(tiny_model_dir, dtype=dtype, prepack=False)
    want, full = steps(model, decode_step, 40, max_len=len(PROMPT) + 40)
    got, static = steps(model, CompiledDecoder(model, compile=False), 40, max_len=len(PROMPT) + 40)
    # bfloat16: the same grouped matmuls on both paths; float32: SDPA against them
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    for a, b in zip(static, full):
        assert a.length == b.length == a.k.shape[1] == b.k.shape[1] == len(PROMPT) + 40  # every row written
        torch.testing.assert_close(a.k, b.k, atol=tol, rtol=0)
        torch.testing.assert_close(a.v, b.v, atol=tol, rtol=0)
    capacities = []
    steps(model, lambda *a: capacities.append(a[2][0].k.shape[1]) or decode_step(*a), 40)
    assert sorted(set(capacities)) == [27, 44, 52]


def test_spare_rows_are_zero(tiny_model_dir):
    """Masked rows still multiply their values by 0: garbage there (NaN) would poison the output. Under
    deterministic algorithms torch fills uninitialized memory with NaN, so rows left unwritten would show."""
    model = load_model(tiny_model_dir)
    torch.use_deterministic_algorithms(True)
    try:
        _, caches = steps(model, decode_step, 20)
    finally:
        torch.use_deterministic_algorithms(False)
    c = caches[0]
    assert c.k.shape[1] > c.length and (c.k[:, c.length :] == 0).all() and (c.v[:, c.length :] == 0).all()


def test_compiled_step_matches_eager(tiny_model_dir):
    """torch.compile (Inductor, freezing) of the same step: the same logits to float32 rounding, across growths of
    the caches (a new capacity each time) with one compilation."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = load_model(tiny_model_dir, prepack=False)
    decoder = CompiledDecoder(model)
    decoder.warm_up()
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1
    if torch.backends.mkldnn.is_available():  # freezing took: the weights were packed for oneDNN in the graph
        assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] > 0
    got, caches = steps(model, decoder, 40)
    want, _ = steps(model, CompiledDecoder(model, compile=False), 40)
    assert decoder.compiled, "compiling failed and the decoder fell back"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert caches[0].k.shape[1] >= len(PROMPT) + 40
    assert counters["stats"]["unique_graphs"] == 1, "no recompilation as the caches grew"


def test_compile_failure_falls_back(tiny_model_dir, monkeypatch, capsys):
    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("Compiler: cc is not found\nmore detail")
        return run

    monkeypatch.setattr(compiled.torch, "compile", broken)
    model = load_model(tiny_model_dir, prepack=False)
    decoder = CompiledDecoder(model)
    got, _ = steps(model, decoder, 5)
    packed = load_model(tiny_model_dir)  # what the fallback decodes as: the eager model, packed as load_model packs
    want, _ = steps(packed, decode_step, 5)
    assert not decoder.compiled and decoder.fell_back
    assert type(model.layers[0].attn.wqkv) is type(packed.layers[0].attn.wqkv)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tinygen: --compile: torch.compile failed (RuntimeError: Compiler: cc is not found); decoding "
                   "without it"]


def test_generate_takes_the_compiled_step(tiny_model_dir):
    model = load_model(tiny_model_dir, prepack=False)
    eager = list(generate(model, PROMPT, full_caches(model, 40), 20, ignore_eos=True))
    decoder, calls = CompiledDecoder(model, compile=False), []
    static = list(generate(model, PROMPT, full_caches(model, 40), 20, ignore_eos=True,
                           decode=lambda *a: calls.append(a[3]) or decoder(*a)))
    assert static == eager and calls == list(range(len(PROMPT), len(PROMPT) + 19))


@pytest.mark.parametrize("args,fragment", [
    (["--prompt", "hi", "--policy", "auto"], "--compile is for --policy full"),
    (["--chat", "--policy", "full"], "--compile is for one prompt"),
    (["--prompt", "hi", "--policy", "full", "--device", "cuda"], "--compile runs on the CPU only"),
])
def test_cli_compile_bad_combinations(tiny_model_dir, args, fragment):
    r = cli("--model", tiny_model_dir, "--compile", *args)
    assert_one_line_error(r, fragment, code=2)  # every combination is refused before any work starts


def test_cli_compile_generates(chat_model, tmp_path):
    out = tmp_path / "stats.json"
    r = cli("--model", chat_model, "--prompt", "hi", "--max-new-tokens", 6, "--ignore-eos", "--policy", "full",
            "--compile", "--stats-json", out, timeout=600)
    assert r.returncode == 0, r.stderr
    stats = json.loads(out.read_text())
    assert stats["compiled"] is True and stats["compile_seconds"] > 0 and stats["generated_tokens"] == 6
    assert "decode step compiled in" in r.stderr
