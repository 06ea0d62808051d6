"""Multi-turn fidelity: a conversation through the full cache (the reference), then the same tokens teacher-forced
through a compressed cache that carries the conversation from turn to turn.

The reference builds the conversation with `Conversation`: turn 1's prompt is prefilled, the full cache answers
greedily, the answer (without the EOS that ended it) joins the conversation, the next user message adds its
rendering, and the cache catches up on every token it has not seen (the answer's last token, which a generation that
stops at the length limit never feeds back, and the new turn's prompt) in one chunk: `prefill(model, chunk, caches,
start_pos=cache.length)`, a chunked prefill into the existing cache. A compressed cache then walks exactly the same
token sequence with the same chunk boundaries (FastGen profiles at turn 1's prefill; later turns arrive as chunks
into its compressed stores) and is scored per turn with the single-turn metrics (`step_metrics`): top-1 agreement and
KL against the full cache's distribution before each reference token, plus what it keeps at the end of each turn.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ..cache import full_kv_bytes, kept_fraction
from ..conversation import Conversation
from ..errors import TinygenError
from ..generate import decode_step, full_caches, prefill
from .methods import Method, build_caches, policy_names
from .metrics import mean, step_metrics
from .prompts import read_records, record_id


def load_conversations(path: str, n_turns: int, limit: int | None = None, start: int = 0) -> list[dict]:
    """[{"id", "turns": [question, ...]}]: the first `n_turns` user messages of each record's `turns` (MT-Bench),
    `limit` records from record `start` (0-based)."""
    out = []
    records = read_records(path)
    if start >= len(records):
        raise TinygenError(f"{path}: no prompts from record {start + 1} on")
    for i, (rec, where) in list(enumerate(records))[start:]:
        turns = rec.get("turns") if isinstance(rec, dict) else None
        if not isinstance(turns, list) or len(turns) < n_turns:
            raise TinygenError(f"{where}: {n_turns} turns needed (a 'turns' list of {n_turns} or more strings)")
        if not all(isinstance(t, str) and t.strip() for t in turns[:n_turns]):
            raise TinygenError(f"{where}: each of the first {n_turns} turns must be a non-empty string")
        out.append({"id": record_id(rec, i), "turns": turns[:n_turns]})
    return out[:limit] if limit else out


@dataclass
class TurnReference:
    """One answer of the reference. start: the conversation's length when the answer begins (everything before it is
    the history plus this turn's prompt); targets: the greedy tokens plus the stopping EOS, if any; logprobs:
    (len(targets), vocab) float32, the full cache's log-distribution before each target."""
    start: int
    targets: list[int]
    logprobs: torch.Tensor
    stop: str  # "eos" or "length"

    @property
    def answer(self) -> list[int]:
        """The ids that join the conversation: the targets without the EOS that ended them."""
        return self.targets[:-1] if self.stop == "eos" else self.targets


@dataclass
class ConversationReference:
    """ids: every token of the conversation (prompts and answers, no stopping EOS); turns: one TurnReference each."""
    ids: list[int]
    turns: list[TurnReference]


def catch_up(model, caches, on_tokens, ids: list[int]) -> torch.Tensor:
    """Feed the tokens of `ids` the caches have not seen (ids[length:]) as one chunk -> the last position's logits
    (vocab,). At length 0 this is the prefill; afterwards a chunked prefill into the existing caches."""
    n = caches[0].length
    chunk = ids[n:]
    assert chunk, f"nothing to catch up on: the caches have seen all {n} tokens"
    if on_tokens:
        on_tokens(chunk)
    return prefill(model, chunk, caches, start_pos=n)


@torch.inference_mode()
def reference_conversation(model, tok, questions: list[str], max_new_tokens: int,
                           system: str | None = None) -> ConversationReference:
    """Greedy answers to each question in turn with one full cache that persists across turns."""
    limit = model.cfg.max_seq_len
    caches = full_caches(model, limit)  # the conversation's length is known only as it goes
    conv = Conversation(tok, system)
    device = model.embed.weight.device
    turns = []
    for q in questions:
        conv.user_turn(q)
        start = len(conv.ids)
        if start + max_new_tokens > limit:
            raise TinygenError(f"the conversation ({start} tokens + {max_new_tokens} new) passes the model's context "
                               f"of {limit}")
        logits = catch_up(model, caches, None, conv.ids)
        targets, rows, stop = [], [], "length"
        while True:
            rows.append(torch.log_softmax(logits.float(), -1))
            token = int(logits.argmax())
            targets.append(token)
            if token in tok.eos_ids:
                stop = "eos"
                break
            if len(targets) >= max_new_tokens:
                break  # this last token is not fed: the next turn's chunk starts with it
            logits = decode_step(model, torch.tensor([token], device=device), caches, start + len(targets) - 1)
        turns.append(TurnReference(start, targets, torch.stack(rows), stop))
        conv.assistant_turn(turns[-1].answer)
    return ConversationReference(list(conv.ids), turns)


@torch.inference_mode()
def forced_turns(model, ref: ConversationReference, caches, on_tokens, after_turn=None) -> list[torch.Tensor]:
    """Teacher-force the reference's conversation through `caches`: per turn, catch up on the history and the turn's
    prompt in one chunk, then feed the turn's targets[:-1] one by one. Returns each turn's (len(targets), vocab)
    log-distributions; `after_turn(i)` is called when turn i's last step is done (to read what the caches keep)."""
    device = model.embed.weight.device
    out = []
    for i, turn in enumerate(ref.turns):
        logits = catch_up(model, caches, on_tokens, ref.ids[: turn.start])
        rows = [torch.log_softmax(logits.float(), -1)]
        for j, token in enumerate(turn.targets[:-1]):
            if on_tokens:
                on_tokens([token])
            logits = decode_step(model, torch.tensor([token], device=device), caches, turn.start + j)
            rows.append(torch.log_softmax(logits.float(), -1))
        out.append(torch.stack(rows))
        if after_turn:
            after_turn(i)
    return out


def evaluate_turns(model, tok, ref: ConversationReference, method: Method, fresh: bool = False) -> dict:
    """One method on one conversation: per turn, the step metrics' means, the first disagreement, and what the cache
    keeps at the end of the turn (kept fraction, physical bytes against a full cache of the same length, the mix of
    head policies and how many heads hold another policy than at the end of the turn before).

    fresh: each turn starts from an empty cache that prefills (and profiles) the whole history at once, as a one-shot
    run of the conversation so far would; the control that says what carrying the compressed cache costs."""
    cfg = model.cfg
    ends, logprobs = [], []
    for walk in ([[t] for t in ref.turns] if fresh else [ref.turns]):  # the turns one cache walks through
        caches, on_tokens = build_caches(model, tok, method, len(ref.ids))

        def after_turn(_):
            ends.append({"kept_fraction": kept_fraction(caches), "kv_bytes": sum(c.nbytes() for c in caches),
                         "length": caches[0].length, "names": policy_names(caches)})

        logprobs += forced_turns(model, ConversationReference(ref.ids, walk), caches, on_tokens, after_turn)
    names = [end.pop("names") for end in ends]  # per turn: per layer, per KV head policy names (None: no FastGen)
    turns, fed = [], 0
    for i, (turn, lp, end) in enumerate(zip(ref.turns, logprobs, ends)):
        steps = step_metrics(turn.logprobs, lp, turn.targets)
        changed = None
        if i and names[i]:  # heads whose policy (or share) differs from the turn before
            changed = sum(a != b for la, lb in zip(names[i - 1], names[i]) for a, b in zip(la, lb))
        turns.append({
            "turn": i + 1, "prompt_tokens": turn.start - fed, "context_tokens": turn.start, "steps": len(turn.targets),
            "stop": turn.stop, "agreement": mean(steps["agree"]), "kl": mean(steps["kl"]),
            "ll_full": mean(steps["ll_full"]), "ll": mean(steps["ll"]),
            "first_departure": next((k for k, a in enumerate(steps["agree"]) if not a), None), **end,
            "kv_bytes_full": full_kv_bytes(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, end["length"],
                                           model.embed.weight.dtype),
            "policy_counts": dict(Counter(p for layer in names[i] for p in layer)) if names[i] else None,
            "heads_changed": changed,
            "per_step": {"agree": steps["agree"], "kl": [round(x, 6) for x in steps["kl"]]},
        })
        fed = 0 if fresh else end["length"]  # what the next turn's first model call starts from
    m = method.to_json()
    if fresh:
        m.update(label=m["label"] + ", fresh each turn", fresh=True)
    return {"method": m, "turns": turns}
