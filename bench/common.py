"""Helpers shared by the benchmarks: the machine, a timer, a memory-bandwidth measure, a real-text prompt, results."""
from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
EVAL_DIR = ROOT.parent / "shared" / "eval"
PRIDE = EVAL_DIR / "pride_and_prejudice.txt"
PRIDE_START = "It is a truth universally acknowledged"  # first line of chapter 1, past the front matter
GB = 1e9


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_lines() -> list[str]:
    """One line each: CPU, cores, torch threads and versions, load average now (the machine may be shared)."""
    try:
        import transformers
        hf = transformers.__version__
    except ImportError:
        hf = "not installed"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return [f"CPU: {cpu_model()}, {os.cpu_count()} logical cores ({len(os.sched_getaffinity(0))} usable); GPU: {gpu}",
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {hf}, "
            f"Python {platform.python_version()}",
            f"code: {code_version()}; load average at start: {load_average()}"]


def code_version(package: str = "tinygen") -> str:
    """The git commit the benchmark ran on, and whether `package`/ had uncommitted changes then."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD") or "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", package)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}" + (f" ({package}/ with uncommitted changes)" if dirty else "")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(fn, *args, **kwargs):
    """(seconds, result) of one call; on CUDA the device is synchronised on both sides."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync()
    return time.perf_counter() - t0, out


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn)[0] for _ in range(repeats))


def read_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Memory read bandwidth in GB/s: median time of `big.sum()` over a float32 tensor of `nbytes`, far larger
    than any cache, at torch's current thread count. The tensor is freed before returning."""
    big = torch.ones(nbytes // 4, dtype=torch.float32)
    try:
        return nbytes / median_seconds(big.sum, repeats, warmup=2) / GB
    finally:
        del big


def max_rss_bytes() -> int:
    """The process's peak resident set so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prompt_ids(tokenizer, n_tokens: int, path: Path = PRIDE, start: str = PRIDE_START) -> list[int]:
    """Exactly `n_tokens` ids of real prose: `path` from the first `start` on, tokenized without any template,
    cut at n_tokens. Both engines get these ids, so a cut in the middle of a word does not matter."""
    text = path.read_text(encoding="utf-8")
    at = text.find(start)
    assert at >= 0, f"{start!r} not found in {path}"
    chars = 8 * n_tokens
    while True:  # grow the slice until it holds enough tokens
        ids = tokenizer.encode(text[at : at + chars])
        if len(ids) > n_tokens or at + chars >= len(text):
            break
        chars *= 2
    assert len(ids) >= n_tokens, f"{path} has only {len(ids)} tokens after {start!r}"
    return ids[:n_tokens]


def write_report(path: Path, lines: list[str], doc: str) -> None:
    """Write a results table and, beneath it, the method section of the benchmark's docstring; say where."""
    method = doc.split("Method (also written beside the results):")[1].strip()
    write_atomic(path, "\n".join(lines + ["", method]) + "\n")
    print(f"wrote {path}")


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name beside `path`, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def add_mt_bench_args(parser, prompts: int) -> None:
    """The flags of a batch benchmark on MT-Bench first turns: --model, --questions, --prompts, --threads."""
    parser.add_argument("--model", default=str(ROOT / "weights" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--questions", default=str(EVAL_DIR / "mt_bench.jsonl"))
    parser.add_argument("--prompts", type=int, default=prompts)
    parser.add_argument("--threads", type=int, default=2)


def load_mt_bench(a, batch: int):
    """Those flags -> (model loaded for `batch` rows, tokenizer, the first --prompts first turns as chat ids), with
    --threads set."""
    from tinygen.eval.prompts import load_prompts
    from tinygen.loader import load_model
    from tinygen.tokenizer import Tokenizer

    torch.set_num_threads(a.threads)
    model = load_model(a.model, batch=batch)
    tok = Tokenizer(a.model, model.cfg.eos_token_ids)
    return model, tok, [tok.encode_prompt(r["prompt"]) for r in load_prompts(a.questions, a.prompts)]
