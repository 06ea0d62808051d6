"""The multi-turn eval over a prompt set: methods on every conversation (fixed policies matched to the compressed
method's kept fraction, as the single-turn sweep does), per-turn summaries and the markdown table."""
from __future__ import annotations

import math
import statistics
import time

from .methods import Method, match_ratio, with_ratio
from .metrics import spread, summarize
from .sweep import log
from .turns import evaluate_turns, reference_conversation


def run_conversations(model, tok, convs: list[dict], runs: list[tuple[Method, bool]], max_new_tokens: int,
                      refs: dict, stage: str = "") -> list[dict]:
    """Every (method, fresh) run on every conversation (fresh: an empty cache each turn, see evaluate_turns); `refs`
    keeps each conversation's full-cache reference between passes (about 25 MB per two-turn conversation at 64 new
    tokens a turn)."""
    records, t0 = [], time.perf_counter()
    for n, c in enumerate(convs, 1):
        ref = refs.get(c["id"])
        if ref is None:
            ref = refs[c["id"]] = reference_conversation(model, tok, c["turns"], max_new_tokens)
        line = []
        for m, fresh in runs:
            r = dict(evaluate_turns(model, tok, ref, m, fresh), id=c["id"])
            records.append(r)
            line.append(f"{r['method']['label']}: agree " + " / ".join(f"{t['agreement']:.3f}" for t in r["turns"])
                        + " kept " + " / ".join(f"{t['kept_fraction']:.3f}" for t in r["turns"]))
        eta = (time.perf_counter() - t0) / n * (len(convs) - n)
        log(f"[{stage}{n}/{len(convs)}] conversation {c['id']} (turns at " + ", ".join(str(t.start) for t in ref.turns)
            + f" tokens, {len(ref.ids)} in all, eta {eta:.0f} s) " + "; ".join(line))
    return records


def turns_eval(model, tok, convs: list[dict], method: Method, fixed: tuple[str, ...], max_new_tokens: int,
               fresh: bool = False):
    """`method` on every conversation (and, with `fresh`, the same method from an empty cache each turn), then each
    fixed policy with its ratio matched to the method's mean kept fraction at the end of the last turn. Returns
    (records, matching).

    The matching replays a fixed policy's budgets from the lengths alone (methods.match_ratio: prefill of turn 1's
    prompt, then one token at a time to the end). The later turns arrive as chunks instead, which changes nothing
    while a budget grows by at most one token per token added; the table shows each turn's measured kept fraction."""
    refs: dict = {}
    records = run_conversations(model, tok, convs, [(method, False)] + [(method, True)] * fresh, max_new_tokens, refs)
    matching = []
    if fixed:
        carried = [r for r in records if not r["method"].get("fresh")]
        lengths = [(r["turns"][0]["context_tokens"], r["turns"][-1]["length"]) for r in carried]
        target = summarize([r["turns"][-1] for r in carried])["kept_fraction"]["mean"]
        methods = []
        for policy in fixed:
            ratio = match_ratio(policy, lengths, target)
            methods.append((with_ratio(policy, ratio), False))
            matching.append({"policy": policy, "matched_to": method.label, "target_kept": target, "ratio": ratio})
        log("matched ratios: " + ", ".join(f"{x['policy']}={x['ratio']:.4f}" for x in matching))
        records += run_conversations(model, tok, convs, methods, max_new_tokens, refs, "fixed ")
    return records, matching


def change(xs) -> dict:
    """Mean and median of per-conversation differences, and the mean's standard error (the spread of a paired
    difference says more than the two means side by side)."""
    xs = list(xs)
    sem = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return dict(spread(xs), sem=sem)


def turn_summaries(records: list[dict]) -> list[dict]:
    """Per method (first-seen order): each turn's summary over conversations (summarize: each conversation weighs
    the same), and each later turn's agreement and KL change from turn 1, per conversation."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["method"]["label"], []).append(r)
    out = []
    for rs in groups.values():
        turns = []
        for i in range(len(rs[0]["turns"])):
            s = summarize([r["turns"][i] for r in rs])
            s["context_tokens"] = spread(r["turns"][i]["context_tokens"] for r in rs)
            s["stop_eos"] = sum(r["turns"][i]["stop"] == "eos" for r in rs) / len(rs)
            if i:
                s["agreement_change"] = change(r["turns"][i]["agreement"] - r["turns"][0]["agreement"] for r in rs)
                s["kl_change"] = change(r["turns"][i]["kl"] - r["turns"][0]["kl"] for r in rs)
                changed = [r["turns"][i]["heads_changed"] for r in rs]
                s["heads_changed"] = None if None in changed else spread(changed)
            turns.append(s)
        out.append({"method": rs[0]["method"], "turns": turns})
    return out


def turns_table(sums: list[dict]) -> str:
    """Markdown: one row per method and turn; later turns give the mean change in agreement from
    turn 1 over conversations, with its standard error."""
    head = ("| method | turn | context tokens (mean) | kept fraction | top-1 agreement (mean / median) | "
            "agreement vs turn 1 (± s.e.) | KL nats (mean / median) | log-lik drop | first departure (median) | "
            "KV MiB (physical / full) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    rows = []
    for s in sums:
        for i, x in enumerate(s["turns"]):
            change = ""
            if i:
                c = x["agreement_change"]
                change = f"{c['mean']:+.3f}" + (f" ± {c['sem']:.3f}" if not math.isnan(c["sem"]) else "")
            rows.append(f"| {s['method']['label']} | {i + 1} | {x['context_tokens']['mean']:.0f} | "
                        f"{x['kept_fraction']['mean']:.3f} | "
                        f"{x['agreement']['mean']:.3f} / {x['agreement']['median']:.3f} | {change} | "
                        f"{x['kl']['mean']:.4f} / {x['kl']['median']:.4f} | {x['ll_drop']['mean']:.4f} | "
                        f"{x['first_departure']['median']:.0f} | "
                        f"{x['kv_bytes']['mean'] / 2**20:.2f} / {x['kv_bytes_full']['mean'] / 2**20:.2f} |")
    return head + "\n".join(rows) + "\n"


def write_turns_report(out, stem: str, meta: dict, records: list[dict], matching: list[dict]) -> str:
    """{stem}.json (settings, machine, matching, per-turn summaries), {stem}_conversations.jsonl (one record per
    conversation and method, per-step agreement and KL included) and {stem}.md; returns the table."""
    from ..cliutil import write_json_atomic, write_text_atomic
    from .prompts import write_jsonl

    sums = turn_summaries(records)
    write_json_atomic(out / f"{stem}.json", dict(meta, matching=matching, methods=sums))
    write_jsonl(out / f"{stem}_conversations.jsonl", records)
    m = meta["machine"]
    n = len({r["id"] for r in records})
    match = "".join(f"; `{x['policy']}` at ratio {x['ratio']:.4f}" for x in matching)
    matched_to = matching[0]["matched_to"] if matching else "-"
    md = (f"# {stem}\n\n`{meta['command']}`\n\nmodel {meta['model']}, {meta['dtype']} on {meta['device']} "
          f"({m['processor']}, {m['cpu_count']} CPUs, torch threads {meta['threads']}, torch {m['torch']}); {n} "
          f"conversations of {meta['turns']} turns from {meta['prompts_file']}, up to {meta['max_new_tokens']} new "
          f"tokens a turn, greedy with the full cache, then teacher-forced through each method; each later turn's "
          f"prompt reaches the cache as one chunk. Means and medians over conversations of per-turn means; kept "
          f"fraction and KV bytes at the end of each turn; agreement vs turn 1: the mean over conversations of "
          f"(turn i - turn 1) ± its standard error. Fixed policies matched to {matched_to}'s kept fraction at "
          f"the end{match}.\n\n" + turns_table(sums))
    write_text_atomic(out / f"{stem}.md", md)
    return turns_table(sums)
