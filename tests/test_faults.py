"""Fault tests on real processes: SIGINT and SIGTERM at random moments (loading, prefill, decode, mid-batch, the
final write), SIGKILL then --resume, a full disk, an unwritable output. Never a traceback, the right exit status,
and every answer finished before the fault present exactly once."""
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, save_tiny_chat_model

RNG = random.Random(20261207)  # the moments are random, and the same in every run
N_PROMPTS = 16
# --prompts-file runs: a tiny random model, so that answers finish every few tens of milliseconds
BATCH_ARGS = ["--batch", "2", "--max-new-tokens", "16", "--ignore-eos"]


def start(args, out_dir, stdin=None, preexec=None):
    """cli.py in a child process whose stdout and stderr go to files (read while it runs)."""
    stdout, stderr = open(out_dir / "stdout", "w"), open(out_dir / "stderr", "w")

    def setup():
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # see conftest.interruptible
        if preexec:
            preexec()
    p = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, args)], cwd=ROOT, stdout=stdout,
                         stderr=stderr, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                         preexec_fn=setup)
    p.files = (out_dir / "stdout", out_dir / "stderr")
    if stdin is not None:
        p.stdin.write(stdin)
        p.stdin.flush()
    return p


def wait_until(p, check, what, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if check():
            return
        if p.poll() is not None:
            pytest.fail(f"the run ended ({p.returncode}) before {what}: {p.files[1].read_text()}")
        time.sleep(0.01)
    p.kill()
    pytest.fail(f"no {what} in {timeout} s")


def finish(p, timeout=120):
    p.wait(timeout=timeout)
    out, err = (f.read_text() for f in p.files)
    assert "Traceback" not in err, err
    return p.returncode, out, err


def answers(path):
    """The records of an answers file; every line whole, every index once."""
    text = path.read_text() if path.exists() else ""
    assert text == "" or text.endswith("\n"), "a line cut short"
    rows = [json.loads(line) for line in text.splitlines()]
    indices = [r["index"] for r in rows]
    assert len(indices) == len(set(indices)), "an answer written twice"
    return {r["index"]: r for r in rows}


@pytest.fixture(scope="module")
def batch_setup(tmp_path_factory, default_model_dir):
    """A tiny chat model with a 256-token context, a prompts file, and the answers of an uninterrupted run."""
    d = tmp_path_factory.mktemp("faults")
    model = save_tiny_chat_model(d / "model", default_model_dir, 256)
    src = d / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"question number {i} " + "word " * (i % 7)}) + "\n"
                           for i in range(N_PROMPTS)))
    ref = d / "reference.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--model", str(model), "--prompts-file", str(src),
                        "--out", str(ref), *BATCH_ARGS], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    reference = answers(ref)
    assert sorted(reference) == list(range(N_PROMPTS))
    return model, src, reference


def resume(model, src, out):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), "--model", str(model), "--prompts-file", str(src),
                           "--out", str(out), "--resume", *BATCH_ARGS], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def same_answers(got: dict, reference: dict):
    for i, row in got.items():
        assert {k: row[k] for k in ("text", "generated_tokens", "stop_reason")} == \
            {k: reference[i][k] for k in ("text", "generated_tokens", "stop_reason")}, i


def no_temporary_files(directory):
    assert not [f for f in os.listdir(directory) if ".tmp-" in f]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_prompts_file_signal_mid_batch(batch_setup, tmp_path, sig):
    model, src, reference = batch_setup
    out = tmp_path / "answers.jsonl"
    p = start(["--model", model, "--prompts-file", src, "--out", out, *BATCH_ARGS], tmp_path)
    k = RNG.randint(1, 4)
    wait_until(p, lambda: out.exists() and out.read_text().count("\n") >= k, "answers")
    time.sleep(RNG.uniform(0, 0.05))
    p.send_signal(sig)
    code, _, err = finish(p)
    got = answers(out)
    assert code == 128 + sig, err
    assert 1 <= len(got) < N_PROMPTS and "answers are in" in err
    same_answers(got, reference)
    # and --resume goes on from there: exactly one answer per prompt, each the uninterrupted run's
    r = resume(model, src, out)
    assert r.returncode == 0, r.stderr
    final = answers(out)
    assert list(final) == list(range(N_PROMPTS)), "input order at the end"
    same_answers(final, reference)
    assert f"({len(got)} already in" in r.stderr
    no_temporary_files(tmp_path)


def test_prompts_file_sigkill_then_resume(batch_setup, tmp_path):
    model, src, reference = batch_setup
    out = tmp_path / "answers.jsonl"
    p = start(["--model", model, "--prompts-file", src, "--out", out, *BATCH_ARGS], tmp_path)
    k = RNG.randint(2, 5)
    wait_until(p, lambda: out.exists() and out.read_text().count("\n") >= k, "answers")
    p.kill()
    p.wait()
    got = answers(out)
    assert 1 <= len(got) < N_PROMPTS
    with open(out, "a") as f:  # as if the kill had landed in the middle of a write
        f.write('{"index": 15, "text": "half a li')
    r = resume(model, src, out)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    final = answers(out)
    assert list(final) == list(range(N_PROMPTS))
    same_answers(final, reference)


def test_prompts_file_signal_during_the_final_write(batch_setup, tmp_path):
    """A signal as the last answers are written and the file is rewritten in input order: whatever the moment,
    every answer is there once and no temporary file is left."""
    model, src, reference = batch_setup
    out, stats = tmp_path / "answers.jsonl", tmp_path / "stats.json"
    p = start(["--model", model, "--prompts-file", src, "--out", out, "--stats-json", stats, *BATCH_ARGS], tmp_path)
    wait_until(p, lambda: out.exists() and out.read_text().count("\n") >= N_PROMPTS - 1, "the last answers")
    time.sleep(RNG.uniform(0, 0.02))
    p.send_signal(signal.SIGTERM)
    code, _, err = finish(p)
    got = answers(out)
    assert code in (0, 143), err
    assert len(got) >= N_PROMPTS - 1 and (code == 143 or len(got) == N_PROMPTS)
    same_answers(got, reference)
    no_temporary_files(tmp_path)


def test_prompts_file_full_disk_then_resume(batch_setup, tmp_path):
    """A file-size limit stands for a full disk: the run stops with one line, the answers written before are whole,
    and --resume completes the file."""
    model, src, reference = batch_setup
    out = tmp_path / "answers.jsonl"

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
    p = start(["--model", model, "--prompts-file", src, "--out", out, *BATCH_ARGS], tmp_path, preexec=small_disk)
    code, _, err = finish(p)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: cannot write"), err
    assert "--resume" in lines[0]
    got = answers(out)
    assert 1 <= len(got) < N_PROMPTS and out.stat().st_size <= 1000
    same_answers(got, reference)
    r = resume(model, src, out)
    assert r.returncode == 0, r.stderr
    final = answers(out)
    assert list(final) == list(range(N_PROMPTS))
    same_answers(final, reference)


def test_unwritable_stats_json_keeps_the_answers(batch_setup, tmp_path):
    """The totals file cannot be written at the end (its directory was removed while the run went): one line,
    exit 1, and every answer is in --out."""
    model, src, reference = batch_setup
    sub = tmp_path / "sub"
    sub.mkdir()
    out, stats = tmp_path / "answers2.jsonl", sub / "stats.json"
    p = start(["--model", model, "--prompts-file", src, "--out", out, "--stats-json", stats, *BATCH_ARGS],
              tmp_path)
    wait_until(p, lambda: out.exists() and out.read_text().count("\n") >= 1, "answers")
    sub.rmdir()
    code, _, err = finish(p)
    lines = err.strip().splitlines()
    assert code == 1 and lines[-1].startswith("error: cannot write") and str(stats) in lines[-1], err
    assert sum(line.startswith("error:") for line in lines) == 1
    got = answers(out)
    assert list(got) == list(range(N_PROMPTS))
    same_answers(got, reference)


def test_read_only_output(batch_setup, tmp_path):
    model, src, _ = batch_setup
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    target = ro if not os.access(ro, os.W_OK) else "/proc"  # root writes anywhere but in /proc
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--model", str(model), "--prompts-file", str(src),
                        "--out", f"{target}/answers.jsonl", *BATCH_ARGS], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode in (1, 2) and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "answers.jsonl" in lines[0]


@pytest.fixture(scope="module")
def long_prompt(tmp_path_factory):
    text = (ROOT.parent / "shared" / "eval" / "pride_and_prejudice.txt").read_text(encoding="utf-8")[20000:24800]
    path = tmp_path_factory.mktemp("long") / "long.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_one_shot_signal_while_loading(default_model_dir, tmp_path, sig):
    p = start(["--prompt", "hi", "--max-new-tokens", 4], tmp_path)
    time.sleep(RNG.uniform(0.2, 1.0))  # importing torch, reading the weights
    p.send_signal(sig)
    code, out, err = finish(p)
    assert code == 128 + sig and err.strip().splitlines()[-1] == "interrupted", err


@pytest.mark.parametrize("policy,sig", [("auto", signal.SIGINT), ("full", signal.SIGTERM),
                                        ("local+frequent", signal.SIGINT), ("auto", signal.SIGTERM)])
def test_one_shot_signal_during_prefill(default_model_dir, long_prompt, tmp_path, policy, sig):
    """Ctrl-C (or SIGTERM) after the first progress line of a long prefill: the half-built caches are not read;
    the stats line and file say what is known."""
    stats = tmp_path / "stats.json"
    p = start(["--prompt-file", long_prompt, "--progress", "--policy", policy, "--max-new-tokens", 8,
               "--stats-json", stats], tmp_path)
    wait_until(p, lambda: "[prefill " in p.files[1].read_text(), "a progress line")
    time.sleep(RNG.uniform(0, 0.2))
    p.send_signal(sig)
    code, _, err = finish(p)
    assert code == 128 + sig, err
    assert "stop: interrupted]" in err and err.count("[prompt ") == 1
    record = json.loads(stats.read_text())
    assert record["stop_reason"] == "interrupted" and record["generated_tokens"] == 0
    assert record["prompt_tokens"] > 1024 and "kv_bytes" not in record  # caches left unread


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_one_shot_signal_mid_decode(default_model_dir, tmp_path, sig):
    model = save_tiny_chat_model(tmp_path / "m", default_model_dir, 4096)
    p = start(["--model", model, "--prompt", "go on", "--max-new-tokens", 4000, "--ignore-eos", "--policy",
               "local+frequent"], tmp_path)
    k = RNG.randint(5, 60)
    wait_until(p, lambda: len(p.files[0].read_text()) > k, "streamed text")
    p.send_signal(sig)
    code, out, err = finish(p)
    assert code == 128 + sig and "stop: interrupted]" in err, err
    generated = int(err.split("generated ")[1].split(" tok")[0])
    assert 0 < generated < 4000


def test_chat_signals(default_model_dir, tmp_path):
    """Chat: Ctrl-C stops the answer and the session goes on (exit 0 at the end of input); SIGTERM ends it with
    143, and the stats file holds every turn finished before."""
    model = save_tiny_chat_model(tmp_path / "m", default_model_dir, 4096)
    stats = tmp_path / "turns.json"
    args = ["--chat", "--model", model, "--max-new-tokens", 3000, "--ignore-eos", "--policy", "full",
            "--stats-json", stats]
    p = start(args, tmp_path, stdin=b"first turn\n")
    wait_until(p, lambda: len(p.files[0].read_text()) > 20, "the first answer")
    p.send_signal(signal.SIGINT)
    wait_until(p, lambda: "[stopped]" in p.files[1].read_text() and stats.exists(), "the stop notice and record")
    assert len(json.loads(stats.read_text())) == 1
    shown, k = len(p.files[0].read_text()), RNG.randint(5, 40)
    p.stdin.write(b"second turn\n")
    p.stdin.flush()
    wait_until(p, lambda: len(p.files[0].read_text()) > shown + k, "the second answer")
    p.send_signal(signal.SIGTERM)
    code, _, err = finish(p)
    assert code == 143 and err.strip().splitlines()[-1] == "interrupted", err
    records = json.loads(stats.read_text())
    assert len(records) == 1 and records[0]["stop_reason"] == "interrupted"
