"""`python cli.py --chat`: a conversation on the terminal whose caches carry it from turn to turn.

Each user turn prefills only its own tokens (`Conversation` gives them: the template's rendering of the new message
as a difference from the history, plus any answer token not yet fed back) into the caches the earlier turns filled.
The full cache appends them to its rows; FastGen's stores take them as a chunk: every head keeps the policy its
first profile gave it, attends over what it holds plus the chunk, and evicts down to its budget at the new length
(store.py, `extend`), giving blocks back to the conversation's pool. Re-profiling on a later turn could move a head
to a dearer policy, but it could not get back the tokens its old policy evicted, so a head keeps its policy for the
whole conversation.

Commands: /reset, /stats, /exit. Ctrl-C stops the answer being written and keeps the session; Ctrl-D ends it, and
SIGTERM ends it at once (exit 143; the stats file holds every finished turn). With
stdin not a terminal every line is one user turn, so a conversation can be scripted.
"""
from __future__ import annotations

import signal
import sys
from typing import Callable

from .cache import cache_figures
from .cliutil import check_interrupted, exit_code, handled, write_json_atomic
from .conversation import Conversation
from .errors import TinygenError
from .fastgen.cache import make_caches, policy_map
from .generate import GenerationStats, decode_step, generate
from .tokenizer import StreamDecoder

COMMANDS = {"/reset": "start a new conversation", "/stats": "tokens, kept fraction, KV bytes and the policy map",
            "/exit": "end the session (or Ctrl-D)"}


class ChatSession:
    """One conversation: its token ids and the per-layer caches that hold it."""

    def __init__(self, model, tok, fastgen, sampling, max_new_tokens: int, system: str | None = None,
                 progress=None, ignore_eos: bool = False, decode=None):
        """decode: generate's step function (compiled.CompiledStep.decoder with --compile)."""
        self.decode = decode or decode_step
        self.model, self.tok, self.fastgen, self.sampling = model, tok, fastgen, sampling
        self.max_new_tokens, self.system, self.progress, self.ignore_eos = max_new_tokens, system, progress, ignore_eos
        self.reset()

    def reset(self):
        self.conv = Conversation(self.tok, self.system)
        # Up to the whole context: the pool starts with room for 512 tokens and doubles as the conversation grows.
        self.caches, self.on_tokens = make_caches(self.model, self.tok, self.fastgen, self.model.cfg.max_seq_len,
                                                  first_len=512)

    @property
    def seen(self) -> int:
        """Tokens the caches have seen (an answer's last token is fed back with the next turn)."""
        return self.caches[0].length

    def turn(self, text: str, write: Callable[[str], None], interrupted: Callable[[], bool] = lambda: False) -> dict:
        """Prefill the user turn's new tokens, stream the answer through write(); returns the turn's record."""
        limit = self.model.cfg.max_seq_len
        self.conv.user_turn(text)
        if len(self.conv.ids) >= limit:
            n = len(self.conv.ids)
            self.conv.undo_user_turn()
            raise TinygenError(f"this turn would bring the conversation to {n} tokens, past the model's context of "
                               f"{limit}: /reset starts a new one")
        new = self.conv.ids[self.seen:]
        stats = GenerationStats()
        on_layer = self.progress.callback(len(new)) if self.progress else None
        answer, stream = [], StreamDecoder(self.tok)
        tokens = generate(self.model, new, self.caches, self.max_new_tokens, self.sampling, self.tok.eos_ids,
                          self.ignore_eos, stats, on_tokens=self.on_tokens, start_pos=self.seen, on_layer=on_layer,
                          decode=self.decode)
        for token_id in tokens:
            answer.append(token_id)
            write(stream.push(token_id))
            if interrupted():
                stats.stop_reason = "interrupted"
                break
        tokens.close()
        write(stream.flush())
        self.conv.assistant_turn(answer)
        return {"prompt_tokens": stats.prompt_tokens, "context_tokens": len(self.conv.ids),
                "generated_tokens": stats.generated_tokens,
                "prefill_seconds": round(stats.prefill_seconds, 6),
                "decode_tokens_per_second": round(stats.decode_tokens_per_second, 3),
                "stop_reason": stats.stop_reason, **self.cache_stats()}

    def cache_stats(self) -> dict:
        return cache_figures(self.caches, self.model.cfg, self.model.embed.weight.dtype)

    def describe(self) -> str:
        """What /stats shows."""
        s = self.cache_stats()
        lines = [f"[conversation {len(self.conv.ids)} tokens ({self.seen} in the cache) | kept "
                 f"{s['kept_fraction']:.1%} of tokens | KV cache {s['kv_bytes'] / 2**20:.2f} MiB in blocks, "
                 f"{s['kv_bytes_kept'] / 2**20:.2f} MiB kept vs full "
                 f"{s['kv_bytes_full'] / 2**20:.2f} MiB]"]
        if self.on_tokens is not None and self.seen and self.fastgen.policy == "auto":
            lines.append(policy_map(self.caches))
        return "\n".join(lines)


def read_turn(tty: bool) -> str | None:
    """The next line from stdin (None at the end); a line that is not UTF-8 raises TinygenError."""
    try:
        if tty:
            return input("> ")  # readline editing on a terminal
        line = sys.stdin.buffer.readline()
        return line.decode("utf-8").rstrip("\r\n") if line else None
    except EOFError:
        return None
    except UnicodeDecodeError as e:
        raise TinygenError(f"that line is not UTF-8 text (byte {e.start}); nothing was sent") from None


def run_chat(session: ChatSession, stats_json: str | None = None) -> int:
    """The read-answer loop. Exit status 0 at Ctrl-D or /exit."""
    tty = sys.stdin.isatty()
    records: list[dict] = []
    stop = {"asked": False}

    def on_sigint(signum, frame):  # stop the answer between two steps: the caches stay consistent
        stop["asked"] = True

    def write(text):
        check_interrupted()  # a SIGTERM whose exception was swallowed
        sys.stdout.write(text)
        sys.stdout.flush()

    if tty:
        print(f"tinygen chat ({', '.join(COMMANDS)}; Ctrl-C stops an answer, Ctrl-D ends)", file=sys.stderr)
    while True:
        try:
            line = read_turn(tty)
        except TinygenError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt as e:
            if exit_code(e) != 130:  # SIGTERM ends the session (run_main reports it)
                raise
            handled()
            print("\n(Ctrl-D or /exit ends the session)", file=sys.stderr)
            continue
        if line is None:
            if tty:
                print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        if line.startswith("/"):
            command = line.split()[0]
            if command == "/exit":
                return 0
            if command == "/reset":
                session.reset()
                print("[new conversation]", file=sys.stderr)
            elif command == "/stats":
                print(session.describe(), file=sys.stderr)
            else:
                print(f"unknown command {command}: " + "; ".join(f"{c} {d}" for c, d in COMMANDS.items()),
                      file=sys.stderr)
            continue
        stop["asked"] = False
        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            record = session.turn(line, write, lambda: stop["asked"])
        except TinygenError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        finally:
            signal.signal(signal.SIGINT, previous)
        write("\n")
        if record["stop_reason"] == "interrupted":
            print("[stopped]", file=sys.stderr)
        if record["stop_reason"] == "context":
            print(f"[stopped: the conversation reached the model's context of {session.model.cfg.max_seq_len} "
                  "tokens; /reset starts a new one]", file=sys.stderr)
        records.append(record)
        if stats_json:
            try:
                write_json_atomic(stats_json, records)
            except TinygenError as e:  # the conversation goes on; the next turn writes the whole list again
                print(f"error: {e}", file=sys.stderr)
