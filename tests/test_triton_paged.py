"""The paged Triton decode kernel against its PyTorch reference, and the reference against dense attention.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: the `kernels` fixture sets TRITON_INTERPRET
around the import of tinygen.kernels.paged_attention (Triton reads it when it is imported, when a kernel is
decorated, and at launches) and puts it back after. With a GPU the module is compiled for real and the tensors live on CUDA.
"""
import importlib
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from tinygen.kernels import triton_available

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
MODULE = "tinygen.kernels.paged_attention"


@pytest.fixture(scope="module")
def kernels():
    if not triton_available():
        pytest.skip("triton is not installed")
    if ON_GPU:
        yield importlib.import_module(MODULE)
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    mod = importlib.import_module(MODULE)
    if not mod.INTERPRETED:  # imported earlier without the interpreter: decorate the kernels again
        mod = importlib.reload(mod)
    # triton 3.5.1's interpreter turns scalars into Python ints with int() on a 1-element array, which numpy >= 2.4
    # refuses (triton-lang/triton#9171, fixed after 3.5.1): loop bounds read from memory fail. The upstream fix:
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch(tensor):
        original(tensor)
        tensor.__index__ = lambda self: int(self.handle.data.squeeze())

    interpreter._patch_lang_tensor = patch
    # triton imported before the variable was set (torch._dynamo imports it) decorated its own library for the
    # compiler: interpret those functions too while this module runs.
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


def paged_case(lengths, groups, head_dim, dtype, block_size, seed=0, spare=5, share=False):
    """A pool whose rows own shuffled, non-contiguous blocks, plus `spare` blocks nobody owns (NaN: any read of them
    shows). Slots past a row's length in its last block hold large junk (1e4) that would show in any output that
    attended them. The step's rows are a shuffled selection of the pool's rows (tables indexed by the caller).
    share: the first two rows of the pool (both longer than one block) share their first block. Returns
    q (P, groups, head_dim), k_pool, v_pool, tables (P, max_blocks), lengths (P,), score_pool, on DEVICE."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lengths]
    n_blocks = sum(need) + spare
    ids = list(range(1, n_blocks + 1))
    rng.shuffle(ids)
    max_blocks = max(need) + 2  # unused entries: the null block
    tables = torch.zeros(len(lengths), max_blocks, dtype=torch.int32)
    k = torch.full((n_blocks + 1, block_size, head_dim), float("nan"))
    v = k.clone()
    k[0] = v[0] = 0.0  # the null block
    for p, nb in enumerate(need):
        own = [ids.pop() for _ in range(nb)]
        if share and p == 1:
            own[0] = tables[0, 0].item()
        tables[p, :nb] = torch.tensor(own)
        k[own] = torch.randn(nb, block_size, head_dim, generator=g)
        v[own] = torch.randn(nb, block_size, head_dim, generator=g)
        last = own[-1]
        tail = lengths[p] - (nb - 1) * block_size  # slots used in the last block
        k[last, tail:] = v[last, tail:] = 1e4
    order = list(range(len(lengths)))
    rng.shuffle(order)
    q = torch.randn(len(lengths), groups, head_dim, generator=g)
    score = torch.rand(n_blocks + 1, block_size, generator=g)
    lengths_t = torch.tensor([lengths[p] for p in order], dtype=torch.int32)
    to = lambda t, dt=None: t.to(DEVICE, dt) if dt else t.to(DEVICE)
    return to(q, dtype), to(k, dtype), to(v, dtype), to(tables[order]), to(lengths_t), to(score)


def check(kernels, lengths, groups, head_dim, dtype, block_size, splits, seed=0, share=False):
    q, k, v, tables, lengths_t, score = paged_case(lengths, groups, head_dim, dtype, block_size, seed, share=share)
    max_slots = max(lengths)
    out, lse = kernels.paged_decode(q, k, v, tables, lengths_t, max_slots, splits)
    ref_score = score.clone()
    ref_out, ref_lse = kernels.paged_decode_reference(q, k, v, tables, lengths_t, max_slots, ref_score)
    got_score = score.clone()
    kernels.paged_add_scores(q, k, tables, lengths_t, lse, got_score, max_slots)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # 16-bit: p is rounded to K/V's dtype before p @ V
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:2]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got_score - score, ref_score - score, atol=1e-5, rtol=1e-4)
    # slots no row attends keep their score bit for bit (past each row's length, other blocks, the null block)
    attended = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    for p, n in enumerate(lengths_t.tolist()):
        r = torch.arange(n, device=score.device)
        attended[tables[p, r // block_size].long() * block_size + r % block_size] = True
    assert torch.equal(got_score.view(-1)[~attended], score.view(-1)[~attended])
    assert (got_score.view(-1)[attended] > score.view(-1)[attended]).all()  # every attended slot got some
    return q, k, v, tables, lengths_t, out


LENGTHS = [1, 7, 16, 33, 64, 100, 150, 201]  # 1, around blocks and tiles, long: one launch, non-contiguous tables


@pytest.mark.parametrize("groups,head_dim,dtype,block_size", [
    (1, 64, torch.float32, 16), (3, 64, torch.bfloat16, 16), (4, 32, torch.float32, 8), (3, 32, torch.bfloat16, 32),
    (4, 64, torch.float16, 64), (1, 32, torch.float32, 24)])
def test_paged_decode_matches_reference(kernels, groups, head_dim, dtype, block_size):
    """block sizes below, equal to and above the 32-key tile, and one that does not divide it (24)."""
    check(kernels, LENGTHS, groups, head_dim, dtype, block_size, splits=3)


@pytest.mark.parametrize("splits", [1, 2, 5, 64, None])
def test_paged_split_counts(kernels, splits):
    """One split per row, a few, more splits than a row has tiles (the extra programs exit at once), the default."""
    check(kernels, [1, 40, 129, 190], 3, 32, torch.float32, 16, splits, seed=splits or 0)


def test_paged_random_lengths_and_shared_block(kernels):
    """Random lengths; two rows share their first block (a shared prefix): their scores add up in the same slots."""
    lengths = [70, 45] + [random.Random(3).randint(1, 200) for _ in range(4)]
    check(kernels, lengths, 4, 64, torch.bfloat16, 16, splits=4, seed=3, share=True)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log")  # the interpreter's numpy, for log(0)
def test_paged_empty_row(kernels):
    """A row of length 0 writes zeros and lse = -inf, adds no score, and leaves its neighbours alone."""
    q, k, v, tables, lengths, score = paged_case([40, 1, 3], 2, 32, torch.float32, 16)
    lengths[0] = 0
    out, lse = kernels.paged_decode(q, k, v, tables, lengths, 40, splits=4)
    ref_out, ref_lse = kernels.paged_decode_reference(q, k, v, tables, lengths, 40)
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[1:], ref_lse[1:])
    got = score.clone()
    kernels.paged_add_scores(q, k, tables, lengths, lse, got, 40)
    assert torch.equal(got[tables[0].long()], score[tables[0].long()])


def test_paged_wrong_table_differs(kernels):
    """The checks can fail: the kernel over swapped tables differs from the reference over the true ones."""
    q, k, v, tables, lengths, out = check(kernels, [50, 50], 2, 32, torch.float32, 16, splits=2, seed=5)
    wrong, _ = kernels.paged_decode(q, k, v, tables.flip(0), lengths, 50, splits=2)
    assert not torch.allclose(wrong, out, atol=1e-2)


def test_paged_reference_equals_dense_attention():
    """The reference, against softmax attention over each row's keys picked one by one through its table."""
    pytest.importorskip("triton")  # the module imports it
    from tinygen.kernels.paged_attention import paged_decode_reference

    lengths, groups, head_dim, bs = [1, 17, 64, 130], 3, 32, 16
    q, k, v, tables, lengths_t, score = (t.cpu() for t in paged_case(lengths, groups, head_dim, torch.float32, bs))
    ref_score = score.clone()
    out, lse = paged_decode_reference(q, k, v, tables, lengths_t, max(lengths), ref_score)
    want_score = score.clone()
    for p, n in enumerate(lengths_t.tolist()):
        at = [(tables[p, r // bs].item(), r % bs) for r in range(n)]
        keys = torch.stack([k[b, s] for b, s in at])  # (n, head_dim)
        values = torch.stack([v[b, s] for b, s in at])
        logits = q[p] @ keys.T * head_dim**-0.5  # (groups, n)
        probs = torch.softmax(logits, -1)
        torch.testing.assert_close(out[p], probs @ values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[p], torch.logsumexp(logits, -1))
        for (b, s), mean in zip(at, probs.mean(0)):
            want_score[b, s] += mean
    torch.testing.assert_close(ref_score, want_score)


def test_paged_kernels_compile_for_sm90_without_gpu():
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
def compile(fn, types, consts):
    names = fn.arg_names
    sig = {{n: ("constexpr" if n in consts else types.get(n, "i32")) for n in names}}
    # as a launch specializes them: pointers and strides divisible by 16
    attrs = {{(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n][0] == "*" or "stride" in n}}
    src = ASTSource(fn=fn, signature=sig, constexprs={{(names.index(k),): v for k, v in consts.items()}}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32))
for kv, group, head_dim, block_size in (("*bf16", 4, 64, 16), ("*fp32", 8, 128, 16), ("*fp16", 3, 128, 32)):
    dtype = dict(bf16=torch.bfloat16, fp32=torch.float32, fp16=torch.float16)[kv[1:]]
    meta = dict(KV=m.TL_DTYPES[dtype], GROUP=group, BLOCK_H=16, HEAD_DIM=head_dim, BLOCK_D=head_dim,
                BLOCK_SIZE=block_size, BLOCK=m.BLOCK_N, PRECISION="ieee" if kv == "*fp32" else "tf32", UPCAST=False)
    ptrs = dict(Q=kv, K=kv, V=kv, Tables="*i32", Lengths="*i32", mid_o="*fp32", mid_lse="*fp32", Out=kv,
                Lse="*fp32", Score="*fp32", scale="fp32")
    ptx = compile(m._stage1, ptrs, meta).asm["ptx"]
    # keys come through the block table: each key's head_dim values must still load as vectors
    assert "cp.async" in ptx or "ld.global.v4" in ptx, "K/V tile loads not vectorized"
    compile(m._stage2, ptrs, dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK=m.BLOCK_N))
    assert "cubin" in compile(m._add_scores, ptrs, meta).asm
print("compiled")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
