"""`cli.py --prompts-file FILE --out answers.jsonl`: answer every prompt of a file through the batch runner, so that
no finished answer is ever lost.

FILE is JSON Lines (or a JSON list) of records with `prompt`, `instruction` or `turns` (the first turn), as the
evaluation reads them. Each answer is appended to answers.jsonl as one JSON line the moment it finishes (`index`,
`text`, `generated_tokens`, `stop_reason`, `kept_fraction`, `kv_bytes`, or `error` for a prompt that cannot run),
flushed and fsynced, so the file holds every finished answer whatever ends the run: Ctrl-C, SIGTERM, SIGKILL, a
crash, a full disk. A line is whole or absent. A run that completes rewrites the file in input order; until then it
is in completion order. `--resume` keeps the answers already there and runs only the missing prompts.
"""
from __future__ import annotations

import json
import os
import sys
import time

from .batch import BatchRunner, BatchStats
from .projection import projected_bytes
from .cliutil import check_interrupted, exit_code, held, write_json_atomic, write_text_atomic
from .errors import TinygenError
from .eval.prompts import prompt_of, read_records


class AnswerLog:
    """answers.jsonl as it is written: `done` holds the records it has, by index."""

    def __init__(self, path: str, n_prompts: int, resume: bool):
        self.path, self.done = path, {}
        if resume and os.path.exists(path):
            self.done, whole = read_answers(path, n_prompts)
            if not whole:  # a line cut by a kill mid-write: drop it before appending after it
                write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in self.done.values()))
        # Without --resume the file starts afresh here, once the inputs are read and the model is loaded.
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if resume else os.O_TRUNC)
        try:
            self.fd = os.open(path, flags, 0o644)
        except OSError as e:
            raise TinygenError(f"cannot write {path}: {e.strerror or e}") from None

    def add(self, record: dict):
        """Append one answer, whole, to the disk; a signal waits until it is there."""
        data = (json.dumps(record) + "\n").encode("utf-8")
        with held():
            end = os.lseek(self.fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view):]
                os.fsync(self.fd)
            except OSError as e:
                try:
                    os.ftruncate(self.fd, end)  # no half line left for --resume to trip on
                except OSError:
                    pass
                raise TinygenError(f"cannot write {self.path}: {e.strerror or e}; the {len(self.done)} answers "
                                   "finished before are in it, and --resume goes on from there") from None
            self.done[record["index"]] = record

    def close(self, in_order: bool):
        os.close(self.fd)
        if in_order:
            write_text_atomic(self.path, "".join(json.dumps(self.done[i]) + "\n" for i in sorted(self.done)))


def read_answers(path: str, n_prompts: int) -> tuple[dict[int, dict], bool]:
    """The records of an answers file by index, and whether it ended on a whole line. A last line cut short (a kill
    during a write) is dropped; anything else that is not this program's record is an error."""
    try:
        text = open(path, "rb").read().decode("utf-8", errors="replace")
    except OSError as e:
        raise TinygenError(f"cannot read {path}: {e.strerror or e}") from None
    lines = text.split("\n")
    whole = lines[-1] == ""
    if not whole:
        lines = lines[:-1]  # the cut line
    done = {}
    for n, line in enumerate(lines[:-1] if whole else lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        index = record.get("index") if isinstance(record, dict) else None
        if type(index) is not int or not 0 <= index < n_prompts:
            raise TinygenError(f"--resume: {path} line {n} is not an answer of this prompts file ({n_prompts} "
                               "prompts)")
        done.setdefault(index, record)
    return done, whole


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
    errors: list[dict] = []
    prompts = []
    for i, (record, where) in enumerate(records):
        ids = tok.encode_prompt(prompt_of(record, where), a.system, chat=not a.no_chat)
        if len(ids) >= limit:
            errors.append({"index": i, "error": f"the prompt has {len(ids)} tokens; the model's context is {limit}"})
        else:
            prompts.append((i, ids))
    cap = None if a.kv_budget_mb is None else int(a.kv_budget_mb * 2**20)
    if cap is not None:
        need = {i: max(projected_bytes(model, fastgen, len(ids), a.max_new_tokens)) for i, ids in prompts}
        if prompts and min(need.values()) > cap:
            raise TinygenError(f"--kv-budget-mb {a.kv_budget_mb:g} is too small for any prompt: the smallest "
                               f"needs {min(need.values()) / 2**20:.2f} MiB of KV cache")
        too_big = {i for i, _ in prompts if need[i] > cap}
        errors += [{"index": i, "error": f"needs {need[i] / 2**20:.2f} MiB of KV cache, more than --kv-budget-mb "
                                         f"{a.kv_budget_mb:g}"} for i in sorted(too_big)]
        prompts = [(i, ids) for i, ids in prompts if i not in too_big]

    log = AnswerLog(a.out, len(records), a.resume)
    resumed = len(log.done)
    prompts = [(i, ids) for i, ids in prompts if i not in log.done]
    for record in errors:
        if record["index"] not in log.done:
            log.add(record)
    progress = Progress(len(records), show_progress)
    progress.done = len(log.done)

    def done(seq):
        log.add({"index": seq.index, "text": tok.decode(seq.out), "generated_tokens": len(seq.out),
                 "stop_reason": seq.stop_reason, "kept_fraction": round(seq.kept_fraction, 6),
                 "kv_bytes": seq.kv_bytes})
        progress.done += 1
        check_interrupted()  # a signal whose exception was swallowed stops the run here, the answer kept

    def on_step(stats, running, waiting):
        progress(stats, running, waiting)
        check_interrupted()  # between batch steps

    step_fn = None
    if a.compile:
        from .compiled import compiled_step

        step_fn = compiled_step(model, tok, fastgen)[0]
    from .graphs import graphs_wanted

    runner = BatchRunner(model, tok, fastgen, sampling, a.max_new_tokens, a.batch, cap, a.ignore_eos, on_step,
                         step_fn=step_fn, cuda_graphs=step_fn is None and graphs_wanted(a, model))
    try:
        stats = runner.run(prompts, done)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: every finished answer is already on the disk
        with held():
            log.close(in_order=False)
            print(f"\ninterrupted: {len(log.done)} of {len(records)} answers are in {a.out} (--resume goes on)",
                  file=sys.stderr)
        return exit_code(e)
    except BaseException:
        os.close(log.fd)
        raise
    progress(stats, 0, 0, final=True)
    log.close(in_order=True)
    report = {"batch": a.batch, "prompts": len(records), "resumed": resumed, "generated_tokens": stats.generated_tokens,
              "decode_tokens_per_second": round(stats.decode_tokens_per_second, 3),
              "peak_kv_bytes": stats.peak_kv_bytes, "peak_kv_bytes_full": stats.peak_kv_bytes_full,
              "seconds": round(stats.seconds, 3), "prefill_seconds": round(stats.prefill_seconds, 3),
              "max_running": stats.max_running, "kv_budget_mb": a.kv_budget_mb,
              "errors": sum(1 for r in log.done.values() if "error" in r), "policy": a.policy}
    print(f"[{len(records)} prompts ({resumed} already in {a.out}), {report['errors']} errors | batch {a.batch} (at "
          f"most {stats.max_running} running) | generated {stats.generated_tokens} tok | decode "
          f"{report['decode_tokens_per_second']:.1f} tok/s | peak KV {stats.peak_kv_bytes / 2**20:.2f} MiB vs full "
          f"{stats.peak_kv_bytes_full / 2**20:.2f} MiB | {stats.seconds:.1f} s]", file=sys.stderr)
    if a.stats_json:
        write_json_atomic(a.stats_json, report)
    return 0
