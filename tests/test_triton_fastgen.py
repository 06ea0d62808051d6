"""FastGen's decode step through the Triton ragged kernel: every store of a layer attended in one launch (plus one
for the `frequent` scores), reading each head's rows in place through device pointer tables (store.LayerRows).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (the `kernels` fixture of test_triton_decode)
and the kernel path, which FastGenCache takes on CUDA, is forced by patching `attention_paths`. The harness of
test_fastgen_store then checks at every step what it checks for the PyTorch path: outputs against dense attention
masked to each head's bitmap, scores against a float64 reference, budgets, eviction order, rows and bytes.
"""
import pytest
import torch
from conftest import TRITON_DEVICES
from test_fastgen_budget import force_options  # noqa: F401  (fixture)
from test_fastgen_store import (L0, MIXED, N_HEADS, N_KV, HD, VOCAB, force_policies,  # noqa: F401
                                one_thread, run)
from test_triton_decode import kernels  # noqa: F401  (fixture: the interpreter on a machine without a GPU)

import tinygen.fastgen.cache as fg_cache
from tinygen.fastgen.budget import Option
from tinygen.fastgen.cache import FastGenCache
from tinygen.fastgen.kinds import TokenKinds
from tinygen.fastgen.policy import FREQUENT, FULL, LOCAL, SPECIAL, FastGenConfig
from tinygen.fastgen.store import PolicyStore


@pytest.fixture
def kernel_path(kernels, monkeypatch):  # noqa: F811
    """FastGenCache on the kernel path whatever the device; counts launches per decode step."""
    monkeypatch.setattr(fg_cache, "attention_paths", lambda device: ("blocks", "triton"))
    calls = {"attention": 0, "scores": 0}
    for name, key in (("ragged_decode_rows", "attention"), ("ragged_group_probs_rows", "scores")):
        def counted(*args, fn=getattr(kernels, name), key=key, **kw):
            calls[key] += 1
            return fn(*args, **kw)
        monkeypatch.setattr(kernels, name, counted)
    monkeypatch.setattr(PolicyStore, "attend", lambda *a: pytest.fail("a store attended on its own"))
    return calls


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_fastgen_mixed_policies(device, kernel_path, force_policies):  # noqa: F811
    """Three stores (paper candidates, two sharing a policy on non-adjacent heads) with growth and evictions."""
    policies, (r_l, r_f) = MIXED["paper-candidates"]
    force_policies(policies)
    cfg = FastGenConfig(policy="auto", profile="paper", local_ratio=r_l, frequent_ratio=r_f, growth_block=4)
    steps = 150
    cache, ref = run(cfg, device, steps=steps, seed=2, expect_policies=policies)
    assert cache.rows is not None and len(cache.stores) == 4
    assert ref.grew > 0 and all(s.kept < cache.length for s in cache.stores)
    assert kernel_path == {"attention": steps, "scores": steps}, "one launch per step, one more for the scores"


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_fastgen_per_head_ratios(device, kernel_path, force_options):  # noqa: F811
    """The budget profile's per-head ratios: four stores, the `full` one between `frequent` ones in head order."""
    force_options([Option(FREQUENT, 0, 0.2), Option(FULL), Option(LOCAL | FREQUENT, 0.15, 0.15),
                   Option(FREQUENT, 0, 0.55)])
    cfg = FastGenConfig(profile="budget", kv_budget=0.5, observation=8, growth_block=4, shapes="profile")
    cache, ref = run(cfg, device, steps=100, seed=4)
    assert len(cache.stores) == 4 and cache.rows.n_frequent == 3 and ref.grew > 0


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_fastgen_matches_torch_path_half(device, dtype, kernels, monkeypatch, force_policies):  # noqa: F811
    """16-bit stores (2-byte rows in the address tables): the kernel path against the PyTorch path on the same
    inputs. Policies evict by age only, so both paths keep the same tokens whatever their rounding."""
    force_policies([LOCAL, FULL, SPECIAL, LOCAL])
    cfg = FastGenConfig(policy="auto", profile="paper", local_ratio=0.3, growth_block=4)
    g = torch.Generator().manual_seed(3)
    steps = 40
    ids = torch.randint(0, len(VOCAB), (L0 + steps,), generator=g).tolist()
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)
    inputs = [(rand(N_HEADS, L0, HD), rand(N_KV, L0, HD), rand(N_KV, L0, HD))]
    inputs += [(rand(N_HEADS, 1, HD), rand(N_KV, 1, HD), rand(N_KV, 1, HD)) for _ in range(steps)]
    outs = {}
    for path in ("torch", "triton"):
        monkeypatch.setattr(fg_cache, "attention_paths", lambda d, path=path: ("blocks", path))
        kinds = TokenKinds(VOCAB, L0 + steps, torch.device(device))
        kinds.append(ids[:L0])
        cache = FastGenCache(N_HEADS, N_KV, HD, L0 + steps, kinds, cfg)
        outs[path] = [cache.attend(*inputs[0])]
        for i, step in enumerate(inputs[1:]):
            kinds.append([ids[L0 + i]])
            outs[path].append(cache.attend(*step))
        assert (cache.rows is not None) == (path == "triton")
    for i, (want, got) in enumerate(zip(outs["torch"], outs["triton"])):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2, msg=lambda m: f"step {i}: {m}")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_fastgen_after_chunks(device, kernel_path, force_policies):  # noqa: F811
    """Chunks (a chat's next turn) grow, evict, compact and shrink the stores: the kernel's address tables follow,
    and the decode steps after each chunk still match dense attention over what each head holds."""
    policies, (r_l, r_f) = MIXED["shared-noncontiguous"]
    force_policies(policies)
    cfg = FastGenConfig(policy="auto", profile="paper", local_ratio=r_l, frequent_ratio=r_f, growth_block=4)
    steps, chunks = 60, {10: 30, 40: 50}
    cache, _ = run(cfg, device, steps=steps, seed=6, expect_policies=policies, chunks=chunks)
    assert kernel_path == {"attention": steps - len(chunks), "scores": steps - len(chunks)}
