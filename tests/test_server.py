"""cli.py --serve as a real process on a free port, reached by real clients (the official openai package, raw
HTTP): answers equal cli.py's greedy answers; a request's own policy and concurrent streams of mixed policies equal
their batch-1 answers under their own policies, under a KV cap; a client gone frees its sequence, bad requests get
OpenAI-style errors and the server goes on, signals exit 0.

One server (a tiny random model with the default tokenizer, 256 positions, auto at 0.7) serves the whole module;
a second one starts beside it for the SIGINT test. The references (two cli.py runs, and the batch-1 runs in this
process, as cli.py --prompts-file --batch 1 builds them) run while the servers load."""
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT, save_tiny_chat_model

openai = pytest.importorskip("openai", reason="the openai package is a test requirement (requirements.txt)")

CAP_MB = 0.18  # admits two or three of the 16 answers at once: the cap binds, not --batch
SPARE_CAP_MB = 0.1  # the second server: short prompts fit, a 256-token sequence never does
NEW = 16  # the server's --max-new-tokens, and each reference's
CHAT_PROMPT, RAW_PROMPT = "What is the capital of France?", "Once upon a time"
MIXED = [("word " * n).strip() if i % 2 else f"Question {i}: " + "tell me more " * n
         for i, n in enumerate([1, 3, 5, 8, 12, 17, 23, 30, 2, 6, 40, 9, 15, 27, 4, 33])]
# A request's own policy (its body's extra fields; {}: the server's auto at 0.7), the FastGenConfig that cli.py
# builds from the same flags, and the policy its usage reports. MIXED[i] asks with POLICIES[i % 4].
POLICIES = [({}, {}, "auto"), ({"policy": "full"}, {"policy": "full"}, "full"),
            ({"policy": "auto", "kv_budget": 0.5}, {"kv_budget": 0.5}, "auto"),
            ({"policy": "local+frequent"}, {"policy": "local+frequent"}, "local+frequent")]


def batch_1_answers(model_dir) -> list[dict]:
    """Each of MIXED's answer alone under its own policy, as cli.py --prompts-file --batch 1 gives it (the same
    loader, runner and record): text, kept_fraction, kv_bytes."""
    from tinygen.batch import BatchRunner
    from tinygen.fastgen.policy import FastGenConfig
    from tinygen.loader import load_model
    from tinygen.sampling import SamplingParams
    from tinygen.tokenizer import Tokenizer

    model = load_model(model_dir, batch=1)
    tok = Tokenizer(model_dir, model.cfg.eos_token_ids)
    out = {}
    for k, (_, config, _) in enumerate(POLICIES):
        prompts = [(i, tok.encode_prompt(MIXED[i])) for i in range(k, len(MIXED), len(POLICIES))]
        BatchRunner(model, tok, FastGenConfig(**config), SamplingParams(), NEW, 1).run(prompts, lambda s: out.update({
            s.index: {"text": tok.decode(s.out), "kept_fraction": round(s.kept_fraction, 6), "kv_bytes": s.kv_bytes}}))
    return [out[i] for i in range(len(MIXED))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, port, *args):
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "--serve", "--model", str(model), "--port",
                             str(port), "--max-new-tokens", str(NEW), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_ready(p, url, timeout=90):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if p.poll() is not None:
            pytest.fail(f"the server exited ({p.returncode}): {p.stderr.read()}")
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    p.kill()
    pytest.fail("the server did not answer /health")


def cli(*args):
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, args), "--max-new-tokens", str(NEW)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_dir):
    tmp = tmp_path_factory.mktemp("server")
    model = save_tiny_chat_model(tmp / "model", default_model_dir, 256)
    port, port2 = free_port(), free_port()
    main = start_server(model, port, "--kv-budget-mb", CAP_MB, "--batch", 8, "--max-waiting", 24)
    spare = start_server(model, port2, "--kv-budget-mb", SPARE_CAP_MB)
    refs = {"chat": cli("--model", model, "--prompt", CHAT_PROMPT),
            "raw": cli("--model", model, "--prompt", RAW_PROMPT, "--no-chat")}
    mixed = batch_1_answers(model)  # in this process while the others load: no more processes on 2 cores
    for name, p in refs.items():
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        refs[name] = out[:-1]  # the answer, then one newline
    refs["mixed"] = mixed
    url, url2 = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port2}"
    wait_ready(main, url)
    wait_ready(spare, url2)
    yield {"url": url, "proc": main, "spare": (spare, url2), "refs": refs, "model": model.name}
    for p in (main, spare):
        if p.poll() is None:
            p.kill()
            p.wait()


def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0)


def metrics(url) -> dict:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^tinygen_(\S+) (\S+)$", text, re.M)}


def post(url, path, body, headers=None):
    """(status, headers, JSON body) of a raw POST; body is bytes or a JSON-able object."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def stream_chat(c, model, text, **kw):
    chunks = list(c.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], stream=True,
                                            temperature=0, **kw))
    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices), chunks[-1]


def test_openai_client_chat_and_completions_equal_cli(server):
    """The official client, streaming and not: each text is the same prompt's greedy cli.py answer; usage carries
    the OpenAI counts and tinygen's cache figures."""
    c, model, refs = client(server), server["model"], server["refs"]
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": CHAT_PROMPT}], temperature=0)
    assert r.choices[0].message.content == refs["chat"] and r.choices[0].finish_reason == "length"
    u = r.usage.model_dump()
    assert u["completion_tokens"] == NEW and u["total_tokens"] == u["prompt_tokens"] + NEW
    assert u["policy"] == "auto" and u["kv_budget"] == 0.7 and 0 < u["kept_fraction"] < 1 and 0 < u["kv_bytes"]
    assert u["kv_bytes_full"] > 0
    text, last = stream_chat(c, model, CHAT_PROMPT)
    assert text == refs["chat"] and last.choices[0].finish_reason == "length"
    assert last.usage.completion_tokens == NEW
    r = c.completions.create(model=model, prompt=RAW_PROMPT, temperature=0)
    assert r.choices[0].text == refs["raw"]
    text = "".join(ch.choices[0].text for ch in c.completions.create(model=model, prompt=RAW_PROMPT, temperature=0,
                                                                     stream=True))
    assert text == refs["raw"]
    assert [m.id for m in c.models.list().data] == [model]


def test_stop_string_ends_the_answer_before_it(server):
    """A stop string found in the text ends the answer just before it, streaming or not, and the sequence leaves."""
    c, model, want = client(server), server["model"], server["refs"]["chat"]
    stop = want[len(want) // 2: len(want) // 2 + 3]
    cut = want.index(stop)
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": CHAT_PROMPT}], temperature=0,
                                  stop=[stop, "\x00never"])
    assert r.choices[0].message.content == want[:cut] and r.choices[0].finish_reason == "stop"
    text, last = stream_chat(c, model, CHAT_PROMPT, stop=stop)
    assert text == want[:cut] and last.choices[0].finish_reason == "stop"
    end = want[-2:]  # found in the step where the answer reaches max_tokens too: the stop string wins
    text, last = stream_chat(c, model, CHAT_PROMPT, stop=end)
    assert text == want[:want.index(end)] and last.choices[0].finish_reason == "stop"


def test_stop_string_scanning():
    """What may be sent: nothing that could be the start of a stop string; the earliest match wins."""
    from tinygen.engine_loop import first_stop, unsafe_tail

    assert first_stop("abc END x", ("END", "c E")) == 2 and first_stop("abc", ("x",)) == -1
    assert unsafe_tail("hello EN", ("END",)) == 2 and unsafe_tail("hello E", ("END", "E!")) == 1
    assert unsafe_tail("hello", ("END",)) == 0 and unsafe_tail("x", ()) == 0 and unsafe_tail("", ("ab",)) == 0


def test_a_request_chooses_its_own_policy(server):
    """A request's `policy` / `kv_budget` (extra body fields) other than the server's auto at 0.7, alone: each answer
    equals the same prompt's greedy batch-1 answer under that configuration (batch_1_answers, as cli.py
    --prompts-file --batch 1), its kept fraction and KV bytes equal that run's, and its usage names it; streaming or
    not."""
    c, model, refs = client(server), server["model"], server["refs"]["mixed"]
    for k, (extra, _, name) in enumerate(POLICIES):  # MIXED[k] asks with POLICIES[k]; k = 0: the server's own
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": MIXED[k]}], temperature=0,
                                      extra_body=extra)
        u = r.usage.model_dump()
        assert (r.choices[0].message.content, u["kept_fraction"]) == (refs[k]["text"], refs[k]["kept_fraction"]), k
        assert u["policy"] == name and u["kv_budget"] == (extra.get("kv_budget", 0.7) if name == "auto" else None)
        assert u["kv_bytes"] == refs[k]["kv_bytes"]
    assert refs[1]["kept_fraction"] == 1.0 and 0 < refs[3]["kept_fraction"] < 1.0
    assert refs[2]["kept_fraction"] < refs[0]["kept_fraction"] < 1.0  # auto at 0.5, then the server's at 0.7
    text, last = stream_chat(c, model, MIXED[3], extra_body=POLICIES[3][0])
    assert text == refs[3]["text"] and last.usage.model_dump()["policy"] == "local+frequent"


def test_a_request_config_is_the_servers_with_its_policy_and_budget(default_model_dir):
    """In-process: the server's configuration with the request's policy and kv_budget; a calibration's layer budgets
    are rebuilt for the request's own budget (they average to one) and dropped for other policies; what --policy and
    --kv-budget refuse is a 400 naming the field."""
    from tinygen.api import ApiError, ServerSettings, request_config
    from tinygen.fastgen.budget import CALIBRATION_FILE, read_calibration, with_calibration
    from tinygen.fastgen.policy import FastGenConfig
    from tinygen.sampling import SamplingParams

    path, n = default_model_dir / CALIBRATION_FILE, json.loads((default_model_dir / "config.json").read_text())[
        "num_hidden_layers"]
    if not path.is_file():
        pytest.skip(f"no calibration at {path}")
    served = with_calibration(FastGenConfig(kv_budget=0.7), path, n)
    s = ServerSettings("m", 256, NEW, SamplingParams(), served, path, n)
    assert request_config(s, None, None) is served and request_config(s, "auto", 0.7) is served
    half = request_config(s, "auto", 0.5)
    assert half.kv_budget == 0.5 and half.layer_budgets == read_calibration(path, n).budgets(0.5) != \
        served.layer_budgets
    assert half == FastGenConfig(kv_budget=0.5, layer_budgets=half.layer_budgets)
    for name in ("full", "full+full", "local+frequent"):
        cfg = request_config(s, name, None)
        assert cfg.policy == name.split("+full")[0] and cfg.layer_budgets is None and not cfg.budgeted
    paper = ServerSettings("m", 256, NEW, SamplingParams(), FastGenConfig(profile="paper", threshold=0.9))
    assert request_config(paper, "local", None).policy == "local"
    for settings, policy, budget, field in ((s, "nonsense", None, "policy"), (s, "full+local", None, "policy"),
                                            (s, "full", 0.5, "kv_budget"), (paper, "auto", 0.5, "kv_budget")):
        with pytest.raises(ApiError) as e:
            request_config(settings, policy, budget)
        assert (e.value.status, e.value.param) == (400, field), e.value.message


def test_16_concurrent_streams_of_mixed_policies_equal_batch_1_under_the_cap(server):
    """16 streaming clients at once, prompts of 5 to 130 tokens, cycling four policies (the server's auto at 0.7,
    full, auto at 0.5, local+frequent): each answer and kept fraction equals its batch-1 run under its own policy
    (batch_1_answers), the KV peak stays under --kv-budget-mb while the cap holds answers back, and
    /metrics counts what was served, by policy too."""
    url, model = server["url"], server["model"]
    before, running, done = metrics(url), [], threading.Event()

    def watch():
        while not done.is_set():
            running.append(metrics(url)["running_sequences"])
            time.sleep(0.02)
    watcher = threading.Thread(target=watch)
    watcher.start()
    c = client(server)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: stream_chat(c, model, MIXED[i], extra_body=POLICIES[i % 4][0]),
                                range(len(MIXED))))
    done.set()
    watcher.join()
    want = server["refs"]["mixed"]
    assert [text for text, _ in results] == [r["text"] for r in want]
    assert [last.usage.kept_fraction for _, last in results] == [r["kept_fraction"] for r in want]
    assert [last.usage.model_dump()["policy"] for _, last in results] == [POLICIES[i % 4][2] for i in range(16)]
    after = metrics(url)
    assert 0 < after["kv_bytes_peak"] <= after["kv_bytes_cap"] == int(CAP_MB * 2**20)
    assert 1 < max(running) < 16, "the cap, not the batch, decides how many run"
    key = 'requests_total{route="/v1/chat/completions",status="200"}'
    assert after[key] - before.get(key, 0) == 16
    tokens = sum(last.usage.completion_tokens for _, last in results)
    assert after["generated_tokens_total"] - before["generated_tokens_total"] == tokens == 16 * NEW
    key = 'sequences_finished_total{reason="length"}'
    assert after[key] - before.get(key, 0) == 16
    for label in ("auto@0.7", "full", "auto@0.5", "local+frequent"):
        key = f'policy_sequences_finished_total{{policy="{label}"}}'
        assert after[key] - before.get(key, 0) == 4, label
    assert after["running_sequences"] == after["waiting_sequences"] == after["kv_bytes_used"] == 0
    assert after["kv_bytes_allocated"] >= after["kv_bytes_peak"]  # the pool, allocated once


def test_a_client_gone_mid_stream_frees_its_sequence(server):
    """A stream dropped after two events: its sequence leaves and its KV is freed (metrics), long before its 200
    tokens; an answer running beside it is unaffected."""
    url, model = server["url"], server["model"]
    before = metrics(url)
    conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({"model": model, "stream": True, "max_tokens": 200,
                 "messages": [{"role": "user", "content": "Count to a thousand."}]}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    events = 0
    while events < 3:
        events += resp.readline().startswith(b"data: ")
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(stream_chat, client(server), model, MIXED[4])  # POLICIES[0]: the server's own
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        assert other.result()[0] == server["refs"]["mixed"][4]["text"]
    t0 = time.time()
    while (m := metrics(url))["running_sequences"] or m["kv_bytes_used"]:
        assert time.time() - t0 < 10, m
        time.sleep(0.05)
    key = 'sequences_finished_total{reason="cancelled"}'
    assert m[key] - before.get(key, 0) == 1
    assert m["generated_tokens_total"] - before["generated_tokens_total"] < 200 + NEW


BAD = [  # (body, status, code or param in the error)
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {}}, 400, "logit_bias"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, "model_not_found"),
    ({"messages": [{"role": "user", "content": "hi"}], "policy": "nonsense"}, 400, "policy"),
    ({"messages": [{"role": "user", "content": "hi"}], "policy": "full+local"}, 400, "policy"),
    ({"messages": [{"role": "user", "content": "hi"}], "policy": 3}, 400, "policy"),
    ({"messages": [{"role": "user", "content": "hi"}], "kv_budget": 0}, 400, "kv_budget"),
    ({"messages": [{"role": "user", "content": "hi"}], "kv_budget": 1.5}, 400, "kv_budget"),
    ({"messages": [{"role": "user", "content": "hi"}], "kv_budget": "x"}, 400, "kv_budget"),
    ({"messages": [{"role": "user", "content": "hi"}], "policy": "full", "kv_budget": 0.5}, 400, "kv_budget"),
]


def post_oversized(url, size):
    """A POST that announces `size` bytes and sends a few: the server answers from the headers, as a proxy's
    client sees it (sending the whole body would meet a closed socket)."""
    conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(size))
    conn.endheaders(b"{" * 1000)
    resp = conn.getresponse()
    try:
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    url, model = server["url"], server["model"]
    for body, status, where in BAD:
        if isinstance(body, dict):
            body = {"model": model, **body}
        code, _, reply = post(url, "/v1/chat/completions", body)
        assert code == status, (body if isinstance(body, dict) else body[:40], code, reply)
        err = reply["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], reply
        assert where is None or where in (err["param"], err["code"]), reply
        assert where not in ("policy", "kv_budget") or err["param"] == where, reply  # the field named
        assert "Traceback" not in err["message"]
    code, reply = post_oversized(url, 2 << 20)
    assert code == 413 and reply["error"]["message"], reply
    code, _, reply = post(url, "/v1/completions", {"model": model, "prompt": RAW_PROMPT, "temperature": 0})
    assert code == 200 and reply["choices"][0]["text"] == server["refs"]["raw"]


def test_a_full_queue_answers_503_with_retry_after(server):
    """Past --max-waiting queued requests, a 503 with Retry-After; every other request is answered."""
    url, model = server["url"], server["model"]
    body = {"model": model, "prompt": "word " * 30, "max_tokens": NEW}
    with ThreadPoolExecutor(48) as pool:
        replies = list(pool.map(lambda _: post(url, "/v1/completions", body), range(48)))
    busy = [(h, r) for code, h, r in replies if code == 503]
    assert busy and all(code in (200, 503) for code, _, _ in replies)
    assert all(h["Retry-After"] and r["error"]["code"] == "server_busy" for h, r in busy)
    assert len({r["choices"][0]["text"] for code, _, r in replies if code == 200}) == 1


def test_a_request_that_never_fits_the_pool_is_refused(server):
    """Under the second server's small pool a sequence of the whole context can never run, even alone: a 400 at
    once, not a request waiting forever; the next request is answered."""
    p, url = server["spare"]
    body = {"model": server["model"], "messages": [{"role": "user", "content": "word " * 200}], "max_tokens": 40}
    code, _, reply = post(url, "/v1/chat/completions", body)
    assert code == 400 and reply["error"]["code"] == "kv_cache_too_large", reply
    assert post(url, "/v1/completions", {"prompt": RAW_PROMPT, "temperature": 0})[2]["choices"][0]["text"] == \
        server["refs"]["raw"]


def test_sigint_exits_0(server):
    p, url = server["spare"]
    assert post(url, "/v1/completions", {"prompt": RAW_PROMPT, "temperature": 0})[2]["choices"][0]["text"] == \
        server["refs"]["raw"]
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0 and "Traceback" not in err, err


def test_sigterm_lets_the_running_stream_finish_then_exits_0(server):
    """SIGTERM while an answer streams: new requests get 503, the running answer ends whole, exit 0."""
    url, p, model = server["url"], server["proc"], server["model"]
    c = client(server)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(stream_chat, c, model, CHAT_PROMPT, max_tokens=120)
        t0 = time.time()
        while metrics(url)["running_sequences"] == 0:
            assert time.time() - t0 < 10
            time.sleep(0.01)
        p.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        try:
            code = post(url, "/v1/completions", {"prompt": RAW_PROMPT})[0]
        except OSError:  # the listening socket may be closed already
            code = 503
        assert code == 503
        text, last = running.result()
    assert text.startswith(server["refs"]["chat"]) and last.choices[0].finish_reason in ("length", "stop")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0 and "Traceback" not in err, err


@pytest.mark.parametrize("args,fragment", [
    (["--prompt", "hi", "--port", "9000"], "--port is for --serve"),
    (["--prompt", "hi", "--host", "0.0.0.0"], "--host is for --serve"),
    (["--prompt", "hi", "--max-waiting", "4"], "--max-waiting is for --serve"),
    (["--serve", "--prompt", "hi"], "not allowed with argument"),
    (["--serve", "--port", "70000"], "--port must be in [1, 65535]"),
    (["--serve", "--max-waiting", "0"], "--max-waiting must be at least 1"),
    (["--serve", "--stats-json", "x.json"], "--stats-json is not for --serve"),
    (["--serve", "--system", "be brief"], "--system is not for --serve"),
    (["--serve", "--compile", "--policy", "full"], "--compile is not for --serve"),
    (["--serve", "--out", "x.jsonl"], "--out is for --prompts-file"),
])
def test_serve_flags_are_checked_before_any_work(args, fragment, capsys):
    import cli

    with pytest.raises(SystemExit) as e:
        cli.parse_args(args)
    assert e.value.code == 2 and fragment in capsys.readouterr().err


def test_serve_flags_defaults():
    import cli

    a = cli.parse_args(["--serve", "--batch", "16", "--kv-budget-mb", "90"])
    assert (a.host, a.port, a.max_waiting, a.batch, a.kv_budget_mb) == ("127.0.0.1", 8000, 64, 16, 90.0)
