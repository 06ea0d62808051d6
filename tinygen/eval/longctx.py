"""Long context: perplexity of a compressed cache that profiles on the first part of each window and then scores the
rest token by token while it evicts, against the full cache on the same windows."""
from __future__ import annotations

import time

from ..cache import kept_fraction
from ..errors import TinygenError
from ..generate import full_caches
from ..perplexity import perplexity
from .methods import Method, build_caches


def long_context(model, tok, text: str, ctx: int, windows: int, methods: list[Method],
                 prefill_fraction: float = 0.5, log=lambda s: None) -> dict:
    """Perplexity over the first `windows` windows of `ctx` tokens of `text`, for the full cache and each method."""
    ids = tok.encode(text)
    if len(ids) < ctx * windows:
        have = len(ids) // ctx
        raise TinygenError(f"the text has {len(ids)} tokens: {have} window(s) of {ctx}, fewer than --windows {windows}")
    ids = ids[: ctx * windows]
    t0 = time.perf_counter()
    full_ppl, n = perplexity(model, ids, ctx, lambda k: (full_caches(model, k), None), None)
    out = {"ctx": ctx, "windows": windows, "prefill_fraction": prefill_fraction, "scored_tokens": n,
           "full": {"perplexity": full_ppl, "seconds": time.perf_counter() - t0}, "methods": []}
    log(f"long context: full cache perplexity {full_ppl:.4f} over {n} tokens")
    for m in methods:
        kept = []

        def make(k, m=m):
            caches, on_tokens = build_caches(model, tok, m, k)
            kept.append(caches)
            return caches, on_tokens

        t0 = time.perf_counter()
        ppl, _ = perplexity(model, ids, ctx, make, prefill_fraction)
        frac = sum(kept_fraction(c) for c in kept) / len(kept)
        out["methods"].append({"method": m.to_json(), "perplexity": ppl, "ratio_to_full": ppl / full_ppl,
                               "kept_fraction": frac, "kv_bytes": sum(x.nbytes() for x in kept[-1]),
                               "seconds": time.perf_counter() - t0})
        log(f"long context: {m.label} perplexity {ppl:.4f} ({ppl / full_ppl:.4f}x full), kept {frac:.3f}")
    return out


def long_context_md(res: dict) -> str:
    rows = [f"| full | {res['full']['perplexity']:.4f} | 1.0000 | 1.000 |"]
    rows += [f"| {m['method']['label']} | {m['perplexity']:.4f} | {m['ratio_to_full']:.4f} | {m['kept_fraction']:.3f} |"
             for m in res["methods"]]
    return (f"Long context: {res['windows']} window(s) of {res['ctx']} tokens, prefill and profile on the first "
            f"{res['prefill_fraction']:.0%}, the rest scored token by token ({res['scored_tokens']} tokens scored; the "
            f"full cache scores the same tokens in one forward).\n\n"
            "| cache | perplexity | / full | kept fraction (end) |\n| --- | --- | --- | --- |\n" + "\n".join(rows) + "\n")
