"""The files of an HF-layout checkpoint: which HF tensors make each of our parameters, which safetensors file holds
each tensor, and opening one file with a one-line error. loader.py and quant.py both read checkpoints through here."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from .config import ModelConfig
from .errors import TinygenError


def checkpoint_sources(cfg: ModelConfig) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Our parameter -> the HF tensors (name, shape) whose rows are stacked into it (q|k|v and gate|up are fused)."""
    d, q, kv, f = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim
    m = {"embed.weight": [("model.embed_tokens.weight", (cfg.vocab_size, d))], "norm.weight": [("model.norm.weight", (d,))]}
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = [("lm_head.weight", (cfg.vocab_size, d))]
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        m[ours + "attn_norm.weight"] = [(hf + "input_layernorm.weight", (d,))]
        m[ours + "attn.wqkv.weight"] = [(hf + "self_attn.q_proj.weight", (q, d)), (hf + "self_attn.k_proj.weight", (kv, d)),
                                        (hf + "self_attn.v_proj.weight", (kv, d))]
        m[ours + "attn.wo.weight"] = [(hf + "self_attn.o_proj.weight", (d, q))]
        m[ours + "ffn_norm.weight"] = [(hf + "post_attention_layernorm.weight", (d,))]
        m[ours + "ffn.w13.weight"] = [(hf + "mlp.gate_proj.weight", (f, d)), (hf + "mlp.up_proj.weight", (f, d))]
        m[ours + "ffn.w2.weight"] = [(hf + "mlp.down_proj.weight", (d, f))]
    return m


def shard_map(model_dir: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise TinygenError(f"cannot read {index}: {e}") from None
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise TinygenError(f"incomplete model directory {model_dir}: no model.safetensors or model.safetensors.index.json")
    with open_safetensors(single) as f:
        return {name: single for name in f.keys()}


def open_safetensors(path: Path):
    if not path.is_file():
        raise TinygenError(f"missing weight file {path}")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers and truncation
        raise TinygenError(f"corrupt or truncated safetensors file {path.name}: {e}") from None
