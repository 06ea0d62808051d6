"""The decode step as one function of tensors, and that function compiled with torch.compile (`--compile`).

`decode_step` (generate.py) runs the model op by op. On a 2-core CPU that is about 6,000 dispatched ops a step for
the default model, and their dispatch and the Python around them cost about a third of a bfloat16 step and over
half of an int4 one. A compiler can fuse those ops into a few loops, but only in a step with no Python value that
changes from step to step. `static_decode_step` is that step for the full cache of a sequence on its own, in the
paged pool (tinygen/kvpool.py):
- the position is a tensor: the rotary rows are gathered with it, and each layer's new key and value are written
  into the pool at the slot its block table gives for it (`index_copy_`), its position and bit with them;
- attention reads each row's blocks through the table (`blocks`: every row's first nb block ids, nb marked
  dynamic so that one compilation serves every length), the slots past the position masked (unwritten slots are
  zeros: a block is zeroed when it is handed out, and a masked slot still multiplies its value by 0).

Run eagerly, it is the same model as `decode_step` (tests/test_compiled.py checks the logits); compiled, Inductor
turns everything but the matrix products into generated C++ loops, and with `freezing` packs the float weights
for oneDNN itself (so a model for `--compile` is loaded without tinygen's own packing: `load_model(prepack=False)`).
FastGen's evictions are host decisions today, so `--compile` is for the full cache.
"""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext

import torch

from .attention import grouped_decode_attention
from .cache import FullRows
from .generate import decode_step, full_caches, prefill
from .model import Llama
from .quant import MkldnnLinear, cpu_layout


def static_decode_step(model: Llama, token: torch.Tensor, pos: torch.Tensor, k_pool: torch.Tensor,
                       v_pool: torch.Tensor, pos_pool: torch.Tensor, bitmap: torch.Tensor, rows: torch.Tensor,
                       blocks: torch.Tensor) -> torch.Tensor:
    """token (1,) long at position pos (1,) long; k_pool, v_pool (pool blocks, block_size, head_dim), pos_pool
    (pool blocks, block_size) and bitmap (pool rows, bytes): the pool's; rows (n_layers * n_kv_heads,) the
    sequence's rows, layer by layer; blocks (n_layers, n_kv_heads, nb) long: each row's first nb blocks, holding
    the positions before pos and a slot for pos -> logits (vocab,) float32. Writes the token's keys and values."""
    n_layers, n_kv_heads, nb = blocks.shape
    bs, head_dim = k_pool.shape[1], k_pool.shape[2]
    cos, sin = model.rope_cos.index_select(0, pos), model.rope_sin.index_select(0, pos)  # (1, head_dim)
    visible = torch.arange(nb * bs, device=pos.device) <= pos  # (nb * block_size,): the slots written so far
    slots = blocks.index_select(2, pos // bs)[..., 0] * bs + pos % bs  # (n_layers, n_kv_heads): the new token's
    pos_pool.view(-1).index_fill_(0, slots.flatten(), pos.to(pos_pool.dtype).squeeze())  # no mask: it is never
    bit = (1 << pos % 8).to(torch.uint8)  # evicted
    bitmap[rows, pos // 8] |= bit
    scale = model.cfg.head_dim**-0.5
    k_flat, v_flat = k_pool.view(-1, head_dim), v_pool.view(-1, head_dim)
    x = model.embed(token)  # (1, dim)
    for i, layer in enumerate(model.layers):
        q, k, v = layer.attn.project(layer.attn_norm(x), cos, sin)  # (1, n_heads or n_kv_heads, 1, head_dim)
        k_flat.index_copy_(0, slots[i], k[0, :, 0])
        v_flat.index_copy_(0, slots[i], v[0, :, 0])
        keys = k_pool[blocks[i]].view(n_kv_heads, nb * bs, head_dim)  # (n_kv_heads, nb * block_size, head_dim)
        values = v_pool[blocks[i]].view(n_kv_heads, nb * bs, head_dim)
        out = grouped_decode_attention(q[0], keys, values, scale, visible)  # (n_heads, 1, head_dim)
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

        def step(*tensors):  # the model from the closure: its weights are attributes, which freezing turns into
            return static_decode_step(model, *tensors)  # graph constants and packs

        assert not any(isinstance(m, MkldnnLinear) for m in model.modules()), \
            "a model loaded with prepack=False: tinygen's packed layers do not compile"
        self.model, self.mode = model, mode
        self.step = torch.compile(step, fullgraph=True, mode=mode) if compile else step
        self.compiled, self.first, self.fell_back = compile, True, False

    def warm_up(self) -> float:
        """Compile now, on a throwaway cache of 17 tokens (two blocks: the dynamic size), so that the first real step
        does not; returns seconds."""
        t0 = time.perf_counter()
        caches = full_caches(self.model, 40)
        prefill(self.model, [0] * 17, caches)
        self(self.model, torch.zeros(1, dtype=torch.long, device=self.model.embed.weight.device), caches, 17)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def __call__(self, model: Llama, token: torch.Tensor, caches: list[FullRows], pos: int) -> torch.Tensor:
        assert model is self.model, "the model this decoder was made for"
        assert all(isinstance(c, FullRows) and c.length == pos for c in caches), "full caches holding pos tokens"
        assert pos < model.cfg.max_seq_len, f"position {pos} beyond context {model.cfg.max_seq_len}"
        if self.fell_back:
            return decode_step(model, token, caches, pos)
        pool = caches[0].pool
        rows = [r for c in caches for r in c.rows()]
        pool.reserve(rows, pos + 1)  # the new token's slot
        bs, width = pool.block_size, pool.tables.shape[1]
        nb = min(width, max(2, -(-(pos + 1) // bs)))  # at least 2: a dynamic size of 1 would be specialised
        rows_t = torch.tensor(rows, device=token.device)
        blocks = pool.tables[rows_t, :nb].long().view(len(caches), -1, nb)  # (n_layers, n_kv_heads, nb)
        tensors = (token, torch.tensor([pos], device=token.device), pool.k, pool.v, pool.pos, pool.bitmap, rows_t,
                   blocks)
        if self.compiled:
            if nb >= 2:
                torch._dynamo.mark_dynamic(blocks, 2)  # one compilation for every length
            torch._dynamo.mark_dynamic(pool.bitmap, 1)  # and for every context
            for t in (pool.k, pool.v, pool.pos):
                torch._dynamo.mark_dynamic(t, 0)  # and for every pool size
                if self.mode == "reduce-overhead":  # a graph reads them in place (a growth re-records it)
                    torch._dynamo.mark_static_address(t)
        freezing = nullcontext()
        if self.compiled:  # the weights become constants of the graph, packed for oneDNN when it compiles (the flag
            from torch._inductor import config  # is read then, so it is set around each call)

            freezing = config.patch(freezing=True)
        try:
            with freezing:
                logits = self.step(*tensors)
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
            c.length = c.kept = pos + 1
        return logits
