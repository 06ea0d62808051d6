"""The sampler (tinygen/sampling.py): every row of a batch at once, the right distribution under temperature, top-k
and top-p, reproducible with a seed, a sequence's draws independent of its batch-mates, and no host sync."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from tinygen.batch import BatchRunner
from tinygen.fastgen.policy import FastGenConfig
from tinygen.generate import full_caches, generate
from tinygen.loader import load_model
from tinygen.sampling import SamplingParams, sample

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.3, -0.5, -1.0])


def expected(logits, T, top_k=0, top_p=1.0):
    """softmax(logits / T) over the tokens top-k and top-p keep, from the definitions (one row, in Python)."""
    z = (logits / T).tolist()
    order = sorted(range(len(z)), key=lambda i: -z[i])
    keep = order[:top_k] if top_k else order
    e = {i: torch.tensor(z[i]).exp().item() for i in keep}
    total, cum, kept = sum(e.values()), 0.0, []
    for i in keep:  # a token stays while the tokens before it hold less than top_p
        if cum >= top_p:
            break
        kept.append(i)
        cum += e[i] / total
    p = torch.zeros(len(z), dtype=torch.float64)
    p[kept] = torch.tensor([e[i] for i in kept], dtype=torch.float64)
    return p / p.sum()


@pytest.mark.parametrize("T,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 4, 1.0), (1.0, 0, 0.8),
                                           (0.8, 5, 0.9)])
def test_draws_follow_the_restricted_softmax(T, top_k, top_p):
    """40,000 draws (rows of one call) on six tokens: frequencies match softmax(logits / T) restricted by top-k and
    top-p (chi-square below its 0.1% critical value), and a masked token is never drawn."""
    n = 40_000
    g = torch.Generator().manual_seed(0)
    ids = sample(LOGITS.expand(n, -1), SamplingParams(T, top_k, top_p), g)
    assert ids.shape == (n,) and ids.dtype == torch.long
    counts = torch.bincount(ids, minlength=6).double()
    p = expected(LOGITS, T, top_k, top_p)
    assert torch.all(counts[p == 0] == 0)
    kept = p > 0
    chi2 = ((counts[kept] - n * p[kept]) ** 2 / (n * p[kept])).sum().item()
    critical = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}[int(kept.sum()) - 1]
    assert chi2 < critical, (chi2, counts.tolist(), (n * p).tolist())


def test_top_k_and_top_p_masks_per_row():
    """Hand-made rows in one call, each its own mask: top-k keeps each row's k largest; top-p drops a token once the
    tokens before it reach p (the first always stays)."""
    rows = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]]).log_softmax(-1)  # any shift: same softmax
    g = torch.Generator().manual_seed(1)

    def seen(params, logits):  # the ids 500 draws of one row give
        return set(sample(logits.expand(500, -1), params, g).tolist())
    assert seen(SamplingParams(1.0, top_k=2), rows[:1]) == {0, 1}
    assert seen(SamplingParams(1.0, top_k=2), rows[1:]) == {2, 3}
    both = sample(rows.repeat(500, 1), SamplingParams(1.0, top_k=2), g).view(500, 2)
    assert set(both[:, 0].tolist()) == {0, 1} and set(both[:, 1].tolist()) == {2, 3}
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert seen(SamplingParams(1.0, top_p=0.75), probs) == {0, 1}  # before token 2: 0.8 >= 0.75
    assert seen(SamplingParams(1.0, top_p=0.81), probs) == {0, 1, 2}
    assert seen(SamplingParams(1.0, top_p=0.5), probs) == {0}  # before token 1: 0.5 >= 0.5
    assert seen(SamplingParams(1.0, top_p=0.01), probs) == {0}


def test_greedy_is_argmax_bit_for_bit():
    x = torch.randn(5, 97, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sample(x, SamplingParams()), x.argmax(dim=-1))
    assert torch.equal(sample(x[3], SamplingParams()), x[3].argmax(dim=-1, keepdim=True))  # (vocab,) -> (1,)


def test_a_seed_reproduces_and_each_row_draws_from_its_own_generator():
    """The same seed draws the same ids; with one generator per row, a row draws what it draws alone with a
    generator of the same seed, whoever its batch-mates are (10 steps)."""
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(1.0, top_k=30, top_p=0.95)
    draw = lambda seed: sample(x, params, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(4), draw(4)) and not all(torch.equal(draw(4), draw(s)) for s in range(5, 9))
    batch = [torch.Generator().manual_seed(s) for s in (5, 6, 5)]
    alone = [torch.Generator().manual_seed(s) for s in (5, 6, 5)]
    for _ in range(10):
        together = sample(x, params, batch)
        apart = torch.cat([sample(x[i], params, alone[i]) for i in range(3)])
        assert torch.equal(together, apart)


def host_syncs(fn):
    """Runs fn under the CPU profiler: its result and how many ops read a tensor back to the host (.item(), int(),
    multinomial's checks: aten::_local_scalar_dense, which a CUDA device makes a sync)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")


@pytest.mark.parametrize("params", [SamplingParams(0.8), SamplingParams(1.0, top_k=20, top_p=0.9)])
def test_sampling_reads_nothing_back(params):
    x = torch.randn(4, 97)
    _, n = host_syncs(lambda: sample(x, params, torch.Generator().manual_seed(0)))
    assert n == 0
    _, n = host_syncs(lambda: sample(x, params, [torch.Generator().manual_seed(i) for i in range(4)]))
    assert n == 0
    _, n = host_syncs(lambda: sample(x[0], params, None))
    assert n == 0


class Tok:
    eos_ids = frozenset()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def test_generate_reads_one_token_per_step(tiny):
    """A decode step of generate at temperature > 0: one read, its token."""
    params = SamplingParams(0.9, top_k=40, top_p=0.95, seed=3)
    with torch.inference_mode():
        it = generate(tiny, list(range(3, 12)), full_caches(tiny, 64), 30, params, ignore_eos=True)
        next(it)  # prefill
        steps, n = host_syncs(lambda: sum(1 for _ in zip(range(12), it)))
    assert steps == 12 and n == steps


def test_batch_step_samples_every_row_without_a_sync_and_as_alone(tiny):
    """One BatchRunner decode step at temperature > 0 reads nothing back but its ids (`.tolist()`, which the
    profiler does not list as an op); each sequence of a batch of 3 answers as it does alone with the same seed."""
    params = SamplingParams(1.0, top_k=50, seed=11)
    prompts = [(i, list(range(3 + i, 9 + 2 * i))) for i in range(3)]
    syncs = []

    def run(batch):
        runner = BatchRunner(tiny, Tok(), FastGenConfig("full"), params, 16, batch)
        step = runner._step

        def counted(running):
            ids, n = host_syncs(lambda: step(running))
            syncs.append(n)
            return ids
        runner._step = counted
        done = {}
        runner.run(prompts, lambda s: done.__setitem__(s.index, list(s.out)))
        return [done[i] for i in range(3)]

    together = run(3)
    assert syncs and set(syncs) == {0}
    assert together == [run(1)[i] for i in range(3)]
    assert len({tuple(x) for x in together}) == 3


def test_a_tiny_temperature_is_greedy_not_nan():
    """--temperature 1e-45: logits / T overflows to inf unless shifted first; the draw must be the argmax."""
    logits = torch.randn(4, 50) * 10
    ids = sample(logits, SamplingParams(temperature=1e-45, seed=0), torch.Generator().manual_seed(0))
    assert torch.equal(ids, logits.argmax(dim=-1))
