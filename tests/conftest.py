import math
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_MODEL = ROOT / "weights" / "SmolLM2-135M-Instruct"
EVAL = ROOT.parent / "shared" / "eval"

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))
DEVICES = ["cpu", CUDA]
# For tests of the Triton kernels: without a GPU they run in Triton's interpreter on CPU tensors; with one, Triton
# compiles them for real, and compiled kernels take CUDA tensors only, so the CPU case is left to GPU-less machines.
TRITON_DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="compiled Triton "
                               "takes CUDA tensors; the CPU case runs in the interpreter where there is no GPU")), CUDA]


def tiny_hf_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=10000.0,
              rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return LlamaConfig(**kw)


def save_tiny_model(path: Path, seed: int = 0, **overrides):
    """A random-weight HF LlamaForCausalLM saved as safetensors; returns the HF model (float32, eval)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    hf = LlamaForCausalLM(tiny_hf_config(**overrides)).eval()
    with torch.no_grad():  # HF initialises norms to 1: perturb them so a swapped norm would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(path, safe_serialization=True)
    return hf


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_model(path)
    return path


@pytest.fixture(scope="session")
def default_model_dir():
    if not (DEFAULT_MODEL / "model.safetensors").is_file():
        pytest.skip("default weights not prepared (run `make weights`)")
    return DEFAULT_MODEL


def save_tiny_chat_model(path: Path, default_model_dir: Path, context: int) -> Path:
    """A tiny random model with the default tokenizer (vocabulary-sized embedding) and `context` positions."""
    save_tiny_model(path, vocab_size=49152, max_position_embeddings=context, bos_token_id=1, eos_token_id=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory, default_model_dir):
    """A tiny random chat model with a 64-token context, fast to load."""
    return save_tiny_chat_model(tmp_path_factory.mktemp("tinychat"), default_model_dir, 64)


def interruptible():
    """preexec_fn for a child that must take Ctrl-C even when the test run itself was started with SIGINT ignored
    (a background job): Python installs its KeyboardInterrupt handler only where SIGINT is not ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def assert_one_line_error(result, *fragments, code=None):
    """A command's bad-input failure: exit status `code` (any non-zero if None), one `error: ` line on stderr that
    holds every fragment, no traceback."""
    if code is None:
        assert result.returncode != 0, result.stderr
    else:
        assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def kept_set(option, key: torch.Tensor, L: int) -> torch.Tensor:
    """(L,) bool: what a budget-profile option keeps, from the definitions: the last w tokens, then the k
    best-ranked older ones (ties: the earlier position)."""
    from tinygen.fastgen.policy import FULL, LOCAL

    if option.policy & FULL:
        return torch.ones(L, dtype=torch.bool)
    w = math.ceil(option.local_ratio * L) if option.policy & LOCAL else 0
    k = min(L - w, math.ceil(option.frequent_ratio * L))
    keep = torch.zeros(L, dtype=torch.bool)
    keep[L - w :] = True
    older = sorted(range(L - w), key=lambda j: (-float(key[j]), j))
    keep[older[:k]] = True
    return keep


def decode_one(cache, token: int, q, k, v):
    """One decode step of a one-layer cache running alone in its batch, through the batch's step driven layer by
    layer (step.plan, step.attend): q (n_heads, 1, head_dim), k/v (n_kv_heads, 1, head_dim) -> (n_heads, 1,
    head_dim). Feed the token to the cache's kinds first, as a decode loop does."""
    paged = cache.paged
    paged.set_batch([(cache.slot, [cache])])
    paged.reserve([cache])
    paged.begin_layers([token], [cache.length])
    return paged.attend_layer(0, q[None], k[None], v[None])[0]
