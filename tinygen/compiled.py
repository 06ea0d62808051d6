"""The decode step compiled with torch.compile (`--compile`): every policy, one sequence or a batch, a chat.

The step (tinygen/step.py) is a function of device tensors: the sampled ids, their positions, the batch slots, and
the pool's and the token kinds' state, every decision (budgets, the new token's slot, evictions, bits) made on the
device. Nothing in it is a Python value that changes from step to step, so one compilation serves every step:
- the number of blocks each row reads (`blocks`, the host's bound on the longest row), the batch size (two or more:
  torch specialises a size of 1, so a batch of one has its own graph) and the pool's blocks (a pool without a cap
  doubles) are marked dynamic;
- the two flags the step takes as Python values (whether any row may evict, whether any ranks by attention) follow
  from the batch's policies, not from the step: a batch that mixes full and FastGen sequences compiles once per
  combination it meets (at most four).

On a 2-core CPU the eager step is a few thousand dispatched ops for the default model, whose dispatch and the Python
around them cost a large share of a step; Inductor fuses everything but the matrix products into generated C++ loops,
and with `freezing` packs the float weights for oneDNN itself (so a model for `--compile` is loaded without
tinygen's own packing: `load_model(prepack=False)`). tests/test_compiled.py checks the compiled step against the
eager one over hundreds of steps with growth, evictions, joins and leaves, and counts the graphs.
"""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext

import torch

from . import step as steps
from .errors import first_line
from .generate import decode_step, prefill
from .model import Llama
from .quant import MkldnnLinear, cpu_layout


class CompiledStep:
    """step.decode through torch.compile, with step.decode's signature (the `fn` of PagedBatch.step and
    BatchRunner's `step_fn`); `decoder` is a drop-in for generate's `decode`.

    The first call compiles: tens of seconds for the default model on 2 cores, at every start (freezing bypasses
    Inductor's on-disk graph cache). If compiling fails (no C++ compiler, say), one line goes to stderr, the model's
    matrices are packed as `load_model` packs them, and the eager step runs from then on."""

    def __init__(self, model: Llama, compile: bool = True, mode: str | None = None):
        """mode: torch.compile's ("reduce-overhead" replays the step as a CUDA graph)."""

        def fn(pool, kinds, x, evicting, scored, kernel):  # the model from the closure: its weights are attributes,
            return steps.decode(model, pool, kinds, x, evicting, scored, kernel)  # which freezing packs as constants

        assert not any(isinstance(m, MkldnnLinear) for m in model.modules()), \
            "a model loaded with prepack=False: tinygen's packed layers do not compile"
        self.model, self.mode = model, mode
        self.fn = torch.compile(fn, fullgraph=True, mode=mode) if compile else fn
        self.compiled, self.first, self.fell_back = compile, True, False

    def __call__(self, model, pool: steps.PoolState, kinds: steps.KindState, x: steps.StepInputs, evicting: bool,
                 scored: bool, kernel: bool) -> torch.Tensor:
        assert model is self.model, "the model this step was compiled for"
        if self.fell_back:
            return steps.decode(model, pool, kinds, x, evicting, scored, kernel)
        freezing = nullcontext()
        if self.compiled:
            mark = torch._dynamo.maybe_mark_dynamic  # (a size of 1 stays specialised)
            for t in (x.tokens, x.positions, x.slots, x.blocks):
                mark(t, 0)  # one graph for every batch size from 2, every length (at least 2 blocks)
            for t in (*pool, *kinds):
                mark(t, 0)  # every pool: its blocks, its rows, its batch slots
            for t in (pool.tables, pool.bitmap, kinds.by_position):
                mark(t, 1)  # every context
            mark(kinds.prefix, 2)
            if self.mode == "reduce-overhead":  # a graph reads the pool in place (a growth re-records it)
                for t in pool[:5]:
                    torch._dynamo.mark_static_address(t)
            from torch._inductor import config  # the weights become constants of the graph, packed for oneDNN;

            freezing = config.patch(freezing=True)  # the flag is read when it compiles, so it is set at each call
        try:
            with freezing:
                logits = self.fn(pool, kinds, x, evicting, scored, kernel)
        except Exception as e:
            if not (self.compiled and self.first):
                raise
            reason = first_line(e)
            print(f"tinygen: --compile: torch.compile failed ({type(e).__name__}: {reason[:200]}); decoding without "
                  "it", file=sys.stderr)
            cpu_layout(model, 1)  # the layout eager decoding reads fastest
            self.compiled, self.fell_back = False, True
            return steps.decode(model, pool, kinds, x, evicting, scored, kernel)  # nothing was written yet
        self.first = False
        return logits

    def decoder(self, model, token, caches, pos) -> torch.Tensor:
        """generate's `decode`: decode_step through this step."""
        return decode_step(model, token, caches, pos, self)

    def warm_up(self, tok=None, cfg=None) -> float:
        """Compile now, on a throwaway sequence of 17 tokens (two blocks: the dynamic size) with cfg's caches
        (default: the full cache), so that the first real step does not; returns seconds."""
        from .fastgen.cache import make_caches
        from .fastgen.policy import FastGenConfig

        t0 = time.perf_counter()
        caches, on_tokens = make_caches(self.model, tok, cfg or FastGenConfig("full"), 40)
        prompt = list(range(1, 18))
        if on_tokens:
            on_tokens(prompt)
        prefill(self.model, prompt, caches)
        token = torch.zeros(1, dtype=torch.long, device=self.model.embed.weight.device)
        if on_tokens:
            on_tokens([0])
        self.decoder(self.model, token, caches, 17)
        return time.perf_counter() - t0


def compiled_step(model: Llama, tok, cfg) -> tuple[CompiledStep, float]:
    """The step compiled for `cfg`'s caches, warmed up (its start-up cost printed once, on stderr), and the seconds
    that took (--compile)."""
    step = CompiledStep(model)
    seconds = step.warm_up(tok, cfg)
    if step.compiled:
        print(f"[decode step compiled in {seconds:.1f} s]", file=sys.stderr)
    return step, seconds
