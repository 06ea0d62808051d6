"""The decode step replayed as CUDA graphs (tinygen/graphs.py). On the CPU the same padded static-buffer step runs
eagerly: a batch of 1 to 6 sequences of mixed policies, padded to buckets of 1, 2, 4 and 8 with the spare slot,
gives every sequence the answer it gets without graphs, and the spare rows and the null block are left as they were.
On a GPU the graphs are captured and replayed: equal to the eager step for every policy and bucket, and 64 replays
under torch.cuda.set_sync_debug_mode("error")."""
import pytest
import torch

from tinygen.batch import BatchRunner
from tinygen.fastgen.policy import FastGenConfig
from tinygen.generate import full_caches, generate
from tinygen.graphs import GraphStep, bucket
from tinygen.loader import load_model
from tinygen.sampling import SamplingParams

CFGS = [FastGenConfig("full"), FastGenConfig(kv_budget=0.5), FastGenConfig(profile="paper", threshold=0.9),
        FastGenConfig("local+frequent"), FastGenConfig("special+punct+local"), FastGenConfig(kv_budget=0.8)]
PROMPTS = [list(range(10 + i, 28 + 3 * i)) for i in range(6)]  # 18 to 33 tokens
LIMITS = [30, 12, 25, 7, 18, 3]  # answers that end at different steps: the batch shrinks through the buckets


def answers(model, tok, device, cuda_graphs: bool, n: int = 6) -> tuple[dict, BatchRunner]:
    runner = BatchRunner(model, tok, FastGenConfig("full"), SamplingParams(), 30, n, ignore_eos=True,
                         cuda_graphs=cuda_graphs)
    seqs = [runner.submit(i, PROMPTS[i], LIMITS[i], cfg=CFGS[i]) for i in range(n)]
    while not runner.idle:
        runner.step()
    return {s.index: (s.out, s.kept_fraction) for s in seqs}, runner


class Tok:
    """The tiny model's 97 ids: 0 and 1 special, 3-9 punctuation (FastGen's kinds), no end of answer."""
    eos_ids, special_ids, vocab_size = frozenset(), {0, 1}, 97

    def token_text(self, i):
        return "." if 3 <= i < 10 else "a"


def test_buckets():
    assert [bucket(b) for b in (1, 2, 3, 5, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]


@pytest.mark.parametrize("n", [6, 3])
def test_padded_buckets_give_the_answers_without_graphs(tiny_model_dir, n):
    """6 (then 3) sequences, each its own policy, leaving at different steps: the batch runs as 6, 5, 4, 3, 2 and 1
    sequences, replayed in buckets of 8, 8, 4, 4, 2 and 1 padded with the spare slot; each answer and kept share equal
    the run without graphs; the spare rows end empty, the null block zero."""
    model = load_model(tiny_model_dir)
    want, _ = answers(model, Tok(), "cpu", False, n)
    got, runner = answers(model, Tok(), "cpu", True, n)
    assert got == want
    graphs = runner.step_fn.graphs
    assert {k[0] for k in graphs} >= ({8, 4, 2, 1} if n == 6 else {4, 2, 1})  # the buckets it replayed
    pool, c = runner.pool, model.cfg
    spare = slice(n * c.n_layers * c.n_kv_heads, None)
    assert not pool.kept[spare].any() and not pool.bitmap[spare].any() and not pool.tables[spare].any()
    assert not pool.k[0].any() and not pool.v[0].any() and (pool.pos[0] == -1).all() and not pool.score[0].any()
    pool.check()


def test_a_sequence_on_its_own_replays_bucket_one(tiny_model_dir):
    model = load_model(tiny_model_dir)
    prompt = [3, 17, 5, 40, 22, 9, 61, 2, 33, 7, 12]
    want = list(generate(model, prompt, full_caches(model, 60), 40, ignore_eos=True))
    step = GraphStep(model, capture=False)
    assert list(generate(model, prompt, full_caches(model, 60), 40, ignore_eos=True, decode=step.decoder)) == want
    assert [k[0] for k in step.graphs] == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_replay_the_eager_step(tiny_model_dir):
    """Captured and replayed on the GPU: the same answers as the eager step for every policy, through buckets 8 to
    1; then 64 replayed steps under set_sync_debug_mode("error") (the step reads nothing back)."""
    model, tok = load_model(tiny_model_dir, device="cuda"), Tok()
    want, _ = answers(model, tok, "cuda", False)
    got, runner = answers(model, tok, "cuda", True)
    assert got == want and not runner.step_fn.failed
    assert all(g[2] is not None for g in runner.step_fn.graphs.values()), "captured"
    runner = BatchRunner(model, tok, FastGenConfig(kv_budget=0.5), SamplingParams(), 100, 4, ignore_eos=True,
                         cuda_graphs=True)
    for i in range(4):
        runner.submit(i, PROMPTS[i], 100)
    runner.step(), runner.step()  # admission and prefill (eager), then the first step records the graph
    members = runner.running
    runner.paged.set_batch([(s.slot, s.caches) for s in members])
    tokens = torch.tensor([s.token for s in members], device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(64):
            runner._reserve(list(members))
            tokens = runner.paged.step(model, tokens, [s.pos for s in members], runner.step_fn).argmax(-1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not runner.step_fn.failed and members[0].pos == len(PROMPTS[0]) + 66
