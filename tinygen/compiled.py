"""The decode step as one function of tensors, and that function compiled with torch.compile (`--compile`).

`decode_step` (generate.py) runs the model op by op. On a 2-core CPU that is about 6,000 dispatched ops a step for
the default model, and their dispatch and the Python around them cost about a third of a bfloat16 step and over
half of an int4 one. A compiler can fuse those ops into a few loops, but only in a step with no Python value that
changes from step to step. `static_decode_step` is that step for full caches:
- the position is a tensor: the rotary rows are gathered with it, and each layer's new key and value are written
  into the cache's buffers at it (`index_copy_`);
- attention runs over the whole buffers, the rows past the position masked (at most one growth block,
  max(16, length / 16) rows, is spare; FullCache zeroes them, as a masked row still multiplies its value by 0);
- the buffers still grow in blocks (`FullCache.reserve`), and their length is marked dynamic, so one compilation
  serves every length.

Run eagerly, it is the same model as `decode_step` (tests/test_compiled.py checks the logits); compiled, Inductor
turns everything but the matrix products into generated C++ loops, and with `freezing` packs the float weights
for oneDNN itself (so a model for `--compile` is loaded without tinygen's own packing: `load_model(prepack=False)`).
FastGen's stores change shape every step (evictions, per-head lengths), so `--compile` is for the full cache.
"""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext

import torch

from .attention import grouped_decode_attention
from .cache import FullCache
from .generate import decode_step, full_caches, prefill
from .model import Llama
from .quant import MkldnnLinear, cpu_layout


def static_decode_step(model: Llama, token: torch.Tensor, pos: torch.Tensor, ks: list[torch.Tensor],
                       vs: list[torch.Tensor]) -> torch.Tensor:
    """token (1,) long at position pos (1,) long; ks / vs: each layer's K / V buffers (n_kv_heads, capacity,
    head_dim) holding the positions before pos, with room at pos -> logits (vocab,) float32. Writes the token's
    keys and values at pos."""
    cos, sin = model.rope_cos.index_select(0, pos), model.rope_sin.index_select(0, pos)  # (1, head_dim)
    visible = torch.arange(ks[0].shape[1], device=pos.device) <= pos  # (capacity,): the rows written so far
    scale = model.cfg.head_dim**-0.5
    x = model.embed(token)  # (1, dim)
    for layer, k_buf, v_buf in zip(model.layers, ks, vs):
        q, k, v = layer.attn.project(layer.attn_norm(x), cos, sin)  # (1, n_heads or n_kv_heads, 1, head_dim)
        k_buf.index_copy_(1, pos, k[0])
        v_buf.index_copy_(1, pos, v[0])
        out = grouped_decode_attention(q[0], k_buf, v_buf, scale, visible)  # (n_heads, 1, head_dim)
        x = x + layer.attn.output(out[None])
        x = x + layer.ffn(layer.ffn_norm(x))
    return model.head(x)[0]


class CompiledDecoder:
    """A drop-in for `decode_step(model, token, caches, pos)` over full caches, through torch.compile.

    The first call compiles: about 50 s for the default model on 2 cores, at every start (Inductor's counters show
    its on-disk graph cache bypassed with freezing), so it pays only over long generations. If compiling fails (no
    C++ compiler, say), one line goes to stderr, the model's matrices are packed as `load_model` packs them, and
    `decode_step` runs from then on: the eager model, as without --compile."""

    def __init__(self, model: Llama, compile: bool = True, mode: str | None = None):
        """mode: torch.compile's; "reduce-overhead" replays the step as a CUDA graph (bench/bench_gpu_compile.py)."""

        def step(token, pos, ks, vs):  # the model from the closure: its weights are attributes, which freezing
            return static_decode_step(model, token, pos, ks, vs)  # turns into graph constants and packs

        assert not any(isinstance(m, MkldnnLinear) for m in model.modules()), \
            "a model loaded with prepack=False: tinygen's packed layers do not compile"
        self.model, self.mode = model, mode
        self.step = torch.compile(step, fullgraph=True, mode=mode) if compile else step
        self.compiled, self.first, self.fell_back = compile, True, False

    def warm_up(self) -> float:
        """Compile now, on a throwaway cache of one token, so that the first real step does not; returns seconds."""
        t0 = time.perf_counter()
        caches = full_caches(self.model, 2)
        prefill(self.model, [0], caches)
        self(self.model, torch.zeros(1, dtype=torch.long, device=self.model.embed.weight.device), caches, 1)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def __call__(self, model: Llama, token: torch.Tensor, caches: list[FullCache], pos: int) -> torch.Tensor:
        assert model is self.model, "the model this decoder was made for"
        assert all(isinstance(c, FullCache) and c.length == pos for c in caches), "full caches holding pos tokens"
        assert pos < model.cfg.max_seq_len, f"position {pos} beyond context {model.cfg.max_seq_len}"
        if self.fell_back:
            return decode_step(model, token, caches, pos)
        for c in caches:
            c.reserve(pos + 1)
        ks, vs = [c.k for c in caches], [c.v for c in caches]
        if self.compiled:
            for t in (*ks, *vs):
                torch._dynamo.mark_dynamic(t, 1)  # the capacity: one compilation for every length
                if self.mode == "reduce-overhead":  # a graph reads them in place (a growth re-records it)
                    torch._dynamo.mark_static_address(t)
        p = torch.tensor([pos], device=token.device)
        freezing = nullcontext()
        if self.compiled:  # the weights become constants of the graph, packed for oneDNN when it compiles (the flag
            from torch._inductor import config  # is read then, so it is set around each call)

            freezing = config.patch(freezing=True)
        try:
            with freezing:
                logits = self.step(token, p, ks, vs)
        except Exception as e:
            if not (self.compiled and self.first):
                raise
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"tinygen: --compile: torch.compile failed ({type(e).__name__}: {reason[:200]}); decoding without "
                  "it", file=sys.stderr)
            cpu_layout(model, 1)  # the layout eager decoding reads fastest (a write at pos is simply done again)
            self.compiled, self.fell_back = False, True
            return decode_step(model, token, caches, pos)
        self.first = False
        for c in caches:
            c.length = pos + 1
        return logits
