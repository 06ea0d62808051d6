"""Weight-only int8/int4: packed kernels against the dense dequantized reference, Q4_1 blocks mapped exactly, bad input."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, save_tiny_model
from safetensors.torch import load_file, save_file

from tinygen import quant
from tinygen.errors import TinygenError
from tinygen.generate import full_caches
from tinygen.checkpoint import checkpoint_sources
from tinygen.loader import load_model, read_config
from tinygen.quant import Int4Linear, Int8Linear, dequantize_int4, q4_1_to_int4, quantize_model

sys.path.insert(0, str(ROOT / "weights"))
from convert import q4_1_blocks  # noqa: E402
from test_cli import assert_error, cli  # noqa: E402


def logits(model, tokens):
    """Prefill of the first half, then one decode step per token: (len, vocab) float32."""
    caches, split = full_caches(model, len(tokens)), len(tokens) // 2
    out = [model(tokens[:split], caches, 0)]
    out += [model(tokens[i : i + 1], caches, i) for i in range(split, len(tokens))]
    return torch.cat(out)


def plain_float32(model_dir):
    """The float32 model with nn.Linear layers: the layout a batch-1 load on one thread keeps (with more threads the
    CPU layout prepacks them for oneDNN, which the dense reference cannot start from)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return load_model(model_dir, dtype="float32")
    finally:
        torch.set_num_threads(threads)


def reference(model_dir, mode):
    model = plain_float32(model_dir)
    quantize_model(model, mode, model_dir, torch.float32, reference=True)
    assert any(isinstance(m, torch.nn.Linear) for m in model.modules())
    return model.eval()


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@torch.inference_mode()
def test_packed_model_matches_dequantized_reference(tiny_model_dir, mode, dtype):
    # 80 tokens: a 40-row prefill (int8 takes its dense path there) and 40 single-row decode steps (the kernels)
    tokens = torch.randint(0, 97, (80,), generator=torch.Generator().manual_seed(1))
    packed = load_model(tiny_model_dir, dtype=dtype, quantize=mode)
    kinds = {type(m).__name__ for m in packed.modules()}
    assert {"Int8Linear", "Int4Linear" if mode == "int4" else "Int8Linear"} <= kinds and "Linear" not in kinds
    assert packed.embed.weight.dtype == getattr(torch, dtype)
    ref, plain = logits(reference(tiny_model_dir, mode), tokens), logits(load_model(tiny_model_dir), tokens)
    got = logits(packed, tokens)
    # The kernels see bfloat16 activations, the reference float32: a few 1e-3 apart. A wrong scale, row order or
    # nibble order is O(1); and the quantization itself must be visible against the float model.
    assert relative_error(got, ref) < 0.02, relative_error(got, ref)
    assert relative_error(plain, ref) > (1e-3 if mode == "int8" else 1e-2)


@pytest.mark.skipif(not quant.mkldnn_linear(), reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_onednn_packed_linear_computes_f_linear(dtype):
    """A layer over oneDNN's packed weight gives F.linear's product for every row count a step may bring:
    bit for bit in bfloat16 (what MkldnnLinear's docstring claims), to float32 rounding in float32."""
    if dtype == torch.bfloat16 and not quant.mkldnn_bf16():
        pytest.skip("no oneDNN bfloat16 kernels on this CPU")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g).to(dtype)
    for rows in (1, 8):
        layer = quant.MkldnnLinear(w, rows)
        for n in (1, 3, 8, 40):
            x = torch.randn(n, 64, generator=g).to(dtype)
            want = torch.nn.functional.linear(x, w)
            if dtype == torch.bfloat16:
                assert torch.equal(layer(x), want)
            else:
                torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not quant.mkldnn_linear(), reason="this torch build has no oneDNN linear")
@torch.inference_mode()
def test_packed_layout_covers_every_matrix_and_keeps_the_logits(tiny_model_dir):
    """On the CPU a float32 model loaded for batches (batch=8), or for batch 1 with several threads, has every
    linear layer and the (tied) head prepacked for oneDNN; loaded for batch 1 on one thread it keeps plain (in, out)
    storage for MKL's GEMV. A batch forward in the packed layout gives what the GEMV layout gives."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        packed_one = load_model(tiny_model_dir)
    finally:
        torch.set_num_threads(threads)
    gemv, packed = plain_float32(tiny_model_dir), load_model(tiny_model_dir, batch=8)
    assert not any(isinstance(m, quant.MkldnnLinear) for m in gemv.modules())
    for model in (packed, packed_one):
        linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, quant.MkldnnLinear))]
        assert linears and all(isinstance(m, quant.MkldnnLinear) for m in linears)
        assert isinstance(model.lm_head, quant.MkldnnLinear)  # the tiny model's head is tied: its own packed copy
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 97, (n,), generator=g) for n in (5, 12)]
    gemv_caches, packed_caches = [full_caches(gemv, 32) for _ in prompts], [full_caches(packed, 32) for _ in prompts]
    for p, a, b in zip(prompts, packed_caches, gemv_caches):  # prefill: many rows
        torch.testing.assert_close(packed(p, a, 0), gemv(p, b, 0), atol=1e-4, rtol=1e-4)
    for step in range(4):  # decode steps of both sequences at once against the same batch in the batch-1 layout
        tokens = torch.randint(3, 97, (2, 1), generator=g)
        pos = [len(p) + step for p in prompts]
        torch.testing.assert_close(packed(tokens, packed_caches, pos), gemv(tokens, gemv_caches, pos),
                                   atol=1e-4, rtol=1e-4)


def test_int8_linear_exact_on_representable_values():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (48, 64), generator=g, dtype=torch.int8)
    scale = 2.0 ** -torch.randint(4, 8, (48,), generator=g).float()  # powers of two: every product exact
    x = torch.randint(-2, 3, (3, 64), generator=g).float()
    expect = x.double() @ (q.double() * scale.double()[:, None]).t()  # exact in float32 accumulation
    assert torch.equal(Int8Linear(q, scale)(x), expect.bfloat16().float())  # the kernel's output is bfloat16


def test_quantizers_round_to_the_nearest_level():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    q, scale = quant.quantize_int8(w)
    assert q.abs().max() == 127 and ((q.float() * scale[:, None] - w).abs() <= 0.51 * scale[:, None]).all()
    q, scale, zero = quant.quantize_int4(w)
    assert q.max() == 15 and q.min() == 0
    err = (dequantize_int4(q, scale, zero) - w).view(64, 3, 32).abs().amax(-1)
    assert (err <= 0.51 * scale + zero.abs() * 2**-8).all()


def hand_built_blocks(rows, cols, seed=0):
    """Q4_1 blocks whose d, m (and m + 8d) are exact in bfloat16, so the int4 kernel form loses nothing."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
    d = (2.0 ** -torch.randint(3, 7, (rows, cols // 32), generator=g)).half()
    m = (torch.randint(-16, 16, (rows, cols // 32), generator=g) / 32).half()
    return q, d, m


def test_q4_1_blocks_map_exactly_onto_int4_groups():
    q, d, m = hand_built_blocks(32, 128)
    w = (q.view(32, 4, 32).float() * d.float()[..., None] + m.float()[..., None]).view(32, 128)  # w = d q + m
    codes, scale, zero = q4_1_to_int4(q, d, m)
    assert torch.equal(dequantize_int4(codes, scale, zero), w)  # (q - 8) d + (m + 8d)
    # The packed kernel reproduces the same weights: one-hot rows (exact in bfloat16) read W^T back.
    eye = torch.eye(128)
    assert torch.equal(Int4Linear(codes, scale, zero)(eye), w.t())


def test_q4_1_block_bytes_parse_like_gguf():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    w = np.random.default_rng(0).standard_normal((16, 96)).astype(np.float32)
    raw = quantize(w, GGMLQuantizationType.Q4_1)  # (16, 3 blocks x 20 bytes)
    packed, d, m = q4_1_blocks(raw, 16, 96)
    q = quant.unpack_nibbles(torch.from_numpy(packed)).float().view(16, 3, 32)
    ours = q * torch.from_numpy(d).float()[..., None] + torch.from_numpy(m).float()[..., None]
    assert torch.equal(ours.view(16, 96), torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q4_1)))


def write_q4_1_checkpoint(path):
    """A tiny checkpoint whose linear weights are hand-built Q4_1 blocks, with q4_1.safetensors beside it."""
    save_tiny_model(path)
    cfg, tensors, blocks = read_config(path), load_file(path / "model.safetensors"), {}
    for sources in checkpoint_sources(cfg).values():
        for i, (name, shape) in enumerate(sources):
            if len(shape) == 2 and "embed" not in name and "lm_head" not in name:
                q, d, m = hand_built_blocks(*shape, seed=len(blocks) + i)
                tensors[name] = (q.view(shape[0], -1, 32).float() * d.float()[..., None] + m.float()[..., None]).view(shape)
                base = name.removesuffix(".weight")
                blocks.update({f"{base}.q": q[:, 0::2] | (q[:, 1::2] << 4), f"{base}.d": d, f"{base}.m": m})
    save_file(tensors, path / "model.safetensors")
    save_file(blocks, path / quant.Q4_1_FILE)
    return tensors


@torch.inference_mode()
def test_int4_from_q4_1_blocks_is_the_checkpoint_itself(tmp_path):
    tensors = write_q4_1_checkpoint(tmp_path)
    ref = plain_float32(tmp_path)
    assert quantize_model(ref, "int4", tmp_path, torch.float32, reference=True) == "q4_1 blocks"
    fused = torch.cat([tensors[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])  # rows q | k | v
    assert torch.equal(ref.layers[1].attn.wqkv.weight, fused)
    assert torch.equal(ref.layers[2].ffn.w2.weight, tensors["model.layers.2.mlp.down_proj.weight"])
    tokens = torch.arange(1, 20)
    plain, packed = logits(load_model(tmp_path), tokens), logits(load_model(tmp_path, quantize="int4"), tokens)
    assert relative_error(packed, plain) < 0.02  # only the bfloat16 activations and the int8 head differ


def test_int4_refuses_shapes_the_kernel_cannot_take(tmp_path):
    save_tiny_model(tmp_path, hidden_size=48, head_dim=12)
    with pytest.raises(TinygenError, match=r"layers\.0\.attn\.wqkv is 96x48.*multiples of 32.*--quantize int8"):
        load_model(tmp_path, quantize="int4")
    load_model(tmp_path, quantize="int8")  # int8 takes any shape


def test_missing_kernel_and_unknown_mode(monkeypatch):
    with pytest.raises(TinygenError, match="unknown --quantize mode 'int3'"):
        quant.check_mode("int3", torch.device("cpu"))
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: False)
    with pytest.raises(TinygenError, match="no _weight_int8pack_mm kernel for cpu.*leave --quantize out"):
        quant.check_mode("int8", torch.device("cpu"))


def test_cli_quantized_generation_with_fastgen(chat_model, tmp_path):
    out = tmp_path / "stats.json"
    r = cli("--model", chat_model, "--prompt", "tell me a story", "--quantize", "int4", "--dtype", "bfloat16",
            "--max-new-tokens", 6, "--ignore-eos", "--stats-json", out)  # --policy auto is the default
    assert r.returncode == 0, r.stderr
    stats = json.loads(out.read_text())
    assert stats["generated_tokens"] == 6 and stats["quantize"] == "int4"
    # the budget profile compresses as it does in float32: about 0.7 of a short prompt's tokens (coarse ceilings)
    assert abs(stats["kept_fraction"] - 0.7) <= 0.05 and stats["kv_bytes_kept"] < stats["kv_bytes_full"]


def test_cli_bad_quantize_inputs(chat_model, tmp_path):
    assert_error(cli("--model", chat_model, "--prompt", "hi", "--quantize", "int3"), 1, "unknown --quantize mode")
    odd = tmp_path / "odd"
    shutil.copytree(chat_model, odd)
    cfg = json.loads((odd / "config.json").read_text())
    save_tiny_model(odd, **{k: cfg[k] for k in ("vocab_size", "max_position_embeddings")}, hidden_size=48, head_dim=12)
    assert_error(cli("--model", odd, "--prompt", "hi", "--quantize", "int4"), 1, "int4", "multiples of 32", "int8")


def test_default_model_q4_1_blocks_equal_its_float_weights(default_model_dir):
    """weights/convert.py's q4_1.safetensors: d * q + m is model.safetensors bit for bit (q/k rows un-permuted too)."""
    from safetensors import safe_open

    if not (default_model_dir / quant.Q4_1_FILE).is_file():
        pytest.skip("q4_1.safetensors not written yet (run python weights/convert.py)")
    blocks = quant.Q4_1Blocks(default_model_dir / quant.Q4_1_FILE)
    floats = safe_open(str(default_model_dir / "model.safetensors"), framework="pt")
    names = [n for n in sorted(blocks.names) if ".layers.0." in n or ".layers.29." in n]
    assert len(blocks.names) == 210 and len(names) == 14
    for name in names:
        q, d, m = blocks.get(name)
        w = (q.view(q.shape[0], -1, 32).float() * d.float()[..., None] + m.float()[..., None]).view(q.shape)
        assert torch.equal(w, floats.get_tensor(name)), name
