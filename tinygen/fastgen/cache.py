"""FastGenCache: the per-layer KV cache that profiles its heads at prefill and keeps only what each policy needs.

It implements the same `attend(q, k, v)` / `nbytes()` interface as the full cache, so the model does not know
which cache it runs with. Prefill attends over the whole prompt (block by block, collecting the profile), picks
each KV head's policy, and keeps the chosen rows in one `PolicyStore` per policy (and set of ratios); the prompt's
full K/V of the layer is then dropped. Later chunks of several tokens (a chat's next turn) keep each head's
policy and go through the stores' `extend`. A decode step attends over every store of the layer in one Triton kernel
launch on CUDA (`LayerRows`), and in one batched PyTorch attention per store on the CPU.

A layer compresses right after its own prefill, so only one layer's full K/V exists at a time, except with the
budget profile below a head floor of 1: that allocates across the whole model, so every layer holds its prompt K/V
(no more than a full cache of the prompt) until the last layer's prefill, when the shared `BudgetPlanner`
compresses them all.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from ..cache import attention_paths, storage_bytes
from ..errors import TinygenError
from .kinds import TokenKinds
from .budget import BudgetPlanner, Option, shape_menu
from .policy import (FREQUENT, FULL, LOCAL, FastGenConfig, frequent_budget, kept_count, policy_name, protected_kinds,
                     window)
from .profile import ProfileStats, choose_policies, profiled_attention, recoveries
from .store import LayerRows, PolicyStore


class FastGenCache:
    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, max_len: int, kinds: TokenKinds,
                 cfg: FastGenConfig, planner: BudgetPlanner | None = None):
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.max_len, self.kinds, self.cfg = max_len, kinds, cfg
        if cfg.budgeted and planner is None:
            # a lone layer spends the budget on its own heads
            planner = BudgetPlanner(1, cfg.kv_budget, cfg.head_floor, shape_menu(cfg.shapes))
        self.planner = planner
        self.length = 0
        self.policies: list[int] = []  # per KV head, set at prefill
        self.options: list[Option] | None = None  # per KV head, with the budget profile
        self.recovery: torch.Tensor | None = None  # (n_kv_heads, candidates), set at prefill with the paper profile
        self.stats: ProfileStats | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # prompt K/V awaiting the budget planner
        self.stores: list[PolicyStore] = []
        self.rows: LayerRows | None = None  # the stores' rows as device tables, where decode runs the Triton kernel
        self.profile_seconds = 0.0

    def attend(self, q, k, v):
        T = k.shape[1]
        if self.length == 0:
            return self._prefill(q, k, v)
        if self.pending is not None:  # some layer never reached the planner (e.g. a layer swapped for a full cache)
            self.planner.plan()
        self.length += T
        assert self.length <= self.max_len, f"cache full: {self.length} > {self.max_len}"
        assert len(self.kinds) >= self.length, "feed new tokens to TokenKinds before the model sees them"
        if T > 1:  # a chunk after the prompt (a chat's next turn): each head keeps its policy
            out = torch.empty_like(q)
            for store in self.stores:
                out.index_copy_(0, store.q_index, store.extend(q, k, v, self.length))
            if self.rows is not None:
                self.rows.refresh()
            return out
        if self.rows is not None:  # CUDA: every store's attention in one kernel launch
            grew = [store.append(k, v, self.length) for store in self.stores]
            if any(grew):
                self.rows.refresh()
            out = self.rows.attend(q)
            for store in self.stores:
                store.settle(self.length)
            return out
        if len(self.stores) == 1:
            return self.stores[0].decode(q, k, v, self.length)
        out = torch.empty_like(q)
        for store in self.stores:
            out.index_copy_(0, store.q_index, store.decode(q, k, v, self.length))
        return out

    def _prefill(self, q, k, v):
        L = k.shape[1]
        assert len(self.kinds) >= L, "feed the prompt's tokens to TokenKinds before prefill"
        if self.cfg.budgeted:
            # Column sums and the observation window's sums (no local-window sums).
            self.stats = ProfileStats(self.n_kv_heads, L, None, q.device, self.cfg.observation)
            out = profiled_attention(q, k, v, self.stats)
            self.length = L
            # (n_kv_heads, L, head_dim): a planner that waits for later layers keeps them past this step, so they
            # cannot stay views of this layer's qkv; a lone layer's planner compresses them inside register()
            self.pending = (k, v) if self.planner.n_layers == 1 else (k.contiguous(), v.contiguous())
            self.planner.register(self)
            return out
        fixed = self.cfg.fixed_policy
        need_stats = fixed is None or bool(fixed & FREQUENT)
        # The paper's profile needs the local-window sums of its `+local` candidate; fixed policies only column sums.
        stats = (ProfileStats(self.n_kv_heads, L, window(LOCAL, L, self.cfg) if fixed is None else None, q.device)
                 if need_stats else None)
        out = profiled_attention(q, k, v, stats)
        t0 = time.perf_counter()
        kinds = self.kinds.by_position[:L]
        if fixed is None:
            self.recovery = recoveries(stats, kinds, self.cfg)
            self.policies = choose_policies(self.recovery, self.cfg.threshold)
        else:
            self.policies = [fixed] * self.n_kv_heads
        self.length = L
        key = None
        if stats is not None and fixed is None:
            # The paper's profile keeps the heavy hitters its recovery counted: the largest column sums (Eq. 1).
            key = stats.colsum
        elif stats is not None:
            # Fixed policies rank as decode steps evict: mean attention, the column sum over the L - j rows that saw j.
            key = stats.mean_attention()
        self._build([(p, self.cfg) for p in self.policies], k, v, key, stats.colsum if stats is not None else None)
        if q.is_cuda:
            torch.cuda.synchronize()
        self.profile_seconds = (stats.seconds if stats else 0.0) + time.perf_counter() - t0
        return out

    def compress(self, options: list[Option]):
        """Budget profile: keep, per KV head, what its option keeps of the prompt (called by the BudgetPlanner)."""
        t0 = time.perf_counter()
        k, v = self.pending
        # Heavy hitters are ranked as fixed policies rank them (mean attention since arrival, over every prompt row):
        # measured, that keeps better tokens than the observation window's ranking, which serves the allocation.
        scores = self.stats.colsum
        key = self.stats.mean_attention()  # (n_kv_heads, L)
        self.options = list(options)
        self._build([(o.policy, dataclasses.replace(self.cfg, local_ratio=o.local_ratio,
                                                    frequent_ratio=o.frequent_ratio)) for o in options], k, v, key, scores)
        self.profile_seconds += self.stats.seconds + time.perf_counter() - t0
        self.pending, self.stats = None, None

    def _build(self, head_cfgs: list[tuple[int, FastGenConfig]], k, v, key, scores):
        """One store per distinct (policy, ratios) of the heads. key: (n_kv_heads, L) heavy-hitter ranking;
        scores: (n_kv_heads, L) the cumulative scores the kept rows start from."""
        L = k.shape[1]
        self.policies = [p for p, _ in head_cfgs]
        kinds = self.kinds.by_position[:L]
        groups = self.n_heads // self.n_kv_heads
        for policy, cfg in sorted(set(head_cfgs), key=lambda pc: (pc[0], pc[1].local_ratio, pc[1].frequent_ratio)):
            heads = [h for h, pc in enumerate(head_cfgs) if pc == (policy, cfg)]
            keep = self._initial_residency(policy, cfg, heads, key, kinds)  # (len(heads), L) bool
            kept = kept_count(policy, L, lambda n: self.kinds.protected_before(protected_kinds(policy), n), cfg)
            positions = keep.nonzero()[:, 1].view(len(heads), kept)  # ascending per head
            idx = positions[:, :, None].expand(-1, -1, self.head_dim)
            hk, hv = k[heads].gather(1, idx), v[heads].gather(1, idx)
            kept_scores = scores[heads].gather(1, positions) if policy & FREQUENT else None
            self.stores.append(PolicyStore(policy, heads, self.n_kv_heads, groups, hk, hv, positions, kept_scores,
                                           self.max_len, self.kinds, cfg))
        if attention_paths(k.device)[1] == "triton":
            self.rows = LayerRows(self.stores, groups)

    @staticmethod
    def _initial_residency(policy, cfg, heads, key, kinds) -> torch.Tensor:
        """Which prompt tokens each head keeps: protected kinds, the local window, then the heaviest hitters by
        `key` (n_kv_heads, L), the ranking decode steps evict by."""
        L = kinds.shape[0]
        if policy & FULL:
            return torch.ones(len(heads), L, dtype=torch.bool, device=kinds.device)
        base = (kinds & protected_kinds(policy)) != 0
        base |= torch.arange(L, device=kinds.device) >= L - window(policy, L, cfg)
        base = base.expand(len(heads), L).clone()
        budget = min(frequent_budget(policy, L, cfg), int((~base[0]).sum()))
        if budget:
            candidates = key[heads].masked_fill(base, float("-inf"))
            base.scatter_(1, candidates.topk(budget, dim=1).indices, True)
        return base

    def head_names(self) -> list[str]:
        """Per KV head, its policy (and, with the budget profile, the ratios it runs with)."""
        if self.options is None:
            return [policy_name(p) for p in self.policies]
        return [policy_name(o.policy) + ("" if o.policy & FULL else f" r_l={o.local_ratio:g} r_f={o.frequent_ratio:g}")
                for o in self.options]

    def kept_tokens(self) -> int:
        """Tokens held, summed over this layer's KV heads."""
        if self.pending is not None:
            return self.length * self.n_kv_heads
        return sum(s.kept * s.kv_index.numel() for s in self.stores)

    def nbytes(self) -> int:
        # The kernel's tables (`rows`: a few int64 per KV head) are not counted, as FullCache does not count its own.
        pending = self.pending or ()
        return storage_bytes(*pending, *(t for s in self.stores for t in s.tensors()))


def fastgen_caches(model, kinds: TokenKinds, cfg: FastGenConfig, max_len: int) -> list[FastGenCache]:
    """One FastGen cache per layer of `model`, sharing the sequence's token kinds (and, with the budget profile
    below a floor of 1, one planner for the whole model; otherwise each layer plans its own heads)."""
    c = model.cfg
    if cfg.layer_budgets is not None:  # each layer plans alone, with its own share
        if len(cfg.layer_budgets) != c.n_layers:
            raise TinygenError(f"{len(cfg.layer_budgets)} layer budgets for a model of {c.n_layers} layers")
        planners = [BudgetPlanner(1, b, cfg.head_floor, shape_menu(cfg.shapes)) for b in cfg.layer_budgets]
    else:
        planner = (BudgetPlanner(c.n_layers, cfg.kv_budget, cfg.head_floor, shape_menu(cfg.shapes)) if cfg.model_wide
                   else None)
        planners = [planner] * c.n_layers
    return [FastGenCache(c.n_heads, c.n_kv_heads, c.head_dim, max_len, kinds, cfg, p) for p in planners]


def policy_map(caches: list[FastGenCache]) -> str:
    """Layers by KV heads, one cell per head, with a legend of what the cells mean."""
    from .policy import policy_letter

    if caches[0].options is not None:  # budget profile: policy and kept share per head
        cells = [f"{i:2d} " + " ".join(f"{o.label:>4}" for o in c.options) for i, c in enumerate(caches)]
        legend = ("fNN = frequent (heavy hitters) keeping NN% of the tokens; hNN = local+frequent, half recent "
                  "window and half heavy hitters, NN% in all; full = every token")
        title = "policy map (layer: each KV head's policy and kept share)"
    else:
        cells = [f"{i:2d} " + "".join(policy_letter(p) for p in c.policies) for i, c in enumerate(caches)]
        used = sorted({p for c in caches for p in c.policies})
        legend = ", ".join(f"{policy_letter(p)} = {policy_name(p)}" for p in used)
        title = "policy map (layer: one letter per KV head)"
    per_line = max(1, 72 // (len(cells[0]) + 2))
    lines = ["  ".join(cells[i : i + per_line]) for i in range(0, len(cells), per_line)]
    return title + "\n" + "\n".join(lines) + "\n" + legend


def make_caches(model, tokenizer, cfg: FastGenConfig, max_len: int):
    """Per-layer caches for `cfg.policy` and the hook that feeds them token ids (None for the full cache).

    `full` uses the engine's plain full cache; anything else uses FastGen stores."""
    from ..generate import full_caches
    from .kinds import vocab_kinds

    if cfg.policy == "full":
        return full_caches(model, max_len), None
    kinds = TokenKinds(vocab_kinds(tokenizer), max_len, model.embed.weight.device)
    return fastgen_caches(model, kinds, cfg, max_len), kinds.append
