"""A chat's second turn: what its prefill costs with the persisted cache, against prefilling the whole conversation.

    python bench/bench_chat.py                          # 2k-token history -> bench/results/chat_<device>.md
    python bench/bench_chat.py --history 512 --repeats 3

Method (also written beside the results):
- History: one user turn holding about --history tokens of Pride and Prejudice (from chapter 1) and a request to
  summarise it, through the chat template, and a greedy answer of --answer tokens. The cache holds it all.
- Turn 2: a user message of about n tokens (more of the book), for each n in --turn-tokens. Its new tokens (the end
  of the answer, the template's rendering of the message) are prefilled as one chunk into a copy of the history's
  caches (`persisted`), against a fresh cache prefilling the whole conversation (`from scratch`), alternating,
  median over --repeats after one warm-up each. The copy is made outside the timed region.
- Methods: the full cache and auto (the budget profile at its default 0.7).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine_lines, prompt_ids, timed, write_report  # noqa: E402
from tinygen.conversation import Conversation  # noqa: E402
from tinygen.fastgen.cache import make_caches  # noqa: E402
from tinygen.fastgen.policy import FastGenConfig  # noqa: E402
from tinygen.generate import decode_step, prefill  # noqa: E402
from tinygen.loader import load_model  # noqa: E402
from tinygen.tokenizer import Tokenizer  # noqa: E402

METHODS = {"full": FastGenConfig(policy="full"), "auto budget=0.7": FastGenConfig()}


def history(model, tok, cfg, passage: str, answer_tokens: int):
    """The conversation after turn 1, and caches that hold it."""
    conv = Conversation(tok)
    ids = conv.user_turn("Summarise this passage in a few sentences.\n\n" + passage)
    caches, on_tokens = make_caches(model, tok, cfg, model.cfg.max_seq_len)
    if on_tokens:
        on_tokens(ids)
    token = prefill(model, ids, caches).argmax(-1, keepdim=True)
    answer = [int(token)]
    while len(answer) < answer_tokens:
        if on_tokens:
            on_tokens(answer[-1:])
        token = decode_step(model, token, caches, len(ids) + len(answer) - 1).argmax(-1, keepdim=True)
        answer.append(int(token))
    conv.assistant_turn(answer)
    return conv, caches


def chunk_seconds(model, caches, pending: list[int], seen: int) -> float:
    mine = copy.deepcopy(caches)  # the layers share one TokenKinds (and planner): deepcopy keeps that sharing
    kinds = getattr(mine[0], "kinds", None)
    if kinds is not None:
        kinds.append(pending)
    return timed(prefill, model, pending, mine, seen)[0]


def scratch_seconds(model, tok, cfg, ids: list[int]) -> float:
    caches, on_tokens = make_caches(model, tok, cfg, model.cfg.max_seq_len)
    if on_tokens:
        on_tokens(ids)
    return timed(prefill, model, ids, caches)[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "weights" / "SmolLM2-135M-Instruct"))
    p.add_argument("--history", type=int, default=2048, help="tokens of book text in turn 1 (default 2048)")
    p.add_argument("--answer", type=int, default=32, help="tokens of turn 1's answer (default 32)")
    p.add_argument("--turn-tokens", default="16,64,256", help="turn 2 sizes in tokens of book text")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.model)
    tok = Tokenizer(a.model, model.cfg.eos_token_ids)
    book = tok.decode(prompt_ids(tok, a.history + 4096))
    cut = lambda n, at: tok.decode(tok.encode(book)[at : at + n])
    passage = cut(a.history, 0)
    sizes = [int(x) for x in a.turn_tokens.split(",")]

    rows = []
    for name, cfg in METHODS.items():
        conv, caches = history(model, tok, cfg, passage, a.answer)
        seen = caches[0].length
        for n in sizes:
            conv.user_turn("And this part?\n\n" + cut(n, a.history + 100))
            pending = conv.ids[seen:]
            chunk, scratch = [], []
            for i in range(a.repeats + 1):
                c = chunk_seconds(model, caches, pending, seen)
                s = scratch_seconds(model, tok, cfg, conv.ids)
                if i:  # the first of each is warm-up
                    chunk.append(c)
                    scratch.append(s)
            rows.append((name, len(conv.ids), len(pending), statistics.median(chunk), statistics.median(scratch)))
            print(f"{name}: conversation {len(conv.ids)} tokens, turn 2 prefills {len(pending)}: persisted "
                  f"{rows[-1][3] * 1e3:.1f} ms, from scratch {rows[-1][4] * 1e3:.1f} ms", flush=True)
            conv.undo_user_turn()

    device = "cpu"
    lines = [f"# A chat's second turn: persisted cache vs prefilling the conversation ({device})", "",
             *[f"- {x}" for x in machine_lines()],
             f"- settings: history {a.history} tokens of book text + {a.answer}-token answer; float32; "
             f"{a.threads} threads; median of {a.repeats} after one warm-up", "",
             "| method | conversation tokens | turn-2 new tokens | persisted (ms) | from scratch (ms) | "
             "persisted / scratch | ms per new token |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, total, new, c, s in rows:
        lines.append(f"| {name} | {total} | {new} | {c * 1e3:.1f} | {s * 1e3:.1f} | {c / s:.3f} | "
                     f"{c * 1e3 / new:.2f} |")
    write_report(Path(a.out) / f"chat_{device}.md", lines, __doc__)


if __name__ == "__main__":
    main()
