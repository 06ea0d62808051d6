"""FastGen policies: which parts of the context a KV head keeps, their budgets, and the knobs (FastGenConfig).

A policy is a set of components. `special` and `punct` keep every token of that kind (protected: never evicted);
`local` keeps the last ceil(r_l * L) tokens; `frequent` keeps the ceil(r_f * L) tokens ranked highest by mean
attention since they arrived (cumulative attention / the queries that saw them) among those no other component keeps;
`full` keeps everything. L is the current length.

How `auto` chooses (FastGenConfig.profile): "budget" (the default) gives every KV head a kept-fraction target
`kv_budget` (or its layer's share of it, from a calibration), kept as half recent window, half heavy hitters, or in
the shape the prompt's profile picks (`shapes`; fastgen/budget.py); "paper" gives each head the first of the
paper's candidates whose recovery reaches `threshold` (fastgen/profile.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import TinygenError

SPECIAL, PUNCT, FREQUENT, LOCAL, FULL = 1, 2, 4, 8, 16
COMPONENTS = {"special": SPECIAL, "punct": PUNCT, "frequent": FREQUENT, "local": LOCAL, "full": FULL}
# The paper's candidates, cheapest first; profiling picks the first whose recovery reaches the threshold.
CANDIDATES = (SPECIAL, SPECIAL | PUNCT, SPECIAL | PUNCT | FREQUENT, SPECIAL | PUNCT | FREQUENT | LOCAL, FULL)
# One letter per policy for the paper profile's policy map (the legend printed with the map spells each one out).
LETTERS = {SPECIAL: "s", SPECIAL | PUNCT: "p", SPECIAL | PUNCT | FREQUENT: "F", SPECIAL | PUNCT | FREQUENT | LOCAL: "L",
           FULL: "#", LOCAL: "w", FREQUENT: "f", LOCAL | FREQUENT: "h"}
PROFILES = ("budget", "paper")
SHAPES = ("local+frequent", "profile")  # budget profile: what a head's kept share is made of (FastGenConfig.shapes)


def policy_name(policy: int) -> str:
    return "+".join(name for name, bit in COMPONENTS.items() if policy & bit)


def policy_letter(policy: int) -> str:
    return LETTERS.get(policy, "?")


def parse_policy(name: str) -> int | None:
    """'auto' -> None (profile each head); 'local+frequent' -> LOCAL | FREQUENT; unknown names are an error."""
    if name == "auto":
        return None
    policy = 0
    for part in name.split("+"):
        if part not in COMPONENTS:
            raise TinygenError(f"unknown policy {name!r}: use auto, full, or components joined by '+' "
                               f"({', '.join(c for c in COMPONENTS if c != 'full')})")
        policy |= COMPONENTS[part]
    if policy & FULL and policy != FULL:
        raise TinygenError(f"policy {name!r}: 'full' cannot be combined with other components")
    return policy


@dataclass(frozen=True)
class FastGenConfig:
    policy: str = "auto"  # "auto" or a fixed policy for every head
    profile: str = "budget"  # how auto chooses: "budget" (kv_budget) or "paper" (threshold)
    kv_budget: float = 0.7  # budget profile: the kept fraction to spend across the model's KV heads
    observation: int = 32  # budget profile: the prompt's last rows whose attention is profiled (SnapKV's window)
    head_floor: float = 1.0  # budget profile: no head keeps less than this share of kv_budget (below 1 the
    # allocation moves memory between heads; on the default model every floor below 1 measured worse: docs/fastgen.md)
    shapes: str = "local+frequent"  # budget profile: every head keeps its share as half recent window, half heavy
    # hitters ("local+frequent"), or its prompt's profile picks frequent or local+frequent ("profile", which measured
    # worse than the fixed shape: docs/evaluation.md)
    layer_budgets: tuple[float, ...] | None = None  # budget profile at a floor of 1: each layer's own kept share in
    # place of kv_budget (from a calibration: docs/fastgen.md); kv_budget stays the target they average to
    threshold: float = 0.98  # paper profile: T, the attention a policy must recover
    local_ratio: float = 0.3  # paper profile and fixed policies: r_l
    frequent_ratio: float = 0.3  # paper profile and fixed policies: r_f

    def __post_init__(self):
        if self.profile not in PROFILES:
            raise TinygenError(f"--profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        if self.shapes not in SHAPES:
            raise TinygenError(f"--shapes must be one of {', '.join(SHAPES)}, got {self.shapes!r}")
        if not 0 < self.kv_budget <= 1:
            raise TinygenError(f"--kv-budget must be in (0, 1], got {self.kv_budget}")
        if not 0 <= self.head_floor <= 1:
            raise TinygenError(f"head_floor must be in [0, 1], got {self.head_floor}")
        if self.observation < 1:
            raise TinygenError(f"the observation window must be at least 1 row, got {self.observation}")
        if not 0 < self.threshold <= 1:
            raise TinygenError(f"--threshold must be in (0, 1], got {self.threshold}")
        for name in ("local_ratio", "frequent_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise TinygenError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.layer_budgets is not None:
            if not (self.budgeted and self.head_floor == 1):
                raise TinygenError("layer budgets are for the budget profile at a head floor of 1")
            if not all(0 < b <= 1 for b in self.layer_budgets):
                raise TinygenError(f"each layer budget must be in (0, 1], got {self.layer_budgets}")
        parse_policy(self.policy)

    @property
    def fixed_policy(self) -> int | None:
        return parse_policy(self.policy)

    @property
    def budgeted(self) -> bool:
        """auto with the budget profile: heads get per-head ratios (fastgen/budget.py)."""
        return self.policy == "auto" and self.profile == "budget"

    @property
    def model_wide(self) -> bool:
        """Budget profile below a floor of 1: the allocation moves memory between heads of different layers, so one
        planner waits for every layer's profile. At a floor of 1 every head keeps the budget and at most picks its
        shape, on its own: each layer compresses right after its own prefill (the same choices, tested)."""
        return self.budgeted and self.head_floor < 1


def window(policy: int, length: int, cfg: FastGenConfig) -> int:
    """Local window in tokens at this length (0 without `local`)."""
    return min(length, math.ceil(cfg.local_ratio * length)) if policy & LOCAL else 0


def frequent_budget(policy: int, length: int, cfg: FastGenConfig) -> int:
    """Heavy-hitter budget in tokens at this length (0 without `frequent`)."""
    return min(length, math.ceil(cfg.frequent_ratio * length)) if policy & FREQUENT else 0


def protected_kinds(policy: int) -> int:
    """Token-kind bits this policy never evicts (kinds use the same SPECIAL and PUNCT bits)."""
    return policy & (SPECIAL | PUNCT)


def kept_count(policy: int, length: int, protected_before, cfg: FastGenConfig) -> int:
    """The most tokens a head with this policy keeps at `length` (at prefill, exactly what it keeps; during decode
    a store keeps min(this, kept before + 1), since evicted tokens never return). Depends only on the length and
    the token kinds, so every head of one policy keeps the same number. `protected_before(n)` counts protected
    tokens among the first n."""
    if policy & FULL:
        return length
    w = window(policy, length, cfg)
    outside = length - w  # tokens older than the window
    prot = protected_before(outside)
    pool = outside - prot  # unprotected tokens outside the window: what `frequent` chooses from
    return w + prot + min(frequent_budget(policy, length, cfg), pool)
