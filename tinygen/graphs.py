"""The decode step captured as CUDA graphs (`--cuda-graphs`, on by default on CUDA): one graph per batch-size bucket,
replayed every step, so a step costs one launch from the host instead of thousands.

step.decode (tinygen/step.py) is a function of device tensors, so it can be recorded once and replayed: what changes
between steps is written into the graph's static input buffers (the sampled ids, their positions, the batch slots)
and the state it reads and moves on (the pool's blocks, tables, bitmaps and row state, the token kinds) stays where
it is. Shapes cannot change inside a graph, so:
- batch sizes are bucketed, as nano-vllm does (1, 2, 4, 8, 16, 32, 64, ...): a step of B sequences replays the
  smallest bucket >= B, the rows past B padded with the batch's spare slot (its last, never a member: PagedBatch
  `spare`), whose rows are reset inside the graph after the step, and the null block it wrote scrubbed;
- every row reads its whole block table (`blocks` is the table's width): on CUDA the Triton kernel reads only each
  row's own slots (splits past a row's end exit at once), and the eviction's ranking runs over the width.
The first step of each bucket runs eagerly (warming up the kernels and libraries capture needs) and records the
graph for the next ones. Prefill stays eager. A pool that grows (a sequence on its own without a cap) has new storage: the graphs recorded
on the old one are dropped and recorded again.

Without CUDA (`capture=False`) the same padded step runs eagerly, which is how the CPU tests check the padding.
"""
from __future__ import annotations

import sys

import torch

from . import step as steps
from .errors import first_line
from .fastgen.policy import FULL
from .generate import decode_step

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def graphs_wanted(a, model) -> bool:
    """--cuda-graphs: on by default where the model is on CUDA (--no-cuda-graphs turns it off)."""
    return model.embed.weight.is_cuda and not a.no_cuda_graphs


def bucket(B: int) -> int:
    return next((b for b in BUCKETS if b >= B), B)


class GraphStep:
    """step.decode replayed as CUDA graphs, with step.decode's signature (PagedBatch.step's `fn`, BatchRunner's
    `step_fn`); `decoder` is generate's `decode`. A batch stepped through it needs a spare slot (PagedBatch spare)."""

    def __init__(self, model, spare: int | None = None, capture: bool | None = None):
        """spare: the batch slot that pads a bucket (never a member; None: a sequence on its own, bucket 1, no
        padding); capture: record CUDA graphs (default: where CUDA is)."""
        self.model, self.spare = model, spare
        self.capture = torch.cuda.is_available() if capture is None else capture
        self.graphs: dict[tuple, tuple] = {}
        self.mempool = torch.cuda.graph_pool_handle() if self.capture else None
        self.failed = False  # capturing failed once: the eager step from then on

    def _static(self, pool, kinds, Bk: int, evicting: bool, scored: bool, kernel: bool):
        """The bucket's static inputs and the function that runs the padded step and resets the spare slot."""
        c, dev = self.model.cfg, pool.k.device
        assert Bk == 1 or self.spare is not None, "a padded bucket needs the batch's spare slot"
        spare = 0 if self.spare is None else self.spare
        per_slot = c.n_layers * c.n_kv_heads
        spare_rows = torch.arange(spare * per_slot, (spare + 1) * per_slot, device=dev)
        x = steps.StepInputs(torch.zeros(Bk, dtype=torch.long, device=dev), torch.zeros(Bk, dtype=torch.long, device=dev),
                             torch.full((Bk,), spare, dtype=torch.long, device=dev),
                             torch.arange(pool.tables.shape[1], device=dev))
        if self.spare is not None:
            pool.tables[spare_rows] = 0  # the spare rows hold no block: they write the null block's slot 0
            pool.policy[spare_rows] = FULL

        def run():
            logits = steps.decode(self.model, pool, kinds, x, evicting, scored, kernel)
            if self.spare is not None:
                for t in (pool.kept, pool.hole, pool.freed):  # the spare rows as they were: empty
                    t.index_fill_(0, spare_rows, 0)
                pool.bitmap.index_fill_(0, spare_rows, 0)
                pool.k[0].zero_(), pool.v[0].zero_(), pool.score[0].zero_(), pool.prot[0].zero_()  # the null block
                pool.pos[0].fill_(-1)
            return logits

        return x, run, spare

    def __call__(self, model, pool: steps.PoolState, kinds: steps.KindState, x: steps.StepInputs, evicting: bool,
                 scored: bool, kernel: bool) -> torch.Tensor:
        assert model is self.model, "the model these graphs are for"
        if self.failed:
            return steps.decode(model, pool, kinds, x, evicting, scored, kernel)
        B = x.tokens.shape[0]
        Bk = bucket(B)
        key = (Bk, evicting, scored, kernel) + tuple(t.data_ptr() for t in (*pool, *kinds))
        if key not in self.graphs:  # this step eagerly (it warms up what capture needs), then record the bucket
            self.graphs = {k: g for k, g in self.graphs.items() if k[4:] == key[4:]}  # storage moved: record again
            logits = steps.decode(model, pool, kinds, x, evicting, scored, kernel)
            try:
                self.graphs[key] = self._record(pool, kinds, Bk, evicting, scored, kernel)
            except Exception as e:
                if not self.capture:
                    raise
                reason = first_line(e)
                print(f"tinygen: CUDA graph capture failed ({type(e).__name__}: {reason[:200]}); decoding without "
                      "graphs", file=sys.stderr)
                self.failed = True
            return logits
        static, run, graph, out, spare = self.graphs[key]
        static.tokens[:B], static.positions[:B], static.slots[:B] = x.tokens, x.positions, x.slots
        if B < Bk:  # the padding: token 0 at position 0 in the spare slot
            static.tokens[B:], static.positions[B:], static.slots[B:] = 0, 0, spare
        if graph is None:  # no CUDA: the same padded step, eagerly
            return run()[:B]
        graph.replay()
        return out[:B]

    def _record(self, pool, kinds, Bk, evicting, scored, kernel):
        static, run, spare = self._static(pool, kinds, Bk, evicting, scored, kernel)
        if not self.capture:
            return static, run, None, None, spare
        graph = torch.cuda.CUDAGraph()  # recording runs nothing: the state is untouched until a replay
        with torch.cuda.graph(graph, pool=self.mempool):
            out = run()
        return static, run, graph, out, spare

    def decoder(self, model, token, caches, pos) -> torch.Tensor:
        """generate's `decode`: decode_step through these graphs."""
        return decode_step(model, token, caches, pos, self)
