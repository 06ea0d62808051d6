"""`cli.py --chat`: the persisted cache changes nothing for the full cache; later turns prefill only their own
tokens; FastGen keeps its budget across turns; piped and real-terminal (tmux) sessions, commands and bad input."""
import json
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from conftest import ROOT, save_tiny_chat_model

from tinygen.chat import ChatSession
from tinygen.errors import TinygenError
from tinygen.fastgen.policy import FastGenConfig
from tinygen.generate import full_caches, generate
from tinygen.loader import load_model
from tinygen.sampling import SamplingParams
from tinygen.tokenizer import Tokenizer

TURNS = ["Name three colours of the rainbow.", "Which of them is the warmest?", "Say it in French."]


@pytest.fixture(scope="module")
def engine(default_model_dir):
    model = load_model(default_model_dir)
    return model, Tokenizer(default_model_dir, model.cfg.eos_token_ids)


def chat(engine, policy: str, turns, max_new_tokens=24, **cfg):
    model, tok = engine
    session = ChatSession(model, tok, FastGenConfig(policy, **cfg), SamplingParams(), max_new_tokens)
    answers, records = [], []
    for text in turns:
        out = []
        records.append(session.turn(text, out.append))
        answers.append("".join(out))
    return session, answers, records


def test_full_cache_chat_equals_prefilling_the_conversation_from_scratch(engine):
    """Greedy, float32: turn n's answer equals a fresh full cache's answer to the whole conversation rendered and
    prefilled at once, and the conversation's ids are what the template renders, tokenized from scratch."""
    model, tok = engine
    session, answers, records = chat(engine, "full", TURNS)
    messages = []
    for i, text in enumerate(TURNS):
        messages.append({"role": "user", "content": text})
        ids = tok.encode(tok.render_chat(messages))
        fresh = list(generate(model, ids, full_caches(model, model.cfg.max_seq_len), 24, eos_ids=tok.eos_ids))
        assert answers[i] == tok.decode(fresh), (i, answers[i], tok.decode(fresh))
        messages.append({"role": "assistant", "content": answers[i]})
    assert session.conv.ids == tok.encode(tok.render_chat(messages, add_generation_prompt=False))[:len(session.conv.ids)]
    # an answer cut at the token limit: its last token reaches the cache with the next turn, before the rendering
    # of the new message (which starts with the answer's end-of-message)
    assert records[0]["stop_reason"] == "length"
    turn2 = tok.encode(tok.render_chat(messages[:3]))[records[0]["context_tokens"]:]
    assert records[1]["prompt_tokens"] == 1 + len(turn2)


def test_a_turn_after_an_interrupted_answer(engine):
    """Ctrl-C stops an answer between two steps: the next turn still equals prefilling the whole conversation (the
    stopped answer's last token, never fed back, comes first in its chunk)."""
    model, tok = engine
    session = ChatSession(model, tok, FastGenConfig("full"), SamplingParams(), 24)
    first = []
    record = session.turn(TURNS[0], first.append, interrupted=lambda: len("".join(first)) >= 10)
    assert record["stop_reason"] == "interrupted" and record["generated_tokens"] < 24
    assert session.seen == record["context_tokens"] - 1
    second = []
    session.turn(TURNS[1], second.append)
    messages = [{"role": "user", "content": TURNS[0]}, {"role": "assistant", "content": "".join(first)},
                {"role": "user", "content": TURNS[1]}]
    fresh = generate(model, tok.encode(tok.render_chat(messages)), full_caches(model, 512), 24, eos_ids=tok.eos_ids)
    assert "".join(second) == tok.decode(list(fresh))


def test_later_turns_prefill_only_their_own_tokens(engine):
    """Turn 2's prefill is its own rendering (the history is never prefilled again) and FastGen keeps its budget
    across turns: the kept fraction stays within 0.02 of --kv-budget and the bytes are those of what is kept."""
    model, tok = engine
    session, _, records = chat(engine, "auto", TURNS[:2], max_new_tokens=80, kv_budget=0.6)
    first, second = records
    assert first["stop_reason"] == second["stop_reason"] == "eos", records
    assert first["prompt_tokens"] == len(tok.encode(tok.render_chat(session.conv.messages[:1])))
    # new in turn 2: the answer's end (<|im_end|>, the EOS that stopped it, never fed back) and the second message
    whole = tok.encode(tok.render_chat(session.conv.messages[:3]))  # user 1, assistant 1, user 2, from scratch
    assert second["prompt_tokens"] == len(whole) - first["context_tokens"] < 25
    assert second["context_tokens"] == len(whole) + second["generated_tokens"] == session.seen
    for r in records:
        assert r["kept_fraction"] == pytest.approx(0.6, abs=0.02)
        assert r["kv_bytes"] < 0.75 * r["kv_bytes_full"]


def cli_chat(model_dir, stdin: bytes, *args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), "--chat", "--model", str(model_dir), *map(str, args)],
                          input=stdin, capture_output=True, timeout=timeout, cwd=ROOT)


def test_piped_chat_commands_and_bad_input(chat_model, tmp_path):
    """One user turn per line; empty lines ignored; an unknown command lists the commands; a non-UTF-8 line and a
    turn past the context get one line each and the session goes on; /reset starts again; /exit ends with 0."""
    stats = tmp_path / "turns.json"
    long_turn = b"word " * 200  # far past the tiny model's 64-token context
    script = (b"hi\n\n/frobnicate\n\xff\xfe bad bytes\n" + long_turn + b"\n/stats\n/reset\nhello again\n/exit\n"
              b"never read\n")
    r = cli_chat(chat_model, script, "--max-new-tokens", 3, "--ignore-eos", "--policy", "full",
                 "--stats-json", stats)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "Traceback" not in err
    assert "unknown command /frobnicate: /reset" in err and "/stats" in err and "/exit" in err
    assert "not UTF-8" in err
    assert "past the model's context of 64" in err
    assert "[new conversation]" in err
    records = json.loads(stats.read_text())
    assert len(records) == 2  # "hi" and "hello again"; nothing after /exit
    assert [r["generated_tokens"] for r in records] == [3, 3]
    assert records[1]["context_tokens"] == records[1]["prompt_tokens"] + 3  # /reset: the history is gone
    assert set(records[0]) >= {"prompt_tokens", "context_tokens", "generated_tokens", "decode_tokens_per_second",
                               "kept_fraction", "kv_bytes", "kv_bytes_kept", "kv_bytes_full"}
    assert r.stdout.decode().endswith("\n") and "error" not in r.stdout.decode()  # answers only on stdout


def test_chat_reaching_the_context_stays_usable_after_reset(chat_model):
    r = cli_chat(chat_model, b"hi\nmore\n/reset\nhi\n", "--max-new-tokens", 100, "--ignore-eos", "--policy", "full")
    err = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err
    assert err.count("reached the model's context of 64") == 2  # the first "hi" and the one after /reset
    assert err.count("past the model's context") == 1  # "more" does not fit any longer


def test_chat_flag_conflicts():
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--chat", "--no-chat"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --chat needs the chat template"), r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--chat", "--prompt", "x"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_chat_in_a_real_terminal(default_model_dir, tmp_path):
    """As a person uses it, in a tmux pane: the prompt, a streamed answer, Ctrl-C stopping an endless answer while
    the session goes on, /stats, and Ctrl-D ending the session with status 0."""
    name = f"tinygen-{uuid.uuid4().hex[:8]}"
    status = tmp_path / "status"
    command = (f"{sys.executable} {ROOT / 'cli.py'} --chat --policy auto --ignore-eos --max-new-tokens 100000; "
               f"echo $? > {status}; sleep 60")
    tmux = lambda *a: subprocess.run(["tmux", *a], capture_output=True, text=True, check=True)
    pane = lambda: tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", name).stdout

    def wait_for(check, what, timeout=90):
        t0 = time.time()
        while time.time() - t0 < timeout:
            text = pane()
            if check(text):
                return text
            time.sleep(0.3)
        pytest.fail(f"no {what} in the pane:\n{pane()}")

    tmux("new-session", "-d", "-s", name, "-x", "160", "-y", "50", command)
    try:
        wait_for(lambda t: "> " in t and "tinygen chat" in t, "chat prompt")
        tmux("send-keys", "-t", name, "Count from one to a thousand.", "Enter")
        wait_for(lambda t: len(t.split("Count from one to a thousand.")[-1].strip()) > 40, "streamed answer")
        # The answer cannot end by itself (--ignore-eos, 100000 tokens), and "[stopped]" is printed only when Ctrl-C
        # interrupts an answer in progress. (The pane itself can stand still while the model writes special tokens,
        # which are not shown: a check on it was flaky under load.)
        tmux("send-keys", "-t", name, "C-c")
        wait_for(lambda t: "[stopped]" in t, "stop notice")
        tmux("send-keys", "-t", name, "/stats", "Enter")
        text = wait_for(lambda t: "policy map" in t, "/stats output")
        assert "kept" in text and "MiB" in text
        tmux("send-keys", "-t", name, "C-d")
        wait_for(lambda t: status.exists() and status.read_text().strip() != "", "exit status", timeout=30)
        assert status.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


def test_long_prefill_progress_line(default_model_dir, tmp_path):
    """A prompt of 1k tokens or more shows a progress line on stderr with --progress (stderr is not a terminal
    here, so without the flag nothing is shown). A tiny random model with a 2k context and the default tokenizer."""
    model_dir = save_tiny_chat_model(tmp_path / "tiny2k", default_model_dir, 2048)
    text = (ROOT.parent / "shared" / "eval" / "pride_and_prejudice.txt").read_text(encoding="utf-8")[20000:27000]
    prompt = tmp_path / "long.txt"
    prompt.write_text(text, encoding="utf-8")
    args = [sys.executable, str(ROOT / "cli.py"), "--prompt-file", str(prompt), "--max-new-tokens", "1",
            "--model", str(model_dir)]
    quiet = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
    shown = subprocess.run(args + ["--progress"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert quiet.returncode == shown.returncode == 0, shown.stderr
    assert "[prefill" not in quiet.stderr
    n = int(shown.stderr.split("[prompt ")[1].split(" tok")[0])
    assert n >= 1024
    assert f"[prefill {n}/{n} tokens, " in shown.stderr and "tok/s]" in shown.stderr, shown.stderr


def test_a_turn_past_the_context_is_taken_back(chat_model):
    """A turn that does not fit is undone: the next turn, with no /reset, continues the conversation as if the long
    turn had never been sent (same ids, same greedy answer as a session that never saw it)."""
    model = load_model(chat_model)
    tok = Tokenizer(chat_model, model.cfg.eos_token_ids)
    sessions = [ChatSession(model, tok, FastGenConfig("full"), SamplingParams(), 3, ignore_eos=True)
                for _ in range(2)]
    answers = [[], []]
    for i, session in enumerate(sessions):
        session.turn("hi", answers[i].append)
    before = list(sessions[0].conv.ids)
    with pytest.raises(TinygenError, match="past the model's context of 64"):
        sessions[0].turn("word " * 200, answers[0].append)
    assert sessions[0].conv.ids == before and len(sessions[0].conv.messages) == 2
    records = [session.turn("ok", answers[i].append) for i, session in enumerate(sessions)]
    assert sessions[0].conv.ids == sessions[1].conv.ids
    assert records[0] == {**records[1], "prefill_seconds": records[0]["prefill_seconds"],
                          "decode_tokens_per_second": records[0]["decode_tokens_per_second"]}
    assert "".join(answers[0]) == "".join(answers[1])


def test_chat_goes_on_when_the_stats_file_cannot_be_written(chat_model, tmp_path):
    """--stats-json in a directory removed after start-up: each turn prints one error line and the session goes on
    to answer every turn."""
    gone = tmp_path / "gone"
    gone.mkdir()
    stats = gone / "turns.json"
    p = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "--chat", "--model", str(chat_model), "--policy",
                          "full", "--max-new-tokens", "3", "--ignore-eos", "--stats-json", str(stats)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    p.stdin.write(b"hi\n")
    p.stdin.flush()
    while not (line := p.stdout.readline()).strip():  # the first answer is out
        assert line, f"the chat ended: {p.stderr.read().decode()[-2000:]}"
    while not stats.exists():  # and its record is written (just after the answer's newline)
        time.sleep(0.01)
    stats.unlink()
    gone.rmdir()
    out, err = p.communicate(b"one more\nand another\n", timeout=120)
    err = err.decode()
    assert p.returncode == 0 and "Traceback" not in err, err
    assert len(out.decode().strip().splitlines()) == 2  # the second and third answers
    assert err.count("error: cannot write") == 2, err
