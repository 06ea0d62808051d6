"""The decode step: one token for every running sequence, as one function of device tensors.

Everything a step decides is computed on the device from state that lives there, so the step needs no host value
that changes from step to step: the same function runs eagerly, compiled by torch.compile (`--compile`: one graph
for every length, eviction and batch of two or more), or replayed as a CUDA graph. Its inputs (`StepInputs`) are the
sampled ids, their positions, the batch slots they run in and `blocks`, a range whose size says how many blocks of
each row to read (the host's bound on the longest row, the one shape that changes); its state is the pool's
(tinygen/kvpool.py: K, V, positions, flags, scores, block tables, bitmaps and each row's policy, ratios, kept count and
freed slot) and the batch's token kinds (a per-position kind and prefix counts per protected-kind mask).

A step, for every row (one sequence, layer and KV head) at once (`plan`), before the layers:
- its length n = position + 1; the new token's kind from the vocabulary's kinds, written with its prefix counts;
- its budget at n, FastGen's kept_count (fastgen/policy.py) on the device: a local window w = min(n, ceil(r_l * n)),
  the protected tokens older than it (a prefix count at n - w), heavy hitters min(ceil(r_f * n), n), all of n for
  `full`;
- whether it evicts (kept + 1 > budget), where the new token goes (slot `kept`, or the slot the last eviction freed),
  whether it keeps it, and its kept count and hole moved on.
Then, layer by layer (`attend`): write the new key and value, attend over each row's slots [0, kept + 1) read through
its block table (or in place by the Triton paged kernel on CUDA), add the attention to the scores, set the new bit,
and evict the argmin of paged.keep_rank (the oldest, or the lowest mean attention, outside the protected tokens and
the window) where the budget says so. No Python loop over heads or sequences, no host read.

The host keeps a mirror of the kept counts (paged.PagedBatch), arithmetic on what it already knows (lengths and token
kinds), to reserve blocks before a step and bound its width; tests check the two agree.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .attention import compute_dtype
from .fastgen.policy import FREQUENT, FULL, LOCAL, PUNCT, SPECIAL


class StepInputs(NamedTuple):
    tokens: torch.Tensor  # (B,) long: each sequence's new token
    positions: torch.Tensor  # (B,) long: its position (the tokens before it)
    slots: torch.Tensor  # (B,) long: its batch slot
    blocks: torch.Tensor  # (nb,) long: block indices 0..nb-1, the blocks of each row the step reads (nb: its width)


class PoolState(NamedTuple):
    k: torch.Tensor  # (blocks, block_size, head_dim)
    v: torch.Tensor
    pos: torch.Tensor  # (blocks, block_size) int32
    prot: torch.Tensor  # (blocks, block_size) bool
    score: torch.Tensor  # (blocks, block_size) float32
    tables: torch.Tensor  # (rows, max_blocks) int32
    bitmap: torch.Tensor  # (rows, bytes) uint8
    policy: torch.Tensor  # (rows,) int32
    ratio: torch.Tensor  # (rows, 2) float64: local, frequent
    kept: torch.Tensor  # (rows,) long
    hole: torch.Tensor  # (rows,) bool
    freed: torch.Tensor  # (rows,) long


class KindState(NamedTuple):
    vocab: torch.Tensor  # (vocab,) uint8: each id's kind bits
    by_position: torch.Tensor  # (slots, max_len) uint8
    prefix: torch.Tensor  # (slots, 4, max_len + 1) int32


class Plan(NamedTuple):  # per row, (n_layers, P) each: P = B * n_kv_heads, in (sequence, KV head) order
    rows: torch.Tensor  # pool row ids
    blocks: torch.Tensor  # (n_layers, P, nb) block ids
    n_rows: torch.Tensor  # slots attended: kept + 1
    at: torch.Tensor  # the logical slot the new token goes to
    new_pos: torch.Tensor  # its position
    protected: torch.Tensor  # whether its kind is one the row's policy never evicts
    keep: torch.Tensor  # whether the row keeps it (its bit)
    evict: torch.Tensor  # whether the row evicts one token
    win_start: torch.Tensor  # the first position of the local window
    length: torch.Tensor  # n
    frequent: torch.Tensor  # whether the row ranks by mean attention


def ceil_share(ratio: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """min(n, ceil(ratio * n)) in float64, as policy.window and frequent_budget compute it on the host."""
    return torch.minimum(torch.ceil(ratio * n.double()).long(), n)


def plan(pool: PoolState, kinds: KindState, x: StepInputs, n_layers: int, n_kv_heads: int) -> Plan:
    """Every row's decisions for this step, and the new token's kind and prefix counts, its rows' kept counts and
    holes moved on (the step's bookkeeping, on the device)."""
    B, H, dev = x.tokens.shape[0], n_kv_heads, x.tokens.device
    n = x.positions + 1  # (B,) lengths with the new token
    kind = kinds.vocab[x.tokens]  # (B,) uint8
    kinds.by_position[x.slots, x.positions] = kind
    masks = torch.arange(4, device=dev)
    counts = kinds.prefix[x.slots[:, None], masks, x.positions[:, None]]  # (B, 4)
    kinds.prefix[x.slots[:, None], masks, n[:, None]] = counts + ((kind[:, None].int() & masks) != 0).int()

    layer = torch.arange(n_layers, device=dev)[:, None, None]
    rows = ((x.slots[None, :, None] * n_layers + layer) * H + torch.arange(H, device=dev)).flatten(1)  # (L, P)
    member = torch.arange(B * H, device=dev) // H  # (P,): each row's sequence
    n_r, slot_r, kind_r = n[member].expand_as(rows), x.slots[member].expand_as(rows), kind[member].int()
    policy, ratio, kept, hole = pool.policy[rows], pool.ratio[rows], pool.kept[rows], pool.hole[rows]
    protect = policy & (SPECIAL | PUNCT)
    w = torch.where(policy & LOCAL != 0, ceil_share(ratio[..., 0], n_r), 0)
    outside = n_r - w
    prot = kinds.prefix[slot_r, protect.long(), outside]  # protected tokens older than the window
    heavy = torch.where(policy & FREQUENT != 0, ceil_share(ratio[..., 1], n_r), 0)
    budget = torch.where(policy & FULL != 0, n_r, w + prot + torch.minimum(heavy, outside - prot))
    n_rows = kept + 1  # the new token's slot included
    target = torch.minimum(n_rows, budget)
    evict = n_rows > target
    # special/punct-only rows that do not keep the new token leave its slot to the next one
    keep = ~evict | (policy & (FREQUENT | LOCAL) != 0)
    at = torch.where(hole, pool.freed[rows], kept)
    pool.kept[rows] = target
    pool.hole[rows] = torch.where(keep, evict, hole)
    blocks = pool.tables[rows[..., None], x.blocks].long()  # (L, P, nb)
    return Plan(rows, blocks, n_rows, at, n_r - 1, (kind_r & protect) != 0, keep, evict, n_r - w, n_r,
                policy & FREQUENT != 0)


def keep_rank(pos, prot, score, win_start, length, frequent) -> torch.Tensor:
    """How much each slot deserves to stay: +inf for protected tokens and the local window (pos >= win_start), else
    the mean attention since arrival (cumulative score / the length - pos queries that saw it), or, without
    `frequent`, the position (newer stays). The decode step evicts its argmin; a chunk keeps its top (store.py).
    Ranking by the raw cumulative score (notes decision 6) would evict nearly every new token at once, since it
    competes with prompt tokens that summed a whole prompt's attention: see docs/fastgen.md. pos, prot, score
    (P, R); win_start, length, frequent: per row (P, 1) tensors, or numbers."""
    key = torch.where(torch.as_tensor(frequent, device=pos.device), score / (length - pos), pos.float())
    return key.masked_fill(prot | (pos >= win_start), float("inf"))


def _attend_gathered(q, keys, values, beyond, scored: bool):
    """q (P, groups, head_dim) over keys, values (P, R, head_dim), slots `beyond` (P, R) masked -> out (P, groups,
    head_dim) and, where scored, the probabilities (P, groups, R) float32. On the CPU: torch's fused attention where no
    probabilities are needed, else two products with the softmax's sum over R as a product too (a sum in the step's
    own code would make Inductor guard on R > 4096, where its C++ sums accumulate differently, and compile twice);
    elsewhere one masked matmul-softmax-matmul."""
    P, groups, head_dim = q.shape
    scale = head_dim**-0.5
    bias = torch.zeros(beyond.shape, dtype=q.dtype, device=q.device).masked_fill(beyond, float("-inf"))  # (P, R)
    if q.device.type == "cpu" and not scored:
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[:, None], keys[:, None].to(q.dtype), values[:, None].to(q.dtype), attn_mask=bias[:, None, None],
            scale=scale)  # (P, 1, groups, head_dim)
        return out[:, 0], None
    if q.device.type == "cpu":  # the probabilities are needed: two products, the softmax's sum a product too
        scores = (q.float() * scale) @ keys.float().transpose(1, 2) + bias[:, None].float()  # (P, groups, R)
        e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        probs = e / (e @ torch.ones(e.shape[-1], 1, device=e.device))  # (P, groups, R)
        return (probs @ values.float()).to(q.dtype), probs
    dt = compute_dtype(keys)
    scores = (q.to(dt) * scale) @ keys.to(dt).transpose(1, 2) + bias[:, None].to(dt)  # (P, groups, R)
    probs = torch.softmax(scores.float(), dim=-1)
    return (probs.to(dt) @ values.to(dt)).to(q.dtype), probs


def attend(pool: PoolState, p: Plan, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           evicting: bool, scored: bool, kernel: bool = False) -> torch.Tensor:
    """Layer i of the step for every row: q (P, groups, head_dim), k, v (P, head_dim) -> (P, groups, head_dim).
    evicting: some row of the batch may evict (a policy other than full); scored: some row ranks by attention."""
    P, groups, head_dim = q.shape
    bs = pool.k.shape[1]
    rows, blocks, n_rows, at, new_pos = p.rows[i], p.blocks[i], p.n_rows[i], p.at[i], p.new_pos[i]

    # 1. The new token into each row's slot `kept`, or the slot its last eviction freed. Writes index the pool's
    # tensors themselves (not a flattened view): a compiler then updates them in place instead of copying them.
    at_block, at_off = blocks.gather(1, (at // bs)[:, None])[:, 0], at % bs  # (P,) block id and offset
    pool.k.index_put_((at_block, at_off), k.to(pool.k.dtype))
    pool.v.index_put_((at_block, at_off), v.to(pool.v.dtype))
    pool.pos.index_put_((at_block, at_off), new_pos.to(torch.int32))
    pool.prot.index_put_((at_block, at_off), p.protected[i])
    pool.score.index_put_((at_block, at_off), torch.zeros_like(at_off, dtype=torch.float32))

    # 2. Attention over each row's slots [0, kept + 1), the rest masked; the scores.
    R = blocks.shape[1] * bs  # the slots of nb blocks
    beyond = torch.arange(R, device=q.device) >= n_rows[:, None]  # (P, R): past each row
    if kernel:  # CUDA: the Triton kernel reads the blocks in place (kernels/paged_attention.py)
        from .kernels.paged_attention import paged_add_scores, paged_decode

        tables, lengths = blocks.to(torch.int32), n_rows.to(torch.int32)
        out, lse = paged_decode(q, pool.k, pool.v, tables, lengths, R)
        if scored:
            paged_add_scores(q, pool.k, tables, lengths, lse, pool.score, R)
    else:  # gather the blocks (a copy, padded to the longest row), then one attention call for the batch
        flat = blocks.flatten()
        keys = pool.k.index_select(0, flat).view(P, -1, head_dim)  # (P, R, head_dim)
        values = pool.v.index_select(0, flat).view(P, -1, head_dim)
        out, probs = _attend_gathered(q, keys, values, beyond, scored)
        if scored:  # whole blocks at once; padded slots get 0 (their probability): the null block's, or a row's own
            pool.score.index_add_(0, flat, probs.mean(dim=1).view(-1, bs))  # unused slots

    # 3. Keep the new token (its bit) or, where the budget says so, evict one token per row.
    byte = new_pos // 8
    pool.bitmap[rows, byte] = pool.bitmap[rows, byte] | ((1 << new_pos % 8) * p.keep[i]).to(torch.uint8)
    if evicting:  # the slots' position, flag and score, read a whole block at a time
        flat = blocks.flatten()
        pos, prot, score = (t.index_select(0, flat).view(P, -1) for t in (pool.pos, pool.prot, pool.score))  # (P, R)
        key = keep_rank(pos, prot, score, p.win_start[i][:, None], p.length[i][:, None], p.frequent[i][:, None])
        victim = key.masked_fill(beyond, float("inf")).argmin(dim=1)  # (P,) logical slots
        gone = pos.gather(1, victim[:, None])[:, 0].long().clamp(min=0)
        evicts, byte = p.evict[i], gone // 8
        pool.bitmap[rows, byte] = pool.bitmap[rows, byte] & torch.where(evicts, ~(1 << gone % 8), -1).to(torch.uint8)
        pool.freed[rows] = torch.where(evicts, victim, pool.freed[rows])
    return out


def decode(model, pool: PoolState, kinds: KindState, x: StepInputs, evicting: bool, scored: bool,
           kernel: bool = False) -> torch.Tensor:
    """One decode step of the whole model for every sequence of the batch -> logits (B, vocab) float32."""
    c = model.cfg
    B, groups = x.tokens.shape[0], c.n_heads // c.n_kv_heads
    p = plan(pool, kinds, x, c.n_layers, c.n_kv_heads)
    cos, sin = model.rope_cos[x.positions], model.rope_sin[x.positions]  # (B, head_dim)
    h = model.embed(x.tokens)  # (B, dim)
    for i, layer in enumerate(model.layers):
        q, k, v = layer.attn.project(layer.attn_norm(h), cos, sin, B)  # (B, n_heads or n_kv_heads, 1, head_dim)
        out = attend(pool, p, i, q.reshape(-1, groups, c.head_dim), k.reshape(-1, c.head_dim),
                     v.reshape(-1, c.head_dim), evicting, scored, kernel)  # (P, groups, head_dim)
        h = h + layer.attn.output(out.view(B, c.n_heads, 1, c.head_dim))
        h = h + layer.ffn(layer.ffn_norm(h))
    return model.head(h)  # (B, vocab)
