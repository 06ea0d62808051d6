"""The cache configurations under evaluation ("methods"), how to build their caches, and what they keep."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import TinygenError
from ..fastgen.cache import make_caches
from ..fastgen.policy import PUNCT, SPECIAL, FastGenConfig, kept_count, parse_policy
from .sinks import sink_window_caches, sink_window_kept

SINKS = "sinks"  # the StreamingLLM-style baseline: first N_SINKS tokens + a recent window
N_SINKS = 4
FIXED = ("local", "frequent", "local+frequent", SINKS)  # the fixed policies of the paper's comparison, plus sinks


@dataclass(frozen=True)
class Method:
    """policy: "auto", "full", a fixed FastGen policy ("local+frequent") or "sinks". ratio: the one budget knob of a
    fixed policy (local+frequent uses it for r_l and r_f alike; sinks for its window)."""
    policy: str
    threshold: float = 0.98
    local_ratio: float = 0.3
    frequent_ratio: float = 0.3
    matched_to: float | None = field(default=None, compare=False)  # the kv_budget whose kept fraction it matches
    profile: str = "paper"  # auto only: "paper" (threshold) or "budget" (kv_budget)
    kv_budget: float = 0.7
    layer_budgets: tuple[float, ...] | None = None  # budget profile: each layer's share (from a calibration)
    shapes: str = FastGenConfig.shapes  # budget profile: local+frequent, or the shape each head's profile picks

    @property
    def point(self) -> float:
        """What identifies an auto run in a sweep: its kv_budget or its threshold."""
        return self.kv_budget if self.profile == "budget" else self.threshold

    @property
    def ratio(self) -> float:
        return self.frequent_ratio if self.policy == "frequent" else self.local_ratio

    @property
    def label(self) -> str:
        if self.policy == "auto":
            if self.profile == "paper":
                return f"auto T={self.threshold:g}"
            calibrated = " calibrated" if self.layer_budgets else ""
            shapes = "" if self.shapes == FastGenConfig.shapes else f" shapes={self.shapes}"
            return f"auto budget={self.kv_budget:g}{calibrated}{shapes}"
        if self.policy == "full":
            return "full"
        return f"{self.policy} r={self.ratio:.3f}"

    def fastgen_config(self) -> FastGenConfig:
        return FastGenConfig(self.policy, self.profile, self.kv_budget,
                             layer_budgets=self.layer_budgets, shapes=self.shapes,
                             threshold=self.threshold, local_ratio=self.local_ratio, frequent_ratio=self.frequent_ratio)

    def to_json(self) -> dict:
        d = {"policy": self.policy, "label": self.label}
        if self.policy == "auto" and self.profile == "budget":
            d.update(profile="budget", kv_budget=self.kv_budget,
                     layer_budgets=list(self.layer_budgets) if self.layer_budgets else None, shapes=self.shapes)
        elif self.policy == "auto":
            d.update(profile="paper", threshold=self.threshold, local_ratio=self.local_ratio,
                     frequent_ratio=self.frequent_ratio)
        elif self.policy != "full":
            d.update(ratio=self.ratio, matched_to_budget=self.matched_to)
        return d


def with_ratio(policy: str, ratio: float, matched_to: float | None = None) -> Method:
    """A fixed policy at budget `ratio` (the knob budget matching searches)."""
    return Method(policy, local_ratio=ratio, frequent_ratio=ratio, matched_to=matched_to)


def check_policy(name: str):
    if name != SINKS:
        parse_policy(name)  # raises TinygenError on unknown names


def build_caches(model, tok, method: Method, max_len: int):
    """(caches, on_tokens) for a method; on_tokens is None when the caches need no token ids."""
    if method.policy == SINKS:
        return sink_window_caches(model, max_len, N_SINKS, method.ratio), None
    return make_caches(model, tok, method.fastgen_config(), max_len)


def policy_names(caches) -> list[list[str]] | None:
    """Per layer, per KV head policy names (FastGen caches only)."""
    if not hasattr(caches[0], "policies"):
        return None
    return [c.head_names() for c in caches]


def predicted_kept(policy: str, ratio: float, prompt_len: int, end_len: int) -> float:
    """Kept fraction of a fixed policy without special/punct at the end of a run that prefills `prompt_len` tokens and
    then decodes one token at a time up to `end_len`, from the lengths alone (every head keeps the same count).

    Mirrors the stores: at prefill a head keeps kept_count(L); each step it holds at most one more token than before,
    since an evicted token never comes back."""
    if policy == SINKS:
        count = lambda n: sink_window_kept(n, N_SINKS, ratio)
    else:
        bits = parse_policy(policy)
        cfg = FastGenConfig(policy, local_ratio=ratio, frequent_ratio=ratio)
        if bits & (SPECIAL | PUNCT):
            raise TinygenError(f"predicted_kept: {policy!r} keeps special/punct tokens, which depend on the text")
        count = lambda n: kept_count(bits, n, lambda _: 0, cfg)
    kept = count(prompt_len)
    for n in range(prompt_len + 1, end_len + 1):
        kept = min(count(n), kept + 1)
    return kept / end_len


def match_ratio(policy: str, lengths: list[tuple[int, int]], target: float, iters: int = 40) -> float:
    """The ratio at which the mean predicted kept fraction over runs (prompt_len, end_len) is closest to `target`.

    Bisection: the kept fraction is non-decreasing in the ratio (a step function, because budgets are ceilings), so the
    search converges to the step that straddles the target; the nearer of the two sides is returned."""
    mean = lambda r: sum(predicted_kept(policy, r, p, e) for p, e in lengths) / len(lengths)
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if mean(mid) < target:
            lo = mid
        else:
            hi = mid
    return lo if abs(mean(lo) - target) < abs(mean(hi) - target) else hi
