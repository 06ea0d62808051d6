"""The CUDA paths: device strings, the attention-path dispatch, SDPA prefill against the block-wise prefill (on any
machine), and, where a GPU is present, whole models on CUDA against the CPU."""
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from tinygen.attention import attention_paths
from tinygen.cache import FullRows
from tinygen.kvpool import KVPool
from tinygen.paged import PagedBatch
from tinygen.errors import TinygenError
from tinygen.generate import decode_step, full_caches, prefill
from tinygen.kernels import triton_available
from tinygen.loader import load_model, resolve_device

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def test_cuda_device_strings(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:0:1", "CUDA"):
        with pytest.raises(TinygenError, match="unknown device"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(TinygenError, match="no CUDA GPU"):
            resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(TinygenError, match=r"no such GPU, this machine has 2 \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("device", ["cuda:0", "cuda:99"])
def test_cuda_bad_device_index_is_one_line_error(tiny_model_dir, device):
    """Without a GPU both fail for want of one; with one, cuda:99 is out of range (cuda:0 then works)."""
    if device == "cuda:0" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--model", str(tiny_model_dir), "--prompt", "hi",
                        "--device", device], capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert ("no such GPU" if torch.cuda.is_available() else "no CUDA GPU") in lines[0]


def test_cuda_attention_paths():
    assert attention_paths(torch.device("cpu")) == ("blocks", "torch")
    assert attention_paths(torch.device("cuda")) == ("sdpa", "triton" if triton_available() else "torch")


@pytest.mark.parametrize("groups", [1, 3])
def test_cuda_sdpa_prefill_matches_blockwise(groups):
    """The CUDA prefill path (torch SDPA), run here on the CPU, against the block-wise one: a prompt from an empty
    cache (is_causal) and a second chunk after it (an explicit mask)."""
    n_kv, head_dim, max_len = 2, 16, 160
    g = torch.Generator().manual_seed(0)
    chunks = [[torch.randn(n_kv * groups if i == 0 else n_kv, T, head_dim, generator=g) for i in range(3)]
              for T in (100, 37)]
    caches = []
    for path in ("blocks", "sdpa"):
        paged = PagedBatch(KVPool(64, 16, head_dim, n_kv, max_len, torch.device("cpu"), torch.float32), 1,
                           n_kv * groups, n_kv)
        caches.append(FullRows(paged, 0, 0, n_kv))
        caches[-1].prefill_path = path
    for q, k, v in chunks:
        want, got = (c.attend(q, k, v) for c in caches)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_gpu
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-3), ("bfloat16", 0.15)])
def test_cuda_model_matches_cpu(tiny_model_dir, dtype, tol):
    """Prefill (SDPA) and 20 decode steps (the Triton kernel where triton is installed) on CUDA against float32
    on the CPU, teacher-forced along the same tokens."""
    cpu = load_model(tiny_model_dir, "cpu", "float32")
    gpu = load_model(tiny_model_dir, "cuda", dtype)
    prompt = list(range(3, 60))
    caches = {m: full_caches(m, 96) for m in (cpu, gpu)}
    assert caches[gpu][0].paged.kernel == (attention_paths(torch.device("cuda"))[1] == "triton")
    want, got = prefill(cpu, prompt, caches[cpu]), prefill(gpu, prompt, caches[gpu])
    for step in range(20):
        torch.testing.assert_close(got.float().cpu(), want, atol=tol, rtol=tol)
        token = int(want.argmax())
        pos = len(prompt) + step
        want = decode_step(cpu, torch.tensor([token]), caches[cpu], pos)
        got = decode_step(gpu, torch.tensor([token], device="cuda"), caches[gpu], pos)
