"""The server's engine loop: one thread owns the model, the tokenizer and one BatchRunner, and steps every running
sequence together, each with its own FastGen configuration (policy, budget). Requests come in and text goes out
through thread-safe hand-offs, so the HTTP side (asyncio) never waits on a decode step and the engine never waits on
a client.

A request's life: `submit` (any thread) puts it in the inbox, or refuses it when the waiting queue is full or the
server is draining. The loop hands it to the runner, which admits it when its projected KV fits under the cap.
After every `step` the loop turns each sequence's new tokens into text (StreamDecoder: no character is split),
holds back any tail that could be the start of a stop string, and posts the rest to the request through `post`
(the server's loop.call_soon_threadsafe onto an asyncio queue). A stop string ends the answer before it: the
sequence is cancelled with reason "stop" and its caches go at the next step. `cancel` (a client gone) does the
same and posts nothing more. Events posted: ("text", str) any number of times, then one ("done", finish_reason,
usage) or ("error", status, message).
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .batch import BatchRunner, Sequence
from .cache import full_kv_bytes
from .fastgen.policy import FastGenConfig
from .sampling import SamplingParams
from .tokenizer import StreamDecoder

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}  # runner's reason -> OpenAI's


class Unavailable(Exception):
    """The request cannot be queued now (the queue is full, or the server is shutting down): a 503."""


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    post: Callable[[tuple], None]  # thread-safe: hands one event to the HTTP side
    cfg: FastGenConfig | None = None  # its own FastGen configuration (None: the runner's)
    id: int = -1
    seq: Sequence | None = None
    decoder: StreamDecoder | None = None
    sent: int = 0  # tokens of seq.out already turned into text
    held: str = ""  # text not posted yet: it may be the start of a stop string
    closed: bool = False  # no more text: a stop string was found, or the client is gone
    stopped: bool = False  # a stop string ended it (even where the runner's own end came in the same step)
    gone: bool = False  # the client is gone: nothing more is posted at all
    submitted: float = field(default_factory=time.perf_counter)


def first_stop(text: str, stops: tuple[str, ...]) -> int:
    """Where the earliest stop string begins in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits, default=-1)


def unsafe_tail(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start of a stop string: text that must wait for more."""
    for n in range(min(len(text), max(map(len, stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0


def policy_label(cfg: FastGenConfig) -> str:
    """A configuration as /metrics names it: the policy, and auto's kv_budget under the budget profile."""
    return f"{cfg.policy}@{cfg.kv_budget:g}" if cfg.budgeted else cfg.policy


class Engine:
    """Owns the BatchRunner that `make_runner()` builds and steps it on its own thread (`start`). `submit` and
    `cancel` are safe from any thread; `drain` (safe in a signal handler: it only sets a flag) stops admitting and
    lets the running answers finish for `grace` seconds before cancelling them; `stop` ends the thread."""

    def __init__(self, make_runner: Callable[[], BatchRunner], tok, max_waiting: int, grace: float = 10.0):
        self.make_runner, self.tok = make_runner, tok
        self.runner = make_runner()
        self.max_waiting, self.grace = max_waiting, grace
        self.cond = threading.Condition()
        self.inbox: list[Request] = []  # guarded by cond, as are cancels and queued
        self.cancels: list[Request] = []
        self.queued = 0  # requests the runner holds but has not admitted, as of the last step
        self.active: dict[int, Request] = {}  # the engine thread's own
        self.ids = itertools.count()
        self.draining, self.stopping, self.drain_started = False, False, None
        self.finished: dict[str, int] = {}  # sequences ended, by reason (OpenAI's, plus "cancelled" and "error")
        self.by_policy: dict[str, int] = {}  # sequences ended, by policy (policy_label)
        self.tokens = deque()  # (time, tokens) of recent steps: the tokens/s of the last 10 s
        self.peak = 0
        self.metrics: dict = {}
        self.thread = threading.Thread(target=self._loop, name="tinygen-engine", daemon=True)

    def start(self):
        self._snapshot()
        self.thread.start()

    def submit(self, req: Request) -> None:
        with self.cond:
            if self.draining:
                raise Unavailable("the server is shutting down")
            if len(self.inbox) + self.queued >= self.max_waiting:
                raise Unavailable(f"{self.max_waiting} requests are already waiting")
            req.id = next(self.ids)
            self.inbox.append(req)
            self.cond.notify()

    def cancel(self, req: Request) -> None:
        with self.cond:
            self.cancels.append(req)
            self.cond.notify()

    def too_large(self, prompt_tokens: int, max_tokens: int, cfg: FastGenConfig | None = None) -> bool:
        """Whether such a request could never run under the cap, even alone, under its own FastGen configuration
        (projections only: any thread)."""
        return self.runner.too_large(self.runner.sequence(-1, [0] * prompt_tokens, max_tokens, cfg=cfg))

    def drain(self):
        self.draining = True  # no lock: a signal handler may call this while the main thread holds it

    def stop(self):
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join()

    def _loop(self):
        while True:
            with self.cond:
                while not (self.inbox or self.cancels or self.stopping) and self.runner.idle and not self.draining:
                    self.cond.wait(0.25)  # drain() does not notify (a signal handler must not take the lock)
                if self.stopping:
                    return
                new, self.inbox = self.inbox, []
                cancels, self.cancels = self.cancels, []
            for req in new:
                req.seq = self.runner.submit(req.id, req.prompt, req.max_tokens, req.sampling, req.cfg)
                req.decoder = StreamDecoder(self.tok)
                self.active[req.id] = req
            for req in cancels:
                if req.id in self.active and not req.gone:
                    req.gone = req.closed = True
                    self.runner.cancel(req.seq, "cancelled")
            if self.draining:
                self._drain_step()
            try:
                done = self.runner.step()
            except Exception as e:  # a bug or out of memory: fail what is in flight, start afresh, keep serving
                self._fail_all(f"internal error ({type(e).__name__}: {str(e)[:200]})")
                continue
            try:
                for req in list(self.active.values()):
                    self._emit(req, req.seq in done)
            except Exception as e:  # a bug here must not stop the thread: every client would wait forever
                self._fail_all(f"internal error ({type(e).__name__}: {str(e)[:200]})")
                continue
            with self.cond:
                self.queued = len(self.runner.waiting)
            if self.runner.idle or time.perf_counter() - self.tokens[-1][0] > 0.1:
                self._snapshot()  # summing every cache's bytes costs: a few times a second is enough
            if self.draining and self.runner.idle:
                with self.cond:
                    self.cond.wait(0.1)  # nothing left to do but wait for stop()

    def _drain_step(self):
        """While draining: requests not yet running get a 503; running ones finish, for `grace` seconds."""
        self.drain_started = self.drain_started or time.perf_counter()
        late = time.perf_counter() - self.drain_started > self.grace
        for req in list(self.active.values()):
            if not req.closed and (late or req.seq in self.runner.waiting):
                self.runner.cancel(req.seq, "cancelled")
                req.closed = True
                req.post(("error", 503, "the server is shutting down"))
                req.gone = True

    def _emit(self, req: Request, finished: bool):
        """Post the new text of one request, and its end once the runner is done with its sequence."""
        seq = req.seq
        if not req.closed:
            text = req.held + "".join(req.decoder.push(t) for t in seq.out[req.sent:])
            req.sent = len(seq.out)
            if finished:
                text += req.decoder.flush()
            cut = first_stop(text, req.stop)
            if cut >= 0:  # the answer ends before the stop string; the tokens past it are dropped
                text, req.closed, req.stopped = text[:cut], True, True
                self.runner.cancel(seq, "stop")
            keep = 0 if req.closed or finished else unsafe_tail(text, req.stop)
            req.held = text[len(text) - keep:]
            if len(text) > keep:
                req.post(("text", text[:len(text) - keep]))
        if finished or (seq.stop_reason and seq not in self.runner.running and seq not in self.runner.waiting):
            del self.active[req.id]  # the runner has let it go: its caches are freed
            finish = "stop" if req.stopped else FINISH.get(seq.stop_reason, "stop")
            reason = "cancelled" if req.gone else finish
            self.finished[reason] = self.finished.get(reason, 0) + 1
            label = policy_label(seq.cfg)
            self.by_policy[label] = self.by_policy.get(label, 0) + 1
            if not req.gone:
                req.post(("done", finish, self.usage(seq)))

    def usage(self, seq: Sequence) -> dict:
        """OpenAI's token counts, plus what the sequence's caches held when it ended and its own policy (kv_budget:
        auto's kept fraction under the budget profile, else None)."""
        c, dtype = self.runner.model.cfg, self.runner.model.embed.weight.dtype
        fed = len(seq.prompt) + max(0, len(seq.out) - (seq.stop_reason != "eos"))  # the last token is never fed
        return {"prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.out),
                "total_tokens": len(seq.prompt) + len(seq.out), "kept_fraction": round(seq.kept_fraction, 6),
                "kv_bytes": seq.kv_bytes, "kv_bytes_full": full_kv_bytes(c.n_layers, c.n_kv_heads, c.head_dim,
                                                                         fed, dtype), "policy": seq.cfg.policy,
                "kv_budget": seq.cfg.kv_budget if seq.cfg.budgeted else None}

    def _fail_all(self, message: str):
        for req in self.active.values():
            if not req.gone:
                req.post(("error", 500, message))
            label = policy_label(req.seq.cfg)
            self.by_policy[label] = self.by_policy.get(label, 0) + 1
        self.finished["error"] = self.finished.get("error", 0) + len(self.active)
        self.active.clear()
        self.peak = max(self.peak, self.runner.stats.peak_kv_bytes)
        self.runner = self.make_runner()  # its caches and pools are dropped with the old one
        with self.cond:
            self.queued = 0

    def _snapshot(self):
        """The figures /metrics reads, from tensor sizes the host knows (nothing is read from the device)."""
        r, now = self.runner, time.perf_counter()
        self.tokens.append((now, r.stats.generated_tokens + sum(len(s.out) for s in r.running)))
        while now - self.tokens[0][0] > 10:
            self.tokens.popleft()
        (t0, n0), (t1, n1) = self.tokens[0], self.tokens[-1]
        caches = [c for s in r.running for c in s.caches]
        row = 2 * r.model.cfg.head_dim * r.model.embed.weight.dtype.itemsize  # K and V of one token, one KV head
        self.metrics = {  # replaced whole, so a reader on another thread never sees half of it
            "running": len(r.running), "waiting": len(r.waiting) + len(self.inbox),
            "tokens_per_second": (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0,
            "decode_tokens_per_second": r.stats.decode_tokens_per_second,
            "kv_bytes_allocated": r.pool.nbytes(),  # the paged pool, allocated once
            "kv_bytes_used": r.pool.used_blocks() * r.pool.block_bytes(),  # its blocks the running sequences hold
            "preemptions": r.stats.preemptions,
            "kv_bytes_kept": row * sum(c.kept_tokens() for c in caches),
            "kv_bytes_full": row * sum(c.length * c.n_kv_heads for c in caches),
            "kv_bytes_peak": max(self.peak, r.stats.peak_kv_bytes), "kv_bytes_cap": r.cap or 0,
            "generated_tokens": r.stats.generated_tokens, "finished": dict(self.finished),
            "by_policy": dict(self.by_policy),
        }
