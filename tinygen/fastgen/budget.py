"""The budget profile: spend a kept-fraction target across the model's KV heads where it recovers the most attention.

Why not the paper's threshold: on SmolLM2-135M (GQA) a per-head threshold T loses, at equal memory, to giving every
head the same `frequent` or `local+frequent` budget (README, Evaluation). A threshold spends memory where a head
needs it to reach T, not where it buys most, and the mean over every prompt row predicts generation poorly.

What this does instead, per sequence:
1. Each layer's prefill records how much attention each key gets from the prompt's last `observation` rows (an
   observation window: those rows sit nearest the tokens to come; SnapKV's finding).
2. Each KV head may take one of a menu of options: `frequent` or `local+frequent` (half window, half heavy hitters)
   keeping a share 0.05, 0.10, ..., 0.95 of the tokens, or `full`. An option's value is the observation attention
   that the exact set the store would keep recovers: its window plus its heavy hitters, ranked as the store ranks
   them (mean attention since arrival over every prompt row, as fixed policies do: measured, that ranking keeps
   better tokens than the observation window's own).
3. `allocate` picks every head's option at once: the most recovery in all with the model keeping at most
   `kv_budget` of its tokens (a multiple-choice knapsack, solved exactly by dynamic programming where it is small;
   past that, one price per kept token). No head goes below `head_floor` x `kv_budget`. Uniform allocations are
   among the choices, so on the profile's own objective the result is never worse than any of them.

What was measured (README, "The budget profile"): on SmolLM2-135M the profile's objective and the generation's
fidelity disagree. Every floor below 1 (memory moved between heads, model-wide or within each layer) lost to the
same memory spread evenly; the observation window predicts which heads need more better than all prompt rows, but
it under-rates the late layers (17-24) whose generated tokens attend to the prompt. So the default floor is 1: every
head keeps kv_budget. A head's choice then depends on nothing outside it, so each layer plans alone, right after its
own prefill (`FastGenConfig.model_wide`). Left to choose is the shape: `FastGenConfig.shapes = "profile"` lets the
prompt pick `frequent` or `local+frequent` per head; the default, "local+frequent", gives every head half recent
window, half heavy hitters, which measured better (the profile picks `frequent` for most heads, and generated
tokens need the window), and then there is nothing to plan: no recoveries are computed.

What the prompt does not tell, a calibration can: `python -m tinygen.eval.calibrate` measures once per model how
much of the generated tokens' attention each option recovers in each layer, and `layer_budgets` spends kv_budget
across the layers by those curves (the same allocation, one row per layer). Each layer's heads then
keep its share, in the default shape or the one their prompt's profile picks (`FastGenConfig.layer_budgets`).

Budgets stay shares of the current length during decoding, so the kept fraction holds as the sequence grows.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from .allocate import allocate
from .policy import FREQUENT, FULL, LOCAL

SHARES = tuple(i / 20 for i in range(1, 20))  # kept shares on the menu: 0.05 ... 0.95


@dataclass(frozen=True)
class Option:
    """One head's cache: a policy and its ratios (the FastGenConfig knobs its store runs with)."""
    policy: int
    local_ratio: float = 0.0
    frequent_ratio: float = 0.0

    def kept(self, length: int) -> int:
        """Tokens the option keeps at `length` (no protected kinds: window, then heavy hitters outside it)."""
        if self.policy & FULL:
            return length
        w = min(length, math.ceil(self.local_ratio * length)) if self.policy & LOCAL else 0
        return w + min(length - w, math.ceil(self.frequent_ratio * length))

    def window(self, length: int) -> int:
        return min(length, math.ceil(self.local_ratio * length)) if self.policy & LOCAL else 0

    @property
    def share(self) -> float:
        """The share of the length it keeps: window plus heavy hitters (1 for `full`)."""
        return 1.0 if self.policy & FULL else self.local_ratio + self.frequent_ratio

    @property
    def label(self) -> str:
        """Short form for the policy map: f35 = frequent keeping 35%, h35 = local+frequent (half each), full."""
        if self.policy & FULL:
            return "full"
        return f"{'h' if self.policy & LOCAL else 'f'}{round(100 * self.share):02d}"


MENU = tuple([Option(FREQUENT, 0.0, s) for s in SHARES] + [Option(LOCAL | FREQUENT, s / 2, s / 2) for s in SHARES]
             + [Option(FULL)])


def smallest_share(menu, kv_budget: float) -> int:
    """Index of the option with the smallest share at or above kv_budget: a head's choice when the menu has one
    shape and every head keeps the budget (nothing left for the profile to choose)."""
    fits = [i for i, o in enumerate(menu) if o.share >= kv_budget - 1e-9]
    return min(fits, key=lambda i: menu[i].share)


def shape_menu(shapes: str) -> tuple[Option, ...]:
    """The options a head may take (FastGenConfig.shapes): "profile", the whole menu (the prompt's profile picks
    frequent or local+frequent); "local+frequent", only its local+frequent options and full."""
    return MENU if shapes == "profile" else tuple(o for o in MENU if o.policy & (LOCAL | FULL))


def rank_key(obs: torch.Tensor, obs_start: int) -> torch.Tensor:
    """(heads, L) mean observation attention per observation row that saw each key."""
    L = obs.shape[1]
    seen = L - torch.arange(L, device=obs.device).clamp(min=obs_start)  # observation rows i >= max(obs_start, j)
    return obs / seen


def option_recoveries(obs: torch.Tensor, obs_start: int, menu=MENU, key: torch.Tensor | None = None) -> torch.Tensor:
    """(heads, len(menu)): share of the observation window's attention that each option's kept set recovers.

    obs: (heads, L), column sums of the observation rows' (group-averaged) attention; each row sums to 1.
    key: (heads, L) how the store ranks heavy hitters (default: the observation window's own mean, rank_key)."""
    heads, L = obs.shape
    key = rank_key(obs, obs_start) if key is None else key
    order = key.argsort(dim=1, descending=True, stable=True)  # heads' keys, best first
    total = obs.sum(1, keepdim=True)  # the observation rows' attention in all
    mass = obs.gather(1, order)  # (heads, L) attention of each key, in rank order
    out = torch.empty(heads, len(menu), device=obs.device)
    by_window: dict[int, list[int]] = {}
    for i, o in enumerate(menu):
        by_window.setdefault(-1 if o.policy & FULL else o.window(L), []).append(i)
    for w, idx in by_window.items():
        if w < 0:
            out[:, idx] = 1.0
            continue
        outside = order < L - w  # (heads, L): ranked keys older than the window, the heavy-hitter pool
        cum_mass = torch.cumsum(mass * outside, dim=1)
        cum_count = outside.long().cumsum(dim=1)
        k = torch.tensor([menu[i].kept(L) - w for i in idx], device=obs.device)  # heavy hitters per option
        at = torch.searchsorted(cum_count, k.expand(heads, -1).contiguous())  # first rank reaching k of them
        top = torch.where(k > 0, cum_mass.gather(1, at.clamp(max=L - 1)), torch.zeros((), device=obs.device))
        out[:, idx] = (obs[:, L - w :].sum(1, keepdim=True) + top) / total
    return out


class BudgetPlanner:
    """Shared by the FastGen caches of one sequence (below a floor of 1; otherwise each layer has its own, of one
    layer): each layer registers at prefill; once all have (or at the first decode step, whichever comes first) one
    allocation chooses every head's option and each cache compresses."""

    def __init__(self, n_layers: int, kv_budget: float, floor: float = 0.0, menu=MENU):
        self.n_layers, self.kv_budget, self.floor, self.menu = n_layers, kv_budget, floor, menu
        self.waiting = []  # caches holding their prompt K/V and profile, in layer order

    def register(self, cache):
        self.waiting.append(cache)
        if len(self.waiting) == self.n_layers:
            self.plan()

    def plan(self):
        if not self.waiting:
            return
        t0 = time.perf_counter()
        first, L = self.waiting[0], self.waiting[0].length
        n = len(self.waiting) * first.n_kv_heads
        cost = torch.tensor([o.kept(L) / L for o in self.menu], dtype=torch.float64)
        shapes = {o.policy for o in self.menu if not o.policy & FULL}
        if self.kv_budget >= 1:  # every token: only `full` keeps them all as the sequence grows (at short prompts a
            # share of 0.95 rounds up to every token and would tie with it)
            choice = [next(i for i, o in enumerate(self.menu) if o.policy & FULL)] * n
        elif self.floor >= 1 and len(shapes) == 1:  # one shape, every head at the budget: nothing to choose, so no
            # recoveries; each head takes the smallest share at or above kv_budget, the share it then holds as the
            # sequence grows (batch.kept_share counts the same). allocate screens by the cost at this length, where
            # ceilings let a smaller share pass at short prompts or budgets off the 0.05 grid.
            choice = [smallest_share(self.menu, self.kv_budget)] * n
        else:
            # Options below the head floor are never chosen (allocate takes them off the menu): their recoveries are
            # not computed. At a floor of 1 (each layer at its own budget) that is most of the 39 options.
            on = (cost >= self.floor * self.kv_budget - 1e-9).nonzero().flatten().tolist()
            rec = torch.full((n, len(self.menu)), -1e9, device=first.stats.obs.device)
            rec[:, on] = torch.cat([option_recoveries(c.stats.obs, c.stats.obs_start, [self.menu[i] for i in on],
                                                      c.stats.mean_attention()) for c in self.waiting])
            choice = allocate(rec, cost, self.kv_budget, self.floor)
        first.profile_seconds += time.perf_counter() - t0  # the allocation, counted once (each layer adds its own)
        heads = first.n_kv_heads
        for i, cache in enumerate(self.waiting):
            cache.compress([self.menu[j] for j in choice[i * heads : (i + 1) * heads]])
        self.waiting = []


# ---- budgets per layer from a calibration (tinygen/eval/calibrate.py) ----

def layer_budgets(curves: torch.Tensor, kv_budget: float, menu=MENU, floor: float = 0.0) -> tuple[float, ...]:
    """Each layer's kept share from calibrated recovery curves, for a model-wide target of `kv_budget`.

    curves: (n_layers, len(menu)), a layer's mean recovery of the generated tokens' attention under each option
    (measured on calibration prompts). allocate picks every layer's option (one row per layer; exactly, as the shares
    sit on a grid of 0.05); a layer's budget is its option's share (1 for `full`), so the shares average to at most
    kv_budget. The heads of a layer then keep that share (FastGenConfig.shapes: local+frequent, or the shape each
    head's profile picks). The curves may hold both shapes; a layer is priced by its best option at each share. No
    layer goes below floor x kv_budget. The budget is spent (on a tie, the allocation keeping the most tokens): at a
    kv_budget of 1 every layer keeps everything, whatever its curve (one measured to gain nothing included)."""
    if kv_budget >= 1:  # only `full` keeps every token; said outright, so no curve can trade it for another option
        return (1.0,) * curves.shape[0]
    cost = torch.tensor([o.share for o in menu], dtype=torch.float64)
    return tuple(round(float(cost[i]), 4) for i in allocate(curves, cost, kv_budget, floor))


def weigh_by_sensitivity(curves: torch.Tensor, gains: torch.Tensor, budget: float, menu=MENU) -> torch.Tensor:
    """Curves in units of output fidelity: each layer's curve times what a unit of its recovery is worth, the KL a
    full cache there closed (gains, measured at an even `budget`) over the recovery it was missing at that budget."""
    share = {i: o.share for i, o in enumerate(menu) if not o.policy & FULL}
    nearest = min(share.values(), key=lambda s: abs(s - budget))
    at = [i for i, s in share.items() if abs(s - nearest) < 1e-9]  # the options at that budget (or the nearest)
    missing = (1 - curves[:, at].max(dim=1).values).clamp(min=1e-6)  # (n_layers,)
    return curves * (gains.clamp(min=0) / missing)[:, None]


class Calibration(NamedTuple):
    """A calibration file, read for one model: its (n_layers, len(menu)) curves, ready for layer_budgets, and the
    floor (share of the budget) no layer goes below."""
    curves: torch.Tensor
    floor: float

    def budgets(self, kv_budget: float) -> tuple[float, ...]:
        """Each layer's share for a model-wide kv_budget."""
        return layer_budgets(self.curves, kv_budget, floor=self.floor)


def read_calibration(path, n_layers: int, menu=MENU) -> Calibration:
    """A calibration file for a model of n_layers; TinygenError if it does not fit the model. Curves are the layers'
    recoveries, weighted by their output sensitivity where the file measured it (`layer_sensitivity` at
    `sensitivity_budget`: weigh_by_sensitivity)."""
    from ..errors import TinygenError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        labels, curves = data["menu"], torch.tensor(data["layer_recovery"], dtype=torch.float64)
        gains = data.get("layer_sensitivity")
        if gains is not None:  # a file that measured sensitivity says at which budget
            gains, at = torch.tensor(gains, dtype=torch.float64), float(data["sensitivity_budget"])
        floor = float(data.get("layer_floor", 0.0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise TinygenError(f"cannot read the calibration {path}: {e}") from None
    if labels != [o.label for o in menu]:
        raise TinygenError(f"the calibration {path} was made for another option menu (rerun tinygen.eval.calibrate)")
    if curves.shape != (n_layers, len(menu)):
        raise TinygenError(f"the calibration {path} has curves of shape {tuple(curves.shape)}; this model needs "
                           f"({n_layers}, {len(menu)}) (calibrate it: python -m tinygen.eval.calibrate)")
    if gains is not None:
        if gains.shape != (n_layers,):
            raise TinygenError(f"the calibration {path} has {gains.numel()} layer sensitivities for {n_layers} layers")
        curves = weigh_by_sensitivity(curves, gains, at, menu)
    return Calibration(curves, floor)


CALIBRATION_FILE = "fastgen_calibration.json"  # beside the weights (written by python -m tinygen.eval.calibrate)


def calibration_path(model_dir, given: str | None):
    """The calibration to use: `given` ("none": none), else the model directory's file if there is one."""
    if given is not None:
        return None if given == "none" else Path(given)
    path = Path(model_dir) / CALIBRATION_FILE
    return path if path.is_file() else None


def with_calibration(cfg, path, n_layers: int):
    """cfg with layer budgets from the calibration at `path` (None: cfg unchanged). Only the budget profile at a head
    floor of 1 takes them; for anything else cfg comes back as it was."""
    if path is None or not cfg.budgeted or cfg.head_floor != 1:
        return cfg
    return dataclasses.replace(cfg, layer_budgets=read_calibration(path, n_layers).budgets(cfg.kv_budget))
