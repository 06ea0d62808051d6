"""What the two command lines (cli.py and python -m tinygen.eval) share: one-line errors, one interruption path
(Ctrl-C and SIGTERM), and reading and writing files so that a reader never sees half of one."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import TinygenError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (exit code 2) instead of usage plus message."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def read_text(path: str) -> str:
    """A UTF-8 text file, or a one-line TinygenError."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise TinygenError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise TinygenError(f"{path} is not UTF-8 text (byte {e.start})") from None


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM, raised where the program is; it exits with 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.code = 128 + signum


def exit_code(e: KeyboardInterrupt) -> int:
    """130 for Ctrl-C (a plain KeyboardInterrupt too), 143 for SIGTERM."""
    return getattr(e, "code", 128 + signal.SIGINT)


_held = {"depth": 0, "pending": None, "received": None}  # signal handlers are process-wide, and so is this


def _on_signal(signum, frame):
    _held["received"] = _held["received"] or signum
    if _held["depth"]:
        _held["pending"] = _held["pending"] or signum
        return
    raise Interrupted(signum)


def check_interrupted():
    """Raise again a signal whose exception was swallowed: a handler's exception that lands inside hasattr() or a C
    extension's import is cleared there, so the loops also look for it between steps (cheap: a dict lookup)."""
    if _held["received"]:
        raise Interrupted(_held["received"])


def handled():
    """The interruption was dealt with (the chat prompt takes Ctrl-C and goes on): stop raising it again."""
    _held["received"] = None


@contextmanager
def interruptible():
    """Inside the block SIGINT and SIGTERM both raise Interrupted (a KeyboardInterrupt), so one `except
    KeyboardInterrupt` handles either, wherever it lands: loading, prefill, decode, between batch steps."""
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.unraisablehook
    # A signal that lands in a finalizer (a weakref callback, __del__) cannot raise there: Python would print it as
    # "Exception ignored ... Traceback". It stays recorded instead, and check_interrupted() raises it at the next step.
    sys.unraisablehook = lambda u: None if isinstance(u.exc_value, Interrupted) else hook(u)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.unraisablehook = hook
        _held.update(pending=None, received=None)


@contextmanager
def held():
    """A signal that arrives inside the block waits until the block ends, then raises: a record or a file is
    written whole or not at all."""
    _held["depth"] += 1
    try:
        yield
    finally:
        _held["depth"] -= 1
        if not _held["depth"] and _held["pending"]:
            signum, _held["pending"] = _held["pending"], None
            raise Interrupted(signum)


def check_writable(path: str, flag: str):
    """Before any work: `path` can be created or replaced as a regular file (a TinygenError naming the flag)."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise TinygenError(f"{flag} {path} is a directory")
    if os.path.lexists(path) and not os.path.isfile(path):  # never rename over a device or a socket
        raise TinygenError(f"{flag} {path} is not a regular file")
    if not os.path.isdir(parent):
        raise TinygenError(f"{flag} {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise TinygenError(f"{flag} {path}: not writable")


def check_readable(path: str, flag: str):
    """Before any work: `path` is a file this process can read (a TinygenError naming the flag)."""
    if not os.path.isfile(path):
        raise TinygenError(f"{flag} {path}: no such file")
    if not os.access(path, os.R_OK):
        raise TinygenError(f"{flag} {path}: not readable")


def write_text_atomic(path: str | Path, text: str):
    """Write to a temporary name beside `path`, then rename: a reader never sees half a file, a signal waits until
    the rename is done, and a failure leaves no temporary file behind."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with held():
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise TinygenError(f"cannot write {path}: {e.strerror or e}") from None
            raise


def write_json_atomic(path: str | Path, data):
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def run_main(run, args) -> int:
    """Call run(args) with SIGINT and SIGTERM raising Interrupted. A TinygenError or OSError becomes one line on
    stderr and exit 1; an interruption that run() did not handle itself, `interrupted` and exit 130 (143 for
    SIGTERM); anything else (a bug, running out of memory) one `error:` line too, with the traceback only under
    TINYGEN_DEBUG=1."""
    try:
        with interruptible():  # outside the try: a signal while the handlers are put back is caught below too
            return run(args)
    except TinygenError as e:
        message = f"error: {e}"
    except KeyboardInterrupt as e:
        print("\ninterrupted", file=sys.stderr)
        return exit_code(e)
    except OSError as e:
        message = f"error: {str(e.filename) + ': ' if e.filename else ''}{e.strerror or e}"
    except Exception as e:  # never a traceback for the user
        if _held["received"]:  # a signal's exception swallowed inside a library, which then failed otherwise
            print("\ninterrupted", file=sys.stderr)
            return 128 + _held["received"]
        if os.environ.get("TINYGEN_DEBUG"):
            raise
        what = "out of memory" if isinstance(e, MemoryError) or "out of memory" in str(e) else "internal error"
        first = (str(e).strip().splitlines() or [""])[0][:300]
        message = f"error: {what} ({type(e).__name__}: {first}); TINYGEN_DEBUG=1 shows the traceback"
    print(message, file=sys.stderr)
    return 1


class PrefillProgress:
    """A progress line on stderr while a long prefill runs: tokens done of the total and tokens per second.

    A prefill runs layer by layer over all of its tokens, so progress is counted in tokens' worth of work: after
    layer i of n, (i + 1) / n of the tokens. Shown for prefills of at least `min_tokens` tokens when stderr is a
    terminal, or whenever `force` (--progress) asks for it."""

    def __init__(self, n_layers: int, force: bool = False, min_tokens: int = 1024, every: float = 0.2):
        self.n_layers, self.min_tokens, self.every = n_layers, min_tokens, every
        self.show = force or sys.stderr.isatty()
        self.open = False  # a progress line is on the screen without its newline

    def end_line(self):
        """End a progress line cut short (by an interruption), so that what follows starts on its own line."""
        if self.open:
            print(file=sys.stderr)
            self.open = False

    def callback(self, n_tokens: int):
        """The `on_layer` callback for a prefill of n_tokens, or None when no line is to be shown."""
        if not self.show or n_tokens < self.min_tokens:
            return None
        import time

        t0 = last = time.perf_counter()

        def on_layer(i: int):
            nonlocal last
            now = time.perf_counter()
            if now - last < self.every and i + 1 < self.n_layers:
                return
            last = now
            done = n_tokens * (i + 1) // self.n_layers
            rate = done / max(now - t0, 1e-9)
            end = "\n" if i + 1 == self.n_layers else ""
            print(f"\r[prefill {done}/{n_tokens} tokens, {rate:.0f} tok/s]", end=end, file=sys.stderr, flush=True)
            self.open = not end
        return on_layer
