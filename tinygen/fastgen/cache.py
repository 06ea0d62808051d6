"""FastGenCache: the per-layer KV cache that profiles its heads at prefill and keeps only what each policy needs.

It implements the same `attend(q, k, v)` / `nbytes()` interface as the full cache, so the model does not know
which cache it runs with. Prefill attends over the whole prompt (block by block, collecting the profile), picks
each KV head's policy, and keeps the chosen rows in one `PolicyStore` per policy; the prompt's full K/V of the
layer is then dropped. Each decode step runs one batched attention per policy present in the layer.
"""
from __future__ import annotations

import time

import torch

from ..cache import storage_bytes
from .kinds import TokenKinds
from .policy import FREQUENT, FULL, LOCAL, FastGenConfig, frequent_budget, kept_count, protected_kinds, window
from .profile import ProfileStats, choose_policies, profiled_attention, recoveries
from .store import PolicyStore


class FastGenCache:
    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, max_len: int, kinds: TokenKinds,
                 cfg: FastGenConfig):
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.max_len, self.kinds, self.cfg = max_len, kinds, cfg
        self.length = 0
        self.policies: list[int] = []  # per KV head, set at prefill
        self.recovery: torch.Tensor | None = None  # (n_kv_heads, candidates), set at prefill with policy auto
        self.stores: list[PolicyStore] = []
        self.profile_seconds = 0.0

    def attend(self, q, k, v):
        T = k.shape[1]
        if self.length == 0:
            return self._prefill(q, k, v)
        assert T == 1, "FastGenCache takes the prompt in one prefill, then one token per step"
        self.length += 1
        assert self.length <= self.max_len, f"cache full: {self.length} > {self.max_len}"
        if len(self.stores) == 1:
            return self.stores[0].decode(q, k, v, self.length)
        out = torch.empty_like(q)
        for store in self.stores:
            out.index_copy_(0, store.q_index, store.decode(q, k, v, self.length))
        return out

    def _prefill(self, q, k, v):
        L = k.shape[1]
        assert len(self.kinds) >= L, "feed the prompt's tokens to TokenKinds before prefill"
        fixed = self.cfg.fixed_policy
        need_stats = fixed is None or bool(fixed & FREQUENT)
        stats = ProfileStats(self.n_kv_heads, L, window(LOCAL, L, self.cfg), q.device) if need_stats else None
        out = profiled_attention(q, k, v, stats)
        t0 = time.perf_counter()
        kinds = self.kinds.by_position[:L]
        if fixed is None:
            self.recovery = recoveries(stats, kinds, self.cfg)
            self.policies = choose_policies(self.recovery, self.cfg.threshold)
        else:
            self.policies = [fixed] * self.n_kv_heads
        self.length = L
        groups = self.n_heads // self.n_kv_heads
        for policy in sorted(set(self.policies)):
            heads = [h for h, p in enumerate(self.policies) if p == policy]
            keep = self._initial_residency(policy, heads, stats, kinds)  # (len(heads), L) bool
            kept = kept_count(policy, L, lambda n: self.kinds.protected_before(protected_kinds(policy), n), self.cfg)
            positions = keep.nonzero()[:, 1].view(len(heads), kept)  # ascending per head
            idx = positions[:, :, None].expand(-1, -1, self.head_dim)
            hk, hv = k[heads].gather(1, idx), v[heads].gather(1, idx)
            scores = stats.colsum[heads].gather(1, positions) if policy & FREQUENT else None
            self.stores.append(PolicyStore(policy, heads, self.n_kv_heads, groups, hk, hv, positions, scores, self.max_len,
                                           self.kinds, self.cfg))
        if q.is_cuda:
            torch.cuda.synchronize()
        self.profile_seconds = (stats.seconds if stats else 0.0) + time.perf_counter() - t0
        return out

    def _initial_residency(self, policy, heads, stats, kinds) -> torch.Tensor:
        """Which prompt tokens each head keeps: protected kinds, the local window, then the heaviest hitters ranked,
        as during decode, by mean attention (column sum over the L - j rows that saw token j)."""
        L = kinds.shape[0]
        if policy & FULL:
            return torch.ones(len(heads), L, dtype=torch.bool, device=kinds.device)
        base = (kinds & protected_kinds(policy)) != 0
        base |= torch.arange(L, device=kinds.device) >= L - window(policy, L, self.cfg)
        base = base.expand(len(heads), L).clone()
        budget = min(frequent_budget(policy, L, self.cfg), int((~base[0]).sum()))
        if budget:
            seen_by = torch.arange(L, 0, -1, device=kinds.device)
            candidates = (stats.colsum[heads] / seen_by).masked_fill(base, float("-inf"))
            base.scatter_(1, candidates.topk(budget, dim=1).indices, True)
        return base

    def kept_tokens(self) -> int:
        """Tokens held, summed over this layer's KV heads."""
        return sum(s.kept * s.kv_index.numel() for s in self.stores)

    def nbytes(self) -> int:
        return storage_bytes(*(t for s in self.stores for t in s.tensors()))


def fastgen_caches(model, kinds: TokenKinds, cfg: FastGenConfig, max_len: int) -> list[FastGenCache]:
    """One FastGen cache per layer of `model`, sharing the sequence's token kinds."""
    c = model.cfg
    return [FastGenCache(c.n_heads, c.n_kv_heads, c.head_dim, max_len, kinds, cfg) for _ in range(c.n_layers)]


def policy_map(caches: list[FastGenCache]) -> str:
    """Layers by KV heads, one letter per head, with a legend of the letters used."""
    from .policy import policy_letter, policy_name

    cells = [f"{i:2d} " + "".join(policy_letter(p) for p in c.policies) for i, c in enumerate(caches)]
    per_line = max(1, 72 // (len(cells[0]) + 2))
    lines = ["  ".join(cells[i : i + per_line]) for i in range(0, len(cells), per_line)]
    used = sorted({p for c in caches for p in c.policies})
    legend = ", ".join(f"{policy_letter(p)}={policy_name(p)}" for p in used)
    return "policy map (layer: one letter per KV head)\n" + "\n".join(lines) + "\n" + legend


def make_caches(model, tokenizer, cfg: FastGenConfig, max_len: int):
    """Per-layer caches for `cfg.policy` and the hook that feeds them token ids (None for the full cache).

    `full` uses the engine's plain full cache; anything else uses FastGen stores."""
    from ..generate import full_caches
    from .kinds import vocab_kinds

    if cfg.policy == "full":
        return full_caches(model, max_len), None
    kinds = TokenKinds(vocab_kinds(tokenizer), max_len, model.embed.weight.device)
    return fastgen_caches(model, kinds, cfg, max_len), kinds.append
