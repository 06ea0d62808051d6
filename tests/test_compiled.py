"""The decode step compiled (tinygen/compiled.py): torch.compile of step.decode equals the eager step over hundreds of
steps of a batch whose sequences join and leave, grow, evict and mix policies, with one graph and no recompilation;
where compiling fails it falls back with one line on stderr; the CLI takes --compile for every policy."""
import json

import pytest
import torch
from conftest import assert_one_line_error
from test_cli import cli

import tinygen.compiled as compiled
from tinygen.compiled import CompiledStep
from tinygen.fastgen.cache import fastgen_caches
from tinygen.fastgen.kinds import TokenKinds
from tinygen.fastgen.policy import PUNCT, SPECIAL, FastGenConfig
from tinygen.generate import full_caches, generate, prefill
from tinygen.kvpool import KVPool
from tinygen.loader import load_model
from tinygen.paged import PagedBatch

PROMPT = [3, 17, 5, 40, 22, 9, 61, 2, 33, 7, 12]
VOCAB = [SPECIAL if i < 3 else PUNCT if i < 12 else 0 for i in range(97)]  # the tiny model's 97 ids
MAX_LEN = 250  # the tiny model's context is 256: sequences live up to 200 steps
BUDGET = FastGenConfig(kv_budget=0.5, observation=8)
# (prompt length, join step, leave step, config; None: the full cache): a budget-profile sequence runs at every step
# (so the batch always has rows that evict and rank by attention: one pair of flags, one graph), the others come and
# go; at least two run at every step (a batch of one is a graph of its own), at most four
SEQS = [(20, 0, 200, BUDGET), (9, 0, 150, None), (20, 190, 390, BUDGET),
        (30, 100, 300, FastGenConfig(profile="paper", threshold=0.9, local_ratio=0.2, frequent_ratio=0.2)),
        (14, 140, 330, FastGenConfig("special+punct+local", local_ratio=0.3)), (40, 300, 480, None),
        (20, 380, None, BUDGET), (25, 430, None, FastGenConfig("local+frequent", local_ratio=0.2, frequent_ratio=0.2))]
STEPS = 512


class Driver:
    """Sequences in one paged batch, joining and leaving on SEQS' schedule, fed the same token ids whatever their
    logits (so two drivers stay comparable however close two logits are), stepped by `fn`."""

    def __init__(self, model, fn):
        c = model.cfg
        self.model, self.fn = model, fn
        # a pool that starts small and doubles (growable) as the rows take blocks
        self.pool = KVPool(16, 16, c.head_dim, 4 * c.n_layers * c.n_kv_heads, MAX_LEN, torch.device("cpu"),
                           torch.float32, growable=True)
        self.paged = PagedBatch(self.pool, c.n_layers, c.n_heads, c.n_kv_heads)
        self.free, self.running = [3, 2, 1, 0], {}

    @torch.inference_mode()
    def step(self, t: int, g: torch.Generator) -> torch.Tensor:
        for i, (n, join, leave, cfg) in enumerate(SEQS):
            if leave == t:
                slot, _, _ = self.running.pop(i)
                self.pool.release(self.paged.slot_rows(slot))
                self.free.append(slot)
            if join == t:
                slot, ids = self.free.pop(), torch.randint(3, 97, (n,), generator=g).tolist()
                if cfg is None:
                    caches, kinds = full_caches(self.model, MAX_LEN, paged=self.paged, slot=slot), None
                else:
                    kinds = TokenKinds(VOCAB, MAX_LEN, torch.device("cpu"))
                    kinds.append(ids)
                    caches = fastgen_caches(self.model, kinds, cfg, MAX_LEN, self.paged, slot)
                prefill(self.model, ids, caches)
                self.running[i] = slot, caches, kinds
        members = list(self.running.values())
        tokens = torch.randint(0, 97, (len(members),), generator=g).tolist()
        for (slot, caches, kinds), token in zip(members, tokens):
            if kinds is not None:
                kinds.append([token])
            self.paged.reserve(caches)
        self.paged.set_batch([(slot, caches) for slot, caches, _ in members])
        return self.paged.step(self.model, tokens, [caches[0].length for _, caches, _ in members], self.fn)

    def mirror_matches_device(self):
        """The host's kept counts and holes (its mirror) are the device's, row by row."""
        for slot, caches, _ in self.running.values():
            for c in caches:
                for s in c.stores:
                    rows = c.rows(s.kv_heads)
                    assert self.pool.kept[rows].tolist() == [s.kept] * len(rows)
                    assert self.pool.hole[rows].tolist() == [s.hole] * len(rows)


def test_compiled_step_equals_the_eager_step_over_512_steps(tiny_model_dir):
    """512 steps of a batch of 2-4 sequences (the budget profile, the paper's profile, a fixed special+punct+local
    policy, local+frequent and full caches joining and leaving; the pool doubling twice; rows evicting at nearly every
    step): the compiled step's logits equal the eager step's to 1e-4 (float32; Inductor fuses and orders the sums
    differently, so not bit for bit), every row keeps the same tokens, the host's mirror matches the device, and after
    the first step nothing compiles again: one graph as lengths grow, blocks are allocated, heads evict and
    sequences join and leave."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model = load_model(tiny_model_dir, prepack=False)
    step = CompiledStep(model)
    eager, fast = Driver(model, None), Driver(model, step)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    worst, blocks = 0.0, set()
    for t in range(STEPS):
        want, got = eager.step(t, g1), fast.step(t, g2)
        worst = max(worst, (got - want).abs().max().item())
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m: f"step {t}: {m}")
        blocks.add(fast.pool.n_blocks)
        if t == 0:
            assert step.compiled and counters["stats"]["unique_graphs"] == 1
    assert step.compiled and not step.fell_back
    assert counters["stats"]["unique_graphs"] == 1, "one graph for every step: nothing recompiled"
    assert len(blocks) >= 3, f"the pool doubled twice: {sorted(blocks)}"
    assert torch.equal(eager.pool.bitmap, fast.pool.bitmap), "every row keeps the same tokens"
    for name in ("kept", "hole", "freed"):
        assert torch.equal(getattr(eager.pool, name), getattr(fast.pool, name)), name
    assert (eager.pool.kept[eager.pool.policy != 16] > 0).any()
    for d in (eager, fast):
        d.mirror_matches_device()
    evicted = sum(c.kept_tokens() < c.length * c.n_kv_heads for _, cs, _ in fast.running.values() for c in cs)
    assert evicted >= 2 * model.cfg.n_layers, "the FastGen caches evicted"
    print(f"largest logit difference over {STEPS} steps: {worst:.2e}")


def test_unwritten_slots_are_zero(tiny_model_dir):
    """Masked slots still multiply their values by 0: garbage there (NaN) would poison the output. Under
    deterministic algorithms torch fills uninitialized memory with NaN, so slots a block was handed out with
    unwritten would show."""
    model = load_model(tiny_model_dir)
    torch.use_deterministic_algorithms(True)
    try:
        caches = full_caches(model, 40)
        list(generate(model, PROMPT, caches, 10, ignore_eos=True))
    finally:
        torch.use_deterministic_algorithms(False)
    c = caches[0]
    held = len(c.pool.blocks[c.rows()[0]]) * c.pool.block_size
    k, v, _ = c.pool.gather(torch.tensor(c.rows()), held)
    assert held > c.length and (k[:, c.length :] == 0).all() and (v[:, c.length :] == 0).all()


def test_compile_failure_falls_back(tiny_model_dir, monkeypatch, capsys):
    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("Compiler: cc is not found\nmore detail")
        return run

    monkeypatch.setattr(compiled.torch, "compile", broken)
    model = load_model(tiny_model_dir, prepack=False)
    step = CompiledStep(model)
    got = list(generate(model, PROMPT, full_caches(model, 40), 5, ignore_eos=True, decode=step.decoder))
    packed = load_model(tiny_model_dir)  # what the fallback decodes as: the eager model, packed as load_model packs
    want = list(generate(packed, PROMPT, full_caches(packed, 40), 5, ignore_eos=True))
    assert not step.compiled and step.fell_back and got == want
    assert type(model.layers[0].attn.wqkv) is type(packed.layers[0].attn.wqkv)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tinygen: --compile: torch.compile failed (RuntimeError: Compiler: cc is not found); decoding "
                   "without it"]


def test_generate_takes_the_step_it_is_given(tiny_model_dir):
    model = load_model(tiny_model_dir, prepack=False)
    eager = list(generate(model, PROMPT, full_caches(model, 40), 20, ignore_eos=True))
    step, calls = CompiledStep(model, compile=False), []
    got = list(generate(model, PROMPT, full_caches(model, 40), 20, ignore_eos=True,
                        decode=lambda *a: calls.append(a[3]) or step.decoder(*a)))
    assert got == eager and calls == list(range(len(PROMPT), len(PROMPT) + 19))


@pytest.mark.parametrize("args,fragment", [
    (["--serve"], "--compile is not for --serve"),
    (["--perplexity", "README.md"], "--compile is for --prompt, --prompt-file, --chat and --prompts-file"),
    (["--prompt", "hi", "--policy", "full", "--device", "cuda"], "--compile runs on the CPU only"),
])
def test_cli_compile_bad_combinations(tiny_model_dir, args, fragment):
    r = cli("--model", tiny_model_dir, "--compile", *args)
    assert_one_line_error(r, fragment, code=2)  # every combination is refused before any work starts


def test_cli_compile_generates(chat_model, tmp_path):
    """--compile with FastGen's default (auto, the budget profile): the same answer as without it."""
    out = tmp_path / "stats.json"
    args = ("--model", chat_model, "--prompt", "hi there, how are you", "--max-new-tokens", 12, "--ignore-eos",
            "--policy", "auto", "--stats-json", out)
    r = cli(*args, "--compile", timeout=600)
    assert r.returncode == 0, r.stderr
    stats = json.loads(out.read_text())
    assert stats["compiled"] is True and stats["compile_seconds"] > 0 and stats["generated_tokens"] == 12
    assert "decode step compiled in" in r.stderr
    eager = cli(*args)
    assert eager.returncode == 0 and eager.stdout == r.stdout


def test_a_compiled_chat_answers_as_the_eager_one(tmp_path, default_model_dir):
    """--chat --compile: two turns with the budget profile (the second a chunk after the first's answer and its
    evictions), the same answers as the eager chat, with one graph."""
    from conftest import save_tiny_chat_model

    from tinygen.chat import ChatSession
    from tinygen.sampling import SamplingParams
    from tinygen.tokenizer import Tokenizer

    path = save_tiny_chat_model(tmp_path / "chat", default_model_dir, 256)
    tok = Tokenizer(path, [2])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = []
    for decode in (None, CompiledStep(load_model(path, prepack=False)).decoder):
        model = decode.__self__.model if decode else load_model(path)
        session = ChatSession(model, tok, FastGenConfig(kv_budget=0.5), SamplingParams(), 40, ignore_eos=True,
                              decode=decode)
        texts = []
        for text in ("Name three rivers.", "And three mountains?"):
            pieces = []
            session.turn(text, pieces.append)
            texts.append("".join(pieces))
        out.append((texts, session.seen))
    assert out[0] == out[1]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
