"""The decode step reads nothing from the device on the host: every decision it takes (how many slots a row attends
over, whether it evicts, where the new token goes) is host arithmetic on host state, so a step never waits for the
device. Checked for batch 1 (a batch of one) and a batch mixing policies, with evictions along the way: inside the
step, `.item()`, `.tolist()`, `bool()`, `int()`, `float()` of a tensor raise (`NoHostReads`). On a GPU the same steps
run under `torch.cuda.set_sync_debug_mode("error")`, which also catches syncs inside torch's own ops.
Reading the sampled ids after the step is the one host sync a decode step has (generate.py, batch.py)."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from tinygen.batch import BatchRunner
from tinygen.fastgen.cache import fastgen_caches
from tinygen.fastgen.kinds import TokenKinds
from tinygen.fastgen.policy import PUNCT, SPECIAL, FastGenConfig
from tinygen.generate import decode_step, full_caches, prefill
from tinygen.loader import load_model
from tinygen.sampling import SamplingParams
from tinygen.tokenizer import Tokenizer

READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"}
POLICIES = [FastGenConfig("full"), FastGenConfig(kv_budget=0.5, observation=8),
            FastGenConfig(profile="paper", threshold=0.9), FastGenConfig("local+frequent", local_ratio=0.2,
                                                                         frequent_ratio=0.2),
            FastGenConfig("special+punct+local", local_ratio=0.3)]
IDS = ["full", "budget", "paper", "local+frequent", "special+punct+local"]
ON_GPU = torch.cuda.is_available()


class NoHostReads(TorchFunctionMode):
    """Turns a tensor's value read on the host into an error."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            raise AssertionError(f"the decode step read a device value on the host ({func.__name__})")
        return func(*args, **(kwargs or {}))


def test_the_mode_catches_reads():
    t = torch.ones(2)
    for read in (lambda: t.sum().item(), lambda: t.tolist(), lambda: bool(t[0]), lambda: int(t[0])):
        with NoHostReads(), pytest.raises(AssertionError, match="read a device value"):
            read()


def caches_for(model, cfg, ids, max_len):
    if cfg.policy == "full":
        return full_caches(model, max_len), None
    vocab = [SPECIAL if i < 3 else PUNCT if i % 7 == 0 else 0 for i in range(model.cfg.vocab_size)]  # protected
    kinds = TokenKinds(vocab, max_len, model.embed.weight.device)  # kinds: the budgets' device prefix counts
    kinds.append(ids)
    return fastgen_caches(model, kinds, cfg, max_len), kinds


@pytest.mark.parametrize("cfg", POLICIES, ids=IDS)
def test_a_batch_1_step_reads_nothing(tiny_model_dir, cfg):
    """40 decode steps after a 30-token prompt, each under NoHostReads; the compressed caches evict as they go."""
    model = load_model(tiny_model_dir, device="cuda" if ON_GPU else "cpu")
    ids = torch.randint(3, model.cfg.vocab_size, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    caches, kinds = caches_for(model, cfg, ids, 80)
    token = prefill(model, ids, caches).argmax(-1, keepdim=True)
    for pos in range(30, 70):
        if kinds is not None:
            kinds.append([int(token)])  # the host knows the token it just read
        with NoHostReads():
            logits = decode_step(model, token, caches, pos)
        token = logits.argmax(-1, keepdim=True)
    if cfg.policy != "full":
        assert sum(c.kept_tokens() for c in caches) < 70 * model.cfg.n_layers * model.cfg.n_kv_heads  # evicted


def test_a_mixed_batch_step_reads_nothing(chat_model):
    """The batch's forward (every policy above in one batch, each sequence at its own position) under NoHostReads,
    step after step: only reading the sampled ids, after the forward, touches the host."""
    model = load_model(chat_model, device="cuda" if ON_GPU else "cpu")
    tok = Tokenizer(chat_model, model.cfg.eos_token_ids)
    runner = BatchRunner(model, tok, FastGenConfig("full"), SamplingParams(), 30, len(POLICIES), ignore_eos=True)
    for i, cfg in enumerate(POLICIES):
        runner.submit(i, list(range(100 + i, 125 + 3 * i)), cfg=cfg)
    forward, steps = runner._forward, []

    def checked(seqs, tokens):
        if len(seqs) == len(POLICIES):  # the batch's step (a sequence's own prefill may read: it profiles)
            steps.append(len(seqs))
            with NoHostReads():
                return forward(seqs, tokens)
        return forward(seqs, tokens)
    runner._forward = checked
    while not runner.idle:
        runner.step()
    assert len(steps) >= 25 and runner.stats.max_running == len(POLICIES)


@pytest.mark.skipif(not ON_GPU, reason="no CUDA GPU")
@pytest.mark.parametrize("cfg", POLICIES, ids=IDS)
def test_cuda_steps_never_sync(tiny_model_dir, cfg):
    """On CUDA: 32 decode steps under torch.cuda.set_sync_debug_mode("error")."""
    model = load_model(tiny_model_dir, device="cuda")
    ids = list(range(3, 33))
    caches, kinds = caches_for(model, cfg, ids, 80)
    token = prefill(model, ids, caches).argmax(-1, keepdim=True)
    for pos in range(30, 62):
        if kinds is not None:
            kinds.append([int(token)])
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits = decode_step(model, token, caches, pos)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        token = logits.argmax(-1, keepdim=True)
