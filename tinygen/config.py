"""Typed model configuration, read from a Hugging Face `config.json`."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import TinygenError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_SCALING = ("default", "llama3", "linear")


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int  # hidden size
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (GQA when < n_heads)
    ffn_dim: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise TinygenError(f"config: {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise TinygenError(f"config: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise TinygenError(f"config: head_dim={self.head_dim} must be even for rotary embeddings")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_SCALING:
            raise TinygenError(f"config: unsupported rope scaling {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_SCALING)})")

    @property
    def n_groups(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Build from a parsed HF config.json; unknown keys are ignored, missing required ones are an error."""
        archs = d.get("architectures") or []
        if d.get("model_type") != "llama" and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            got = ", ".join(archs) or d.get("model_type") or "unknown"
            raise TinygenError(f"unsupported architecture {got!r}: tinygen runs Llama-family models (LlamaForCausalLM)")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise TinygenError("unsupported: attention or MLP biases (attention_bias/mlp_bias) are not Llama-style")
        if d.get("hidden_act", "silu") != "silu":
            raise TinygenError(f"unsupported activation {d.get('hidden_act')!r} (Llama uses silu)")
        try:
            # transformers 5 writes `rope_parameters` (theta included); older files write `rope_theta` + `rope_scaling`.
            rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
            theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"} or None
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                vocab_size=int(d["vocab_size"]),
                dim=int(d["hidden_size"]),
                n_layers=int(d["num_hidden_layers"]),
                n_heads=int(d["num_attention_heads"]),
                n_kv_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
                ffn_dim=int(d["intermediate_size"]),
                head_dim=int(d.get("head_dim") or 0),
                norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                max_seq_len=int(d.get("max_position_embeddings", 2048)),
                tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except KeyError as e:
            raise TinygenError(f"config.json is missing required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise TinygenError(f"config.json has a malformed value: {e}") from None
