"""What a sequence will hold in the paged pool, known before it runs: admission compares these projections with the
pool's free blocks (batch.py), and `--prompts-file` refuses up front a prompt that could never fit."""
from __future__ import annotations

import math

from .fastgen.policy import FREQUENT, LOCAL, FastGenConfig, protected_kinds
from .kvpool import BLOCK_SIZE


def block_bytes(model, block_size: int = BLOCK_SIZE) -> int:
    """Bytes of one pool block: K and V of block_size tokens of one KV head, their positions (int32), protected
    flags and scores (float32)."""
    return block_size * (2 * model.cfg.head_dim * model.embed.weight.dtype.itemsize + 4 + 1 + 4)


def projected_bytes(model, cfg: FastGenConfig, prompt_tokens: int, max_new_tokens: int) -> tuple[int, int]:
    """Upper bounds on the bytes of the blocks one sequence's rows hold: (from its first decode step on, the most
    during its prefill). Steady: every row holds at most its kept share of the final length plus the new token's
    slot, in whole blocks. Prefill: a FastGen layer's rows hold the whole prompt until its profile has chosen
    (one layer at a time, or every layer at once where one planner allocates across the model), the layers before
    it what they keep; a full cache's, the whole prompt in every layer."""
    c = model.cfg
    final = min(c.max_seq_len, prompt_tokens + max_new_tokens)  # the caches' max_len: they never grow past it
    share = 1.0 if cfg.policy == "full" else kept_share(cfg)
    slots = min(final + 1, math.ceil(share * final) + 2)  # +1: local+frequent rounds two shares up; +1 the new slot
    per_layer = c.n_kv_heads * math.ceil(slots / BLOCK_SIZE)  # blocks of one layer's rows, kept share
    whole = c.n_kv_heads * math.ceil(prompt_tokens / BLOCK_SIZE)  # ... holding the whole prompt
    prefill = (c.n_layers * whole if cfg.policy == "full" or cfg.model_wide
               else (c.n_layers - 1) * per_layer + whole)
    return c.n_layers * per_layer * block_bytes(model), prefill * block_bytes(model)


def kept_share(cfg: FastGenConfig) -> float:
    """The most a sequence keeps, as a share of its length, known before profiling. The budget profile's heads take
    menu shares (steps of 0.05): at the default floor of 1 each takes the smallest one >= --kv-budget; below it
    the planner keeps the mean within the budget. Fixed local/frequent policies keep their ratios; anything that
    protects special/punctuation tokens (or the paper's profile) may keep everything."""
    from .fastgen.budget import SHARES

    menu_share = lambda b: min((s for s in SHARES if s >= b - 1e-9), default=1.0)  # noqa: E731  (smallest >= b)
    if cfg.budgeted and cfg.layer_budgets is not None:  # each layer's heads take the menu share at its budget
        return sum(map(menu_share, cfg.layer_budgets)) / len(cfg.layer_budgets)
    if cfg.budgeted:
        return min(1.0, max(cfg.kv_budget, menu_share(cfg.head_floor * cfg.kv_budget)))
    if cfg.fixed_policy is not None and not protected_kinds(cfg.fixed_policy):  # local and/or frequent
        return min(1.0, (cfg.local_ratio if cfg.fixed_policy & LOCAL else 0) +
                   (cfg.frequent_ratio if cfg.fixed_policy & FREQUENT else 0))
    return 1.0
