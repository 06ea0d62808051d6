"""`cli.py --prompts-file FILE --out answers.jsonl`: answer every prompt of a file through the batch runner.

FILE is JSON Lines (or a JSON list) of records with `prompt`, `instruction` or `turns` (the first turn), as the
evaluation reads them. answers.jsonl gets one record per prompt in input order (`index`, `text`,
`generated_tokens`, `stop_reason`, `kept_fraction`, `kv_bytes`, or `error` for a prompt that cannot run), written
under a temporary name and renamed; after Ctrl-C it holds every answer finished so far.
"""
from __future__ import annotations

import json
import sys
import time

from .batch import BatchRunner, BatchStats, projected_bytes
from .cliutil import write_json_atomic, write_text_atomic
from .errors import TinygenError
from .eval.prompts import prompt_of, read_records


class Progress:
    """`[answers 12/80 done, 8 running, 123.4 tok/s]` on stderr, at most every `every` seconds."""

    def __init__(self, total: int, show: bool, every: float = 0.5):
        self.total, self.show, self.every, self.last, self.done = total, show, every, 0.0, 0

    def __call__(self, stats: BatchStats, running: int, waiting: int, final: bool = False):
        now = time.perf_counter()
        if not self.show or (now - self.last < self.every and not final):
            return
        self.last = now
        print(f"\r[answers {self.done}/{self.total} done, {running} running, "
              f"{stats.decode_tokens_per_second:.1f} tok/s]", end="\n" if final else "", file=sys.stderr, flush=True)


def run_prompts_file(a, model, tok, fastgen, sampling, show_progress: bool) -> int:
    records = read_records(a.prompts_file)
    limit = model.cfg.max_seq_len
    answers: dict[int, dict] = {}
    prompts = []
    for i, (record, where) in enumerate(records):
        ids = tok.encode_prompt(prompt_of(record, where), a.system, chat=not a.no_chat)
        if len(ids) >= limit:
            answers[i] = {"index": i, "error": f"the prompt has {len(ids)} tokens; the model's context is {limit}"}
        else:
            prompts.append((i, ids))
    cap = None if a.kv_budget_mb is None else int(a.kv_budget_mb * 2**20)
    if cap is not None:
        need = {i: projected_bytes(model, fastgen, len(ids), a.max_new_tokens)[1] for i, ids in prompts}
        if prompts and min(need.values()) > cap:
            raise TinygenError(f"--kv-budget-mb {a.kv_budget_mb:g} is too small for any prompt: the smallest "
                               f"needs {min(need.values()) / 2**20:.2f} MiB of KV cache")
        for i, _ in prompts:
            if need[i] > cap:
                answers[i] = {"index": i, "error": f"needs {need[i] / 2**20:.2f} MiB of KV cache, more than "
                                                   f"--kv-budget-mb {a.kv_budget_mb:g}"}
        prompts = [(i, ids) for i, ids in prompts if i not in answers]

    progress = Progress(len(records), show_progress)
    progress.done = len(answers)

    def done(seq):
        answers[seq.index] = {"index": seq.index, "text": tok.decode(seq.out), "generated_tokens": len(seq.out),
                              "stop_reason": seq.stop_reason, "kept_fraction": round(seq.kept_fraction, 6),
                              "kv_bytes": seq.kv_bytes}
        progress.done += 1

    def write_answers():
        write_text_atomic(a.out, "".join(json.dumps(answers[i]) + "\n" for i in sorted(answers)))

    runner = BatchRunner(model, tok, fastgen, sampling, a.max_new_tokens, a.batch, cap, a.ignore_eos, progress)
    try:
        stats = runner.run(prompts, done)
    except KeyboardInterrupt:
        write_answers()
        print(f"\ninterrupted: {len(answers)} of {len(records)} answers written to {a.out}", file=sys.stderr)
        return 130
    progress(stats, 0, 0, final=True)
    write_answers()
    report = {"batch": a.batch, "prompts": len(records), "generated_tokens": stats.generated_tokens,
              "decode_tokens_per_second": round(stats.decode_tokens_per_second, 3),
              "peak_kv_bytes": stats.peak_kv_bytes, "peak_kv_bytes_full": stats.peak_kv_bytes_full,
              "seconds": round(stats.seconds, 3), "prefill_seconds": round(stats.prefill_seconds, 3),
              "max_running": stats.max_running, "kv_budget_mb": a.kv_budget_mb,
              "errors": sum(1 for r in answers.values() if "error" in r), "policy": a.policy}
    print(f"[{len(records)} prompts, {report['errors']} errors | batch {a.batch} (at most {stats.max_running} "
          f"running) | generated {stats.generated_tokens} tok | decode {report['decode_tokens_per_second']:.1f} "
          f"tok/s | peak KV {stats.peak_kv_bytes / 2**20:.2f} MiB vs full {stats.peak_kv_bytes_full / 2**20:.2f} MiB"
          f" | {stats.seconds:.1f} s]", file=sys.stderr)
    if a.stats_json:
        write_json_atomic(a.stats_json, report)
    return 0
