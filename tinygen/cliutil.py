"""What the two command lines (cli.py and python -m tinygen.eval) share: one-line errors, reading and writing files."""
from __future__ import annotations

import argparse
import json
import os
import sys
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


def write_text_atomic(path: str | Path, text: str):
    """Write to a temporary name beside `path`, then rename: a reader never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise TinygenError(f"cannot write {path}: {e.strerror or e}") from None


def write_json_atomic(path: str | Path, data):
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def run_main(run, args) -> int:
    """Call run(args); TinygenError and OSError become one line on stderr and exit 1, Ctrl-C exit 130."""
    try:
        return run(args)
    except TinygenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


class PrefillProgress:
    """A progress line on stderr while a long prefill runs: tokens done of the total and tokens per second.

    A prefill runs layer by layer over all of its tokens, so progress is counted in tokens' worth of work: after
    layer i of n, (i + 1) / n of the tokens. Shown for prefills of at least `min_tokens` tokens when stderr is a
    terminal, or whenever `force` (--progress) asks for it."""

    def __init__(self, n_layers: int, force: bool = False, min_tokens: int = 1024, every: float = 0.2):
        self.n_layers, self.min_tokens, self.every = n_layers, min_tokens, every
        self.show = force or sys.stderr.isatty()

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
        return on_layer
