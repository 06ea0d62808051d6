"""Spending a kept-fraction budget across heads (or layers): the multiple-choice knapsack `allocate` solves.

Each head picks one option of a menu; option k costs cost[k] (a kept fraction) and recovers rec[h, k]. `allocate`
maximises the total recovery with the mean cost at most the target. The costs are whole multiples of a small unit
(1/20 for menu shares, 1/L for kept counts at length L), so where the table is small a dynamic programme over those
units is exact; past that, one price per kept token (a Lagrange multiplier) gives a bound, never worse than the best
uniform choice that fits.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

DP_CELLS = 1_500_000  # most (heads x options x budget units) the exact allocation visits: a few ms on a CPU core


def budget_grid(cost: torch.Tensor, most: int) -> int | None:
    """The smallest q <= most for which every cost is a whole number of units 1/q (20 for the menu's shares, the
    prompt length or a divisor of it for kept counts), None if there is none."""
    q = 1
    for c in set(cost.tolist()):
        q = math.lcm(q, Fraction(c).limit_denominator(most).denominator)
        if q > most:
            return None
    return q if all(abs(c * q - round(c * q)) <= 1e-9 for c in cost.tolist()) else None


def allocate(rec: torch.Tensor, cost: torch.Tensor, target: float, floor: float = 0.0) -> list[int]:
    """Each head's option (an index into the menu) maximising the total recovery with mean cost <= target, no head
    below `floor` x target (options cheaper than that are off its menu; if no allocation of the rest fits, every head
    takes its cheapest, the best of them on a tie).

    rec: (heads, options) recoveries; cost: (options,) kept fraction of each option (float64 on the host).

    Exact where the costs are whole numbers of a unit 1/q (the menu's shares, as layer_budgets prices them: q = 20;
    kept counts at a prompt length L: q divides L) and the budget left above every head's cheapest option is at most
    DP_CELLS / (heads x options) units: a multiple-choice knapsack solved by dynamic programming over those units, so
    no allocation that fits recovers more, uniform ones included. Ties (recoveries equal within 1e-9) go to the
    allocation that keeps the most tokens (a layer that measured no gain still takes what is left of the budget, and
    a target of 1 keeps everything), then to the earlier menu options, the last head first.
    Larger (the model-wide planner below a floor of 1, whose unit is one prompt token): the Lagrangian allocation
    (lagrangian), never worse than a uniform allocation that fits and within price x unspent budget of the optimum."""
    rec, cost = rec.double().cpu(), cost.double().cpu()
    n = rec.shape[0]
    on = (cost >= floor * target - 1e-9).nonzero().flatten()  # the menu above the floor (never empty: 1 >= floor)
    rec, cost = rec[:, on], cost[on]
    if float(cost.min()) > target + 1e-9:  # not even the cheapest options fit: each head's cheapest
        cheapest = (cost == cost.min()).nonzero().flatten()
        return on[cheapest[rec[:, cheapest].argmax(dim=1)]].tolist()
    span = n * (target - float(cost.min())) + 1e-9  # the budget left once every head takes its cheapest
    q = budget_grid(cost, max(1, min(1 << 20, int(DP_CELLS / (n * len(on) * span)))))
    return on[lagrangian(rec, cost, target) if q is None else knapsack(rec, cost, target, q)].tolist()


def knapsack(rec: torch.Tensor, cost: torch.Tensor, target: float, q: int) -> torch.Tensor:
    """allocate's exact case: every cost a whole number of units 1/q, and the cheapest option fits."""
    n = rec.shape[0]
    units = torch.round(cost * q).long()
    w = units - units.min()  # each option's units above the cheapest: the program spans only the spare budget
    spare = math.floor(target * n * q * (1 + 1e-12) + 1e-9) - n * int(units.min())  # past float rounding
    # best[c]: the most recovery of the heads so far with exactly c spare units spent (-inf: no allocation spends c).
    # Head h's option k moves the state from c - w[k] to c: read from a copy of best shifted right by the widest w.
    pad = int(w.max())
    shifted = torch.full((pad + spare + 1,), -math.inf, dtype=torch.float64)
    shifted[pad] = 0.0
    best = shifted[pad:]
    frm = torch.arange(spare + 1) + pad - w[:, None]  # (options, spare + 1): where each option's state comes from
    took = torch.empty(n, spare + 1, dtype=torch.long)
    for h in range(n):
        torch.max(shifted[frm] + rec[h, :, None], dim=0, out=(best, took[h]))  # the first best option on ties
    c = int((best >= best.max() - 1e-9).nonzero().max())  # the most tokens among the best
    choice = torch.empty(n, dtype=torch.long)
    for h in range(n - 1, -1, -1):  # back from the last head: the option that reached c, and where it came from
        choice[h] = took[h, c]
        c -= int(w[choice[h]])
    return choice


def lagrangian(rec: torch.Tensor, cost: torch.Tensor, target: float) -> torch.Tensor:
    """allocate's large case. One price per token (found by bisection, the lowest that fits) picks each head's
    option maximising recovery - price x cost: any allocation y that fits recovers at most this one's recovery +
    price x (the budget it leaves), since sum(rec_y) <= sum(max(rec - price x cost)) + price x budget. The leftover
    then goes, one upgrade at a time, where it recovers the most per token; a uniform allocation that fits and
    recovers more replaces the result."""
    n = rec.shape[0]
    pick = lambda price: (rec - price * cost).argmax(dim=1)  # noqa: E731
    lo, hi = 0.0, 1e4  # at price 0 every head takes its best recovery; at 1e4 its cheapest option
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost[pick(mid)].mean() <= target else (mid, hi)
    choice = pick(hi)
    spare = target * n - float(cost[choice].sum())
    while True:
        gain = rec - rec.gather(1, choice[:, None])  # (heads, options)
        extra = cost[None, :] - cost[choice][:, None]
        ok = (extra > 0) & (extra <= spare + 1e-9) & (gain > 0)
        if not ok.any():
            break
        rate = torch.where(ok, gain / extra.clamp(min=1e-12), torch.full_like(gain, -1.0))
        h, o = divmod(int(rate.argmax()), rate.shape[1])
        spare -= float(extra[h, o])
        choice[h] = o
    uniform = rec.sum(0).masked_fill(cost > target + 1e-9, -math.inf)  # every head the same option, where it fits
    if float(uniform.max()) > float(rec.gather(1, choice[:, None]).sum()) + 1e-9:
        return uniform.argmax().expand(n)
    return choice
