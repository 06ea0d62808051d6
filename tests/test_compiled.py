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


def rows_kv(cache):
    """A full cache's K and V read back through its block tables: (n_kv_heads, length, head_dim) each."""
    k, v, _ = cache.pool.gather(torch.tensor(cache.rows()), cache.length)
    return k[:, : cache.length], v[:, : cache.length]


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 0.0)])
def test_static_step_equals_decode_step(tiny_model_dir, dtype, tol):
    """Eagerly, the position-as-tensor step over the rows' blocks, masked, is the model's own decode step, up to the
    caches' last slot (the prompt's 11 tokens in one block, then 40 steps over 4 blocks), and writes the same K, V,
    positions and bits into the pool."""
    model = load_model(tiny_model_dir, dtype=dtype, prepack=False)
    want, full = steps(model, decode_step, 40, max_len=len(PROMPT) + 40)
    got, static = steps(model, CompiledDecoder(model, compile=False), 40, max_len=len(PROMPT) + 40)
    # bfloat16: the same grouped matmuls on both paths (float32 attention on the CPU)
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    for a, b in zip(static, full):
        assert a.length == b.length == a.kept == len(PROMPT) + 40  # every slot written
        for x, y in zip(rows_kv(a), rows_kv(b)):
            torch.testing.assert_close(x, y, atol=tol, rtol=0)
        rows = [torch.tensor(c.rows()) for c in (a, b)]
        assert torch.equal(*(c.pool.resident_mask(r, c.pool.max_len) for c, r in zip((a, b), rows)))
        slots = [c.pool.gather(r, c.length)[2][:, : c.length] for c, r in zip((a, b), rows)]
        assert torch.equal(a.pool.pos.view(-1)[slots[0]], b.pool.pos.view(-1)[slots[1]])


def test_unwritten_slots_are_zero(tiny_model_dir):
    """Masked slots still multiply their values by 0: garbage there (NaN) would poison the output. Under
    deterministic algorithms torch fills uninitialized memory with NaN, so slots a block was handed out with
    unwritten would show."""
    model = load_model(tiny_model_dir)
    torch.use_deterministic_algorithms(True)
    try:
        _, caches = steps(model, decode_step, 20)
    finally:
        torch.use_deterministic_algorithms(False)
    c = caches[0]
    held = len(c.pool.blocks[c.rows()[0]]) * c.pool.block_size
    k, v, _ = c.pool.gather(torch.tensor(c.rows()), held)
    assert held > c.length and (k[:, c.length :] == 0).all() and (v[:, c.length :] == 0).all()


def test_compiled_step_matches_eager(tiny_model_dir):
    """torch.compile (Inductor, freezing) of the same step: the same logits to float32 rounding, as the rows take
    new blocks (a new dynamic size each time), with one compilation."""
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
    assert len(caches[0].pool.blocks[caches[0].rows()[0]]) == 4  # 52 slots
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
