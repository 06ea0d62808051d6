"""FastGenCache: the per-layer KV cache that profiles its heads at prefill and keeps only what each policy needs.

It is a PagedCache (tinygen/paged.py) like the full cache, so the model does not know which cache it runs with.
Prefill writes the prompt's K/V whole into the layer's rows of the pool, attends over the prompt (block by block,
collecting the profile), picks each KV head's policy, and each head's row then keeps what its policy keeps, giving
the blocks past it back to the pool; one `PolicyStore` per policy (and set of ratios) holds the heads' shared state.
Later chunks of several tokens (a chat's next turn) keep each head's policy and go through the stores' `extend`.
A decode step is the batch's: every row of every sequence in one attention call per layer.

A layer compresses right after its own prefill, so the pool holds one layer's whole prompt at a time beyond what
is kept, except with the budget profile below a head floor of 1: that allocates across the whole model, so every
layer's rows hold the whole prompt (a full cache of it) until the last layer's prefill, when the shared
`BudgetPlanner` compresses them all. Either way that is in the pool, counted where the pool is counted.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from ..errors import TinygenError
from ..paged import PagedCache, write_rows
from .kinds import TokenKinds
from .budget import BudgetPlanner, Option, shape_menu
from .policy import (FREQUENT, FULL, LOCAL, FastGenConfig, frequent_budget, kept_count, policy_name, protected_kinds,
                     window)
from .profile import ProfileStats, choose_policies, profiled_attention, recoveries
from .store import PolicyStore


class FastGenCache(PagedCache):
    def __init__(self, paged, slot: int, layer: int, n_heads: int, n_kv_heads: int, kinds: TokenKinds,
                 cfg: FastGenConfig, planner: BudgetPlanner | None = None):
        super().__init__(paged, slot, layer, n_kv_heads)
        self.n_heads, self.kinds, self.cfg = n_heads, kinds, cfg
        if cfg.budgeted and planner is None:
            # a lone layer spends the budget on its own heads
            planner = BudgetPlanner(1, cfg.kv_budget, cfg.head_floor, shape_menu(cfg.shapes))
        self.planner = planner
        self.policies: list[int] = []  # per KV head, set at prefill
        self.options: list[Option] | None = None  # per KV head, with the budget profile
        self.recovery: torch.Tensor | None = None  # (n_kv_heads, candidates), set at prefill with the paper profile
        self.stats: ProfileStats | None = None
        self.pending = False  # the prompt whole in the rows, awaiting the budget planner
        self.stores: list[PolicyStore] = []
        self.profile_seconds = 0.0
        paged.bind(slot, kinds)  # the decode step reads and writes the kinds on the device

    def attend(self, q, k, v):
        if self.pending and self.length:  # some layer never reached the planner (e.g. a layer swapped for a full cache)
            self.planner.plan()
        return super().attend(q, k, v)

    def extend(self, q, k, v):
        """A chunk after the prompt (a chat's next turn): each head keeps its policy."""
        self.length += k.shape[1]
        assert self.length <= self.pool.max_len, f"cache full: {self.length} > {self.pool.max_len}"
        assert len(self.kinds) >= self.length, "feed new tokens to TokenKinds before the model sees them"
        self.kinds.sync(self.length)
        out = torch.empty_like(q)
        for store in self.stores:
            out.index_copy_(0, store.q_index, store.extend(q, k, v, self.length))
        return out

    def prefill(self, q, k, v):
        """The prompt: attention over it, collecting the profile; its K/V go whole into the rows (as a full cache
        holds them), and once each head has its policy the rows keep what it keeps (`_build`)."""
        H, L = k.shape[:2]
        assert len(self.kinds) >= L, "feed the prompt's tokens to TokenKinds before prefill"
        self.kinds.sync(L)
        pos = torch.arange(L, device=k.device).expand(H, L)
        write_rows(self.pool, self.rows(), k, v, pos, torch.zeros(H, L, dtype=torch.bool, device=k.device), None)
        self.length = L
        if self.cfg.budgeted:
            # Column sums and the observation window's sums (no local-window sums).
            self.stats = ProfileStats(self.n_kv_heads, L, None, q.device, self.cfg.observation)
            out = profiled_attention(q, k, v, self.stats)
            self.pending = True
            self.planner.register(self)  # a lone layer's planner compresses it there and then
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
        key = None
        if stats is not None and fixed is None:
            # The paper's profile keeps the heavy hitters its recovery counted: the largest column sums (Eq. 1).
            key = stats.colsum
        elif stats is not None:
            # Fixed policies rank as decode steps evict: mean attention, the column sum over the L - j rows that saw j.
            key = stats.mean_attention()
        self._build([(p, self.cfg) for p in self.policies], key, stats.colsum if stats is not None else None)
        if q.is_cuda:
            torch.cuda.synchronize()
        self.profile_seconds = (stats.seconds if stats else 0.0) + time.perf_counter() - t0
        return out

    def compress(self, options: list[Option]):
        """Budget profile: keep, per KV head, what its option keeps of the prompt (called by the BudgetPlanner)."""
        t0 = time.perf_counter()
        # Heavy hitters are ranked as fixed policies rank them (mean attention since arrival, over every prompt row):
        # measured, that keeps better tokens than the observation window's ranking, which serves the allocation.
        self.options = list(options)
        self._build([(o.policy, dataclasses.replace(self.cfg, local_ratio=o.local_ratio,
                                                    frequent_ratio=o.frequent_ratio)) for o in options],
                    self.stats.mean_attention(), self.stats.colsum)
        self.profile_seconds += self.stats.seconds + time.perf_counter() - t0
        self.pending, self.stats = False, None

    def _build(self, head_cfgs: list[tuple[int, FastGenConfig]], key, scores):
        """One store per distinct (policy, ratios) of the heads, keeping in its rows what its policy keeps of the
        prompt they hold whole. key: (n_kv_heads, L) heavy-hitter ranking; scores: (n_kv_heads, L) the cumulative
        scores the kept slots start from."""
        L = self.length
        self.policies = [p for p, _ in head_cfgs]
        kinds = self.kinds.by_position[:L]
        for policy, cfg in sorted(set(head_cfgs), key=lambda pc: (pc[0], pc[1].local_ratio, pc[1].frequent_ratio)):
            heads = [h for h, pc in enumerate(head_cfgs) if pc == (policy, cfg)]
            store = PolicyStore(self, policy, heads, self.kinds, cfg)
            self.stores.append(store)
            kept = kept_count(policy, L, lambda n: self.kinds.protected_before(store.protect, n), cfg)
            if kept == L and not store.protect and not policy & FREQUENT:  # the rows hold it already
                store.set_kept(L)
                continue
            keep = self._initial_residency(policy, cfg, heads, key, kinds)  # (len(heads), L) bool
            positions = keep.nonzero()[:, 1].view(len(heads), kept)  # ascending per head = the logical slots
            prot = (kinds[positions] & store.protect) != 0
            store.compact(positions, prot, scores[heads].gather(1, positions) if policy & FREQUENT else None)

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
        return self.length * self.n_kv_heads if self.pending else super().kept_tokens()


def fastgen_caches(model, kinds: TokenKinds, cfg: FastGenConfig, max_len: int, paged=None, slot: int = 0,
                   first_len: int | None = None) -> list[FastGenCache]:
    """One FastGen cache per layer of `model`, up to max_len tokens, sharing the sequence's token kinds (and, with
    the budget profile below a floor of 1, one planner for the whole model; otherwise each layer plans its own
    heads): the rows of batch slot `slot` of `paged`, or, without one, of a sequence on its own (a batch of one,
    its pool with room for what this policy holds at first_len tokens, default max_len, doubling when that runs
    out)."""
    from ..paged import lone_batch

    c, lone = model.cfg, paged is None
    if lone:
        paged = lone_batch(model, max_len, first_len, cfg)
    if cfg.layer_budgets is not None:  # each layer plans alone, with its own share
        if len(cfg.layer_budgets) != c.n_layers:
            raise TinygenError(f"{len(cfg.layer_budgets)} layer budgets for a model of {c.n_layers} layers")
        planners = [BudgetPlanner(1, b, cfg.head_floor, shape_menu(cfg.shapes)) for b in cfg.layer_budgets]
    else:
        planner = (BudgetPlanner(c.n_layers, cfg.kv_budget, cfg.head_floor, shape_menu(cfg.shapes)) if cfg.model_wide
                   else None)
        planners = [planner] * c.n_layers
    caches = [FastGenCache(paged, slot, i, c.n_heads, c.n_kv_heads, kinds, cfg, p) for i, p in enumerate(planners)]
    if lone:
        paged.set_batch([(slot, caches)])
    return caches


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


def make_caches(model, tokenizer, cfg: FastGenConfig, max_len: int, paged=None, slot: int = 0,
                first_len: int | None = None):
    """Per-layer caches for `cfg.policy` and the hook that feeds them token ids (None for the full cache), for the
    sequence in batch slot `slot` of `paged`, or, without one, for a sequence on its own (see fastgen_caches).

    `full` uses the engine's plain full cache; anything else uses FastGen stores."""
    from ..generate import full_caches
    from .kinds import vocab_kinds

    if cfg.policy == "full":
        return full_caches(model, max_len, first_len, paged, slot), None
    kinds = TokenKinds(vocab_kinds(tokenizer), max_len, model.embed.weight.device)
    return fastgen_caches(model, kinds, cfg, max_len, paged, slot, first_len), kinds.append
