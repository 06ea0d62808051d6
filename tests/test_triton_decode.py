"""The Triton ragged decode kernel against its PyTorch reference, and the reference against dense attention.

Without a GPU the kernels run in Triton's interpreter on CPU tensors. Triton picks interpreter or compiler when
`@triton.jit` runs, i.e. when tinygen.kernels.decode_attention is imported, from TRITON_INTERPRET (and reads it
again at import and launch time): the `kernels` fixture sets it for this module's tests and puts it back after. With a GPU the module is
compiled for real (run with TRITON_INTERPRET unset, as bench/gpu_check.sh does) and the tensors live on CUDA.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from tinygen.attention import dense_attention, grouped_decode_attention, ragged_decode_reference
from tinygen.cache import FullCache
from tinygen.kernels import triton_available

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
MODULE = "tinygen.kernels.decode_attention"


@pytest.fixture(scope="module")
def kernels():
    if not triton_available():
        pytest.skip("triton is not installed")
    if ON_GPU:
        yield importlib.import_module(MODULE)
        return
    # Triton reads TRITON_INTERPRET when it is imported (its own library functions are decorated then), when a
    # kernel is decorated, and at launches (lazy imports check it): so it stays set for this module's tests.
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    mod = importlib.import_module(MODULE)
    if not mod.INTERPRETED:  # imported earlier without the interpreter: decorate the kernels again
        mod = importlib.reload(mod)
    # triton 3.5.1's interpreter turns scalars into Python ints with int() on a 1-element array, which numpy >= 2.4
    # refuses (triton-lang/triton#9171, fixed after 3.5.1): any loop bound read from memory fails. Apply the
    # upstream fix while this module runs.
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch(tensor):
        original(tensor)
        tensor.__index__ = lambda self: int(self.handle.data.squeeze())

    interpreter._patch_lang_tensor = patch
    # If triton was imported before the variable was set (torch._dynamo imports it, e.g. once a test has loaded
    # transformers), its own library (tl.cdiv, tl.sum, ...) was decorated for the compiler and refuses to run in
    # the interpreter: interpret those too while this module runs (one wrapper per function, so identities hold).
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    wrappers, swapped = {}, []
    for namespace in (tl, tl.standard):
        for name, f in list(vars(namespace).items()):
            if isinstance(f, JITFunction):
                swapped.append((namespace, name, f))
                setattr(namespace, name, wrappers.setdefault(f, interpreter.InterpretedFunction(f.fn)))
    yield mod
    for namespace, name, f in swapped:
        setattr(namespace, name, f)
    interpreter._patch_lang_tensor = original
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old


def ragged_case(lengths, group, head_dim, dtype, slack=7, seed=0):
    """Rows packed one after another with `slack` unused rows between them (filled with junk the kernel must not
    read), query heads in row order. Returns q, k_buf, v_buf and the int32 tables on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    starts, at = [], slack
    for n in lengths:
        starts.append(at)
        at += n + slack
    k = torch.randn(at, head_dim, generator=g)
    v = torch.randn(at, head_dim, generator=g)
    junk = torch.ones(at, dtype=torch.bool)
    for s0, n in zip(starts, lengths):
        junk[s0 : s0 + n] = False
    k[junk], v[junk] = 1e4, float("nan")  # would show in any output that read them
    q = torch.randn(len(lengths) * group, head_dim, generator=g)
    tables = [torch.tensor(t, dtype=torch.int32, device=DEVICE)
              for t in (lengths, starts, [r * group for r in range(len(lengths))])]
    to = lambda t: t.to(DEVICE, dtype)
    return (to(q), to(k), to(v), *tables)


def check_against_reference(kernels, lengths, group, head_dim, dtype, max_splits):
    q, k, v, lengths_t, starts, q_first = ragged_case(lengths, group, head_dim, dtype)
    capacity = max(lengths)
    out, lse = kernels.ragged_decode_attention(q, k, v, lengths_t, starts, q_first, group, capacity,
                                               max_splits=max_splits)
    score = kernels.ragged_group_probs(q, k, lengths_t, starts, q_first, group, capacity, lse,
                                       torch.zeros(k.shape[0], device=DEVICE))
    ref_out, ref_lse, ref_score = ragged_decode_reference(q, k, v, lengths_t, starts, q_first, group)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16: p is rounded to bfloat16 before p @ V
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(score, ref_score, atol=1e-5, rtol=1e-4)


# lengths: 1, around the 32-key tile, around split boundaries (max_splits 3: split lengths round up to tiles, so
# some rows run fewer splits than the grid has), and long; all mixed in one launch, as mixed policy stores would be.
MIXED = [1, 2, 31, 32, 33, 64, 65, 96, 97, 191, 700]


@pytest.mark.parametrize("group,head_dim,dtype", [
    (1, 64, torch.float32), (3, 128, torch.bfloat16), (4, 64, torch.bfloat16), (4, 128, torch.float32),
    (8, 64, torch.float32), (8, 128, torch.bfloat16)])
def test_triton_ragged_decode_matches_reference(kernels, group, head_dim, dtype):
    check_against_reference(kernels, MIXED, group, head_dim, dtype, max_splits=3)


@pytest.mark.parametrize("max_splits", [1, 5, 64])
def test_triton_split_counts(kernels, max_splits):
    """One split per row, a few, and more splits than a row has tiles (the extra programs exit at once)."""
    check_against_reference(kernels, [1, 33, 160, 417], 4, 64, torch.float32, max_splits)


def test_triton_long_row_with_default_splits(kernels):
    check_against_reference(kernels, [2048, 5], 2, 64, torch.bfloat16, max_splits=None)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log")  # the interpreter's numpy, for log(0)
def test_triton_float16_and_empty_row(kernels):
    """An empty row writes zeros and lse = -inf, and leaves its neighbours alone."""
    q, k, v, lengths, starts, q_first = ragged_case([40, 0, 3], 2, 64, torch.float16)
    out, lse = kernels.ragged_decode_attention(q, k, v, lengths, starts, q_first, 2, 40, max_splits=4)
    ref_out, ref_lse, _ = ragged_decode_reference(q, k, v, lengths, starts, q_first, 2)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-3, rtol=2e-3)
    assert (out[2:4] == 0).all() and torch.isneginf(lse[2:4]).all()
    torch.testing.assert_close(lse[[0, 1, 4, 5]], ref_lse[[0, 1, 4, 5]])


def test_triton_reference_equals_dense_attention():
    """The reference itself, against dense attention over rows padded to one length and masked to each row's."""
    lengths, group, head_dim = [1, 17, 64, 130], 3, 32
    q, k, v, lengths_t, starts, q_first = (t.cpu() for t in ragged_case(lengths, group, head_dim, torch.float32))
    out, lse, score = ragged_decode_reference(q, k, v, lengths_t, starts, q_first, group)
    L = max(lengths)
    padded = lambda buf: torch.stack([torch.cat([buf[s : s + n], torch.zeros(L - n, head_dim)])
                                      for s, n in zip(starts.tolist(), lengths)])  # (rows, L, head_dim)
    mask = (torch.arange(L) < torch.tensor(lengths)[:, None]).repeat_interleave(group, 0)[:, None]  # (heads, 1, L)
    dense_out, probs = dense_attention(q[:, None], padded(k), padded(v), mask)
    torch.testing.assert_close(out, dense_out[:, 0], atol=1e-6, rtol=1e-5)
    mean = probs[:, 0].view(len(lengths), group, L).mean(1)
    for r, (s, n) in enumerate(zip(starts.tolist(), lengths)):
        torch.testing.assert_close(score[s : s + n], mean[r, :n])
        logits = q[r * group : (r + 1) * group] @ k[s : s + n].T * head_dim**-0.5
        torch.testing.assert_close(lse[r * group : (r + 1) * group], torch.logsumexp(logits, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_full_cache_decode(kernels, dtype):
    """The full cache's kernel path (equal lengths, rows at h * capacity) against its PyTorch decode step, across a
    growth of the cache (36 rows at first: the kernel's row tables must follow the new buffers)."""
    n_kv, groups, head_dim, max_len, prompt, steps = 2, 4, 64, 96, 20, 24
    g = torch.Generator().manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype)
    caches = {p: FullCache(n_kv, head_dim, max_len, torch.device(DEVICE), dtype, paths=("blocks", p))
              for p in ("torch", "triton")}
    prefill = rand(n_kv * groups, prompt, head_dim), rand(n_kv, prompt, head_dim), rand(n_kv, prompt, head_dim)
    for cache in caches.values():
        cache.attend(*prefill)
    for step in range(steps):
        q, k, v = rand(n_kv * groups, 1, head_dim), rand(n_kv, 1, head_dim), rand(n_kv, 1, head_dim)
        want, got = (caches[p].attend(q, k, v) for p in ("torch", "triton"))
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    assert caches["triton"].k.shape[1] > prompt + 16, "the cache grew"
    keys = caches["triton"].k[:, : prompt + steps]
    torch.testing.assert_close(grouped_decode_attention(q, keys, caches["triton"].v[:, : prompt + steps],
                                                        head_dim**-0.5).float(), want.float(), atol=tol, rtol=tol)


def test_triton_kernels_compile_for_sm90_without_gpu():
    """Compile every kernel to a cubin for an H100 (sm_90) with triton's bundled ptxas: catches what the
    interpreter does not check (types, layouts, shared memory) on a machine without a GPU."""
    if not triton_available():
        pytest.skip("triton is not installed")
    script = f"""
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import {MODULE} as m
target = GPUTarget("cuda", 90, 32)
def compile(fn, types, consts):
    names = fn.arg_names
    sig = {{n: ("constexpr" if n in consts else types.get(n, "i32")) for n in names}}
    # as a launch specializes them: pointers and strides divisible by 16
    attrs = {{(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n][0] == "*" or "stride" in n}}
    src = ASTSource(fn=fn, signature=sig, constexprs={{(names.index(k),): v for k, v in consts.items()}}, attrs=attrs)
    return triton.compile(src, target=target)
for kv, group, head_dim in (("*bf16", 4, 64), ("*fp32", 8, 128), ("*fp16", 3, 128)):
    meta = dict(KV=m.TL_DTYPES[dict(bf16=torch.bfloat16, fp32=torch.float32, fp16=torch.float16)[kv[1:]]],
                GROUP=group, BLOCK_H=16, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK=m.BLOCK_N,
                PRECISION="ieee" if kv == "*fp32" else "tf32", UPCAST=False)
    ptrs = dict(Q=kv, k_rows="*i64", v_rows="*i64", score_rows="*i64", lengths="*i32", q_first="*i32",
                mid_o="*fp32", mid_lse="*fp32", Out=kv, Lse="*fp32", scale="fp32")
    stage1 = compile(m._stage1, ptrs, meta)
    # K/V rows come from a pointer table: the alignment hint must still let tiles load as from a pointer argument
    assert "cp.async" in stage1.asm["ptx"] or "ld.global.v4" in stage1.asm["ptx"], "K/V tile loads not vectorized"
    compile(m._stage2, ptrs, dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK=m.BLOCK_N))
    assert "cubin" in compile(m._group_probs, ptrs, meta).asm
print("compiled")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
