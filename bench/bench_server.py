"""Load on `cli.py --serve` over HTTP: N concurrent streaming clients (the official openai package) asking MT-Bench
first turns, reporting requests/s, output tokens/s, time to first token and inter-token latency (p50 / p99).

Four runs, each against a fresh server process (results -> bench/results/server_cpu.md):
  capped  `auto` and `full` (--policies, one server each) under a KV cap of `--cap-caches` full caches (full caches
          of the mean prompt plus --max-tokens), --clients at once, --batch as large as the clients so the cap
          decides who runs;
  mixed   one server under the same cap, its requests cycling over --policies (each request's own `policy`, and
          `kv_budget` where written auto@B), a row for all and one per policy (not in the default --runs);
  single  one client against the server (--batch 1) beside cli.py's one-shot decode on the same prompt, alternated;
  chaos   --chaos-requests requests, 10% dropped mid-stream and 5% malformed: every other answer arrives exactly once
          and whole, no 5xx but deliberate 503s (retried after Retry-After), and the KV back to 0 at the end.
The servers run with --ignore-eos, so every answer is --max-tokens long and the policies do the same work.

    python bench/bench_server.py                       # all three, the default model, float32
    python bench/bench_server.py --runs capped --requests 64 --max-tokens 64
    python bench/bench_server.py --runs mixed --policies full,auto,auto@0.5,local+frequent
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EVAL_DIR, ROOT, machine_lines  # noqa: E402

sys.path.insert(0, str(ROOT))
from tinygen.tokenizer import Tokenizer  # noqa: E402


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] * 1000 if xs else float("nan")  # ms


class Server:
    """cli.py --serve in a child process on a free port."""

    def __init__(self, a, *args):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, str(ROOT / "cli.py"), "--serve", "--model", a.model, "--port", str(self.port),
               "--dtype", a.dtype, "--max-new-tokens", str(a.max_tokens), "--ignore-eos", *map(str, args)]
        if a.quantize:
            cmd += ["--quantize", a.quantize]
        self.cmd = " ".join(cmd[1:]).replace(str(ROOT) + "/", "")
        self.p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1).read()
                break
            except OSError:
                assert self.p.poll() is None and time.time() - t0 < 300, self.p.stderr.read()
                time.sleep(0.2)

    def metrics(self) -> dict:
        text = urllib.request.urlopen(self.url + "/metrics", timeout=10).read().decode()
        return {m[1]: float(m[2]) for m in re.finditer(r"^tinygen_(\S+) (\S+)$", text, re.M)}

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.p.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024

    def stop(self) -> int:
        self.p.send_signal(signal.SIGTERM)
        err = self.p.communicate(timeout=60)[1]
        assert self.p.returncode == 0 and "Traceback" not in err, err
        return self.p.returncode


async def malformed(port: int) -> int:
    """A request whose body is not JSON: the HTTP status."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    body = b'{"messages": [{"role": "user", "content": "hi"'
    w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await w.drain()
    status = int((await r.readline()).split()[1])
    w.close()
    return status


def policy_body(name: str) -> dict:
    """A --policies entry as a request's extra body fields: "auto@0.5" -> policy auto, kv_budget 0.5."""
    policy, _, budget = name.partition("@")
    return {"policy": policy, **({"kv_budget": float(budget)} if budget else {})}


async def one(client, model: str, prompt: str, max_tokens: int, drop_after: int | None = None,
              extra: dict | None = None) -> dict:
    """One streamed answer: its chunk times, tokens and end; 503s are retried after their Retry-After. extra: body
    fields of tinygen's (policy, kv_budget)."""
    import openai

    retries = 0
    while True:
        t0 = time.perf_counter()
        try:
            stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                          max_tokens=max_tokens, temperature=0, stream=True,
                                                          extra_body=extra)
            break
        except openai.APIStatusError as e:
            if e.status_code != 503:
                return {"status": e.status_code}
            retries += 1
            await asyncio.sleep(float(e.response.headers.get("retry-after", 1)))
    times, usage, finish, ids = [], None, None, set()
    try:
        async for ch in stream:
            ids.add(ch.id)
            if ch.choices and ch.choices[0].delta.content:
                times.append(time.perf_counter())
            if ch.choices and ch.choices[0].finish_reason:
                finish = ch.choices[0].finish_reason
            if ch.usage:
                usage = ch.usage
            if drop_after is not None and len(times) >= drop_after:
                await stream.close()
                return {"status": "dropped", "retries": retries}
    except openai.APIError as e:  # an error event inside the stream (the engine failed a step): a server error
        return {"status": 500, "error": str(e)[:200], "retries": retries}
    return {"status": 200, "t0": t0, "times": times, "tokens": usage.completion_tokens if usage else 0,
            "finish": finish, "ids": ids, "retries": retries, "usage": usage.model_dump() if usage else {}}


async def load(server: Server, prompts: list[str], n: int, clients: int, max_tokens: int, drop=0.0, bad=0.0,
               seed=0, mix: list[str] | None = None) -> dict:
    """n requests from `clients` concurrent workers; the kinds are drawn once (seeded). mix: request i asks for
    policy mix[i % len(mix)] (a --policies entry); None: the server's."""
    import openai

    rng = random.Random(seed)
    kinds = ["bad" if x < bad else "drop" if x < bad + drop else "ok" for x in (rng.random() for _ in range(n))]
    jobs = asyncio.Queue()
    for i, kind in enumerate(kinds):
        jobs.put_nowait((i, kind))
    results = {}
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
    model = json.loads(urllib.request.urlopen(server.url + "/v1/models").read())["data"][0]["id"]

    async def worker():
        while not jobs.empty():
            i, kind = jobs.get_nowait()
            if kind == "bad":
                results[i] = {"status": await malformed(server.port), "kind": kind}
                continue
            drop_after = rng.randint(1, max(1, max_tokens // 2)) if kind == "drop" else None
            policy = mix[i % len(mix)] if mix else None
            results[i] = {**await one(client, model, prompts[i % len(prompts)], max_tokens, drop_after,
                                      policy_body(policy) if policy else None), "kind": kind, "policy": policy}
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    return summary(results, wall)


def summary(results: dict, wall: float) -> dict:
    """Rates and latencies of the answers among `results` that arrived."""
    done = [r for r in results.values() if r["status"] == 200]
    ttft = [r["times"][0] - r["t0"] for r in done if r["times"]]
    itl = [b - a for r in done for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(r["tokens"] for r in done)
    return {"results": results, "wall": wall, "done": len(done), "tokens": tokens, "req_s": len(done) / wall,
            "tok_s": tokens / wall, "ttft50": pct(ttft, 50), "ttft99": pct(ttft, 99), "itl50": pct(itl, 50),
            "itl99": pct(itl, 99), "retries": sum(r.get("retries", 0) for r in results.values())}


def row(name, r, peak=None, most=None):
    extra = f" | {peak / 2**20:.1f} | {most:.0f}" if peak is not None else ""
    return (f"| {name} | {r['done']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | {r['ttft50']:.0f} / {r['ttft99']:.0f} | "
            f"{r['itl50']:.0f} / {r['itl99']:.0f}{extra} |")


HEAD = "| run | answers | requests/s | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms"


def prompt_lengths(a, prompts, tok) -> list[int]:
    return [len(tok.encode(tok.render_chat([{"role": "user", "content": p}]))) for p in prompts[:a.requests]]


def cap_of(a, prompts, tok) -> float:
    """MiB: --cap-caches full caches of the mean prompt plus --max-tokens."""
    cfg = json.loads((Path(a.model) / "config.json").read_text())
    kv_row = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * (
        cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]) * 4  # float32 K+V of one token
    return a.cap_caches * kv_row * (statistics.mean(prompt_lengths(a, prompts, tok)) + a.max_tokens) / 2**20


def capped(a, prompts, tok, lines):
    lengths = prompt_lengths(a, prompts, tok)
    mean, cap_mb = statistics.mean(lengths), cap_of(a, prompts, tok)
    lines += [f"\n## {a.clients} clients, KV cap of {a.cap_caches:g} full caches ({cap_mb:.1f} MiB: full caches of the "
              f"mean prompt, {mean:.0f} tokens ({min(lengths)}-{max(lengths)}), plus {a.max_tokens})\n",
              HEAD + " | peak KV MiB | most running |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for policy in a.policies.split(","):
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in policy_body(policy).items())
        s = Server(a, *flags.split(), "--kv-budget-mb", f"{cap_mb:.4f}", "--batch", a.clients,
                   "--max-waiting", 4 * a.clients)
        asyncio.run(load(s, prompts, 2, 2, 4))  # warm-up, not counted
        most, stop = [0.0], False

        async def run():
            async def watch():
                while not stop:
                    most[0] = max(most[0], (await asyncio.to_thread(s.metrics))["running_sequences"])
                    await asyncio.sleep(0.25)
            watcher = asyncio.create_task(watch())
            r = await load(s, prompts, a.requests, a.clients, a.max_tokens)
            return r, watcher
        r, watcher = asyncio.run(run())
        stop = True
        m = s.metrics()
        lines.append(row(f"`{policy}`", r, m["kv_bytes_peak"], most[0]))
        print(lines[-1], f"\n  {s.cmd}", flush=True)
        s.stop()
    lines.append(f"\nServer: `{s.cmd.replace(flags, '--policy P')}`")


def mixed(a, prompts, tok, lines):
    """One server under the capped run's cap; its requests cycle over --policies, a row for all and one each."""
    mix = a.policies.split(",")
    cap_mb = cap_of(a, prompts, tok)
    s = Server(a, "--kv-budget-mb", f"{cap_mb:.4f}", "--batch", a.clients, "--max-waiting", 4 * a.clients)
    asyncio.run(load(s, prompts, len(mix), len(mix), 4, mix=mix))  # warm-up, every policy, not counted
    r = asyncio.run(load(s, prompts, a.requests, a.clients, a.max_tokens, mix=mix))
    m = s.metrics()
    for x in r["results"].values():  # each answer ran under the policy it asked for
        assert x["status"] != 200 or (x["usage"]["policy"], x["usage"]["kv_budget"]) == (
            x["policy"].partition("@")[0], policy_body(x["policy"]).get("kv_budget", x["usage"]["kv_budget"])), x
    lines += [f"\n## {a.clients} clients, requests cycling over {', '.join(f'`{x}`' for x in mix)} on one server, KV "
              f"cap {cap_mb:.1f} MiB (as the capped run)\n", HEAD + " | peak KV MiB |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
              row("all", r) + f" {m['kv_bytes_peak'] / 2**20:.1f} |"]
    for policy in mix:  # each policy's share of the same wall time
        own = summary({i: x for i, x in r["results"].items() if x["policy"] == policy}, r["wall"])
        lines.append(row(f"`{policy}`", own) + " |")
    lines.append(f"\nServer: `{s.cmd}`")
    print("\n".join(lines[-len(mix) - 3:]), flush=True)
    s.stop()


def single(a, prompts, lines):
    prompt = prompts[0]
    s = Server(a, "--batch", 1)
    asyncio.run(load(s, [prompt], 1, 1, 4))  # warm-up
    http, cli = [], []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(a.repeats):
            r = asyncio.run(one_client(s, prompt, a.max_tokens))
            http.append((len(r["times"]) - 1) / (r["times"][-1] - r["times"][0]))
            stats = Path(d) / "stats.json"
            cmd = [sys.executable, "cli.py", "--model", a.model, "--dtype", a.dtype, "--prompt", prompt,
                   "--max-new-tokens", str(a.max_tokens), "--ignore-eos", "--stats-json", str(stats)]
            subprocess.run(cmd + (["--quantize", a.quantize] if a.quantize else []), cwd=ROOT, check=True,
                           capture_output=True)
            cli.append(json.loads(stats.read_text())["decode_tokens_per_second"])
    s.stop()
    h, c = statistics.median(http), statistics.median(cli)
    lines += ["\n## One client against cli.py, the same prompt, alternated\n",
              f"Decode tokens/s (tokens after the first over the time between the first and the last; cli.py: its "
              f"stats line's figure), medians of {a.repeats}: server (`--batch 1`) **{h:.1f}**, cli.py one-shot "
              f"**{c:.1f}**: **{h / c:.2f}x** (runs: server {', '.join(f'{x:.1f}' for x in http)}; cli "
              f"{', '.join(f'{x:.1f}' for x in cli)}). Server: `{s.cmd}`"]
    print(lines[-1], flush=True)


async def one_client(s, prompt, max_tokens):
    import openai

    client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
    model = json.loads(urllib.request.urlopen(s.url + "/v1/models").read())["data"][0]["id"]
    r = await one(client, model, prompt, max_tokens)
    await client.close()
    return r


def chaos(a, prompts, lines):
    s = Server(a, "--batch", 8, "--max-waiting", 16, "--policy", a.chaos_policy)
    asyncio.run(load(s, prompts, 2, 2, 4))  # warm-up
    idle_rss = s.rss_mib()
    r = asyncio.run(load(s, prompts, a.chaos_requests, a.clients, a.chaos_tokens, drop=0.10, bad=0.05, seed=1))
    time.sleep(1)
    m = s.metrics()
    res = r["results"]
    by_kind = {k: [x for x in res.values() if x["kind"] == k] for k in ("ok", "drop", "bad")}
    whole = [x for x in by_kind["ok"] if x["status"] == 200 and x["tokens"] == a.chaos_tokens and x["finish"]]
    ids = [i for x in whole for i in x["ids"]]
    server_errors = [x for x in res.values() if isinstance(x["status"], int) and x["status"] >= 500]
    refused = [x for x in by_kind["ok"] if isinstance(x["status"], int) and 400 <= x["status"] < 500]
    lines += [f"\n## {a.chaos_requests} requests, {a.clients} clients, `{a.chaos_policy}`: 10% dropped mid-stream, 5% "
              "malformed\n",
              f"- answers asked for: {len(by_kind['ok'])}; arrived whole ({a.chaos_tokens} tokens and a finish "
              f"reason): **{len(whole)}**; refused with a 4xx (a prompt past the context): {len(refused)}; lost: "
              f"**{len(by_kind['ok']) - len(whole) - len(refused) - len(server_errors)}**; failed with a 5xx: "
              f"**{len(server_errors)}**; duplicated (an id seen "
              f"twice): **{len(ids) - len(set(ids))}**",
              f"- dropped mid-stream: {len(by_kind['drop'])}; malformed: {len(by_kind['bad'])}, answered "
              f"{sorted({x['status'] for x in by_kind['bad']})}; 5xx: **{len(server_errors)}**; 503s retried after "
              f"Retry-After: {r['retries']}",
              f"- at the end: running {m['running_sequences']:.0f}, waiting {m['waiting_sequences']:.0f}, KV "
              f"blocks held **{m['kv_bytes_used']:.0f} bytes**; finished by reason: "
              f"{ {k: int(v) for k, v in m.items() if k.startswith('sequences_finished')} }; server RSS "
              f"{idle_rss:.0f} MiB after warm-up, {s.rss_mib():.0f} MiB at the end",
              f"- {r['req_s']:.2f} requests/s, {r['tok_s']:.1f} output tok/s; server: `{s.cmd}`"]
    print("\n".join(lines[-4:]), flush=True)
    s.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "weights" / "SmolLM2-135M-Instruct"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantize", default=None)
    p.add_argument("--prompts", default=str(EVAL_DIR / "mt_bench.jsonl"))
    p.add_argument("--runs", default="capped,single,chaos")
    p.add_argument("--policies", default="full,auto", help="capped: a server each; mixed: cycled over the requests "
                   "of one server (auto@B: auto at kv_budget B)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=64, help="capped: requests per policy")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--cap-caches", type=float, default=8)
    p.add_argument("--cut", type=int, default=0, help="keep the prompts of at least this many tokens, cut to it")
    p.add_argument("--repeats", type=int, default=3, help="single: alternated runs of each")
    p.add_argument("--chaos-requests", type=int, default=500)
    p.add_argument("--chaos-tokens", type=int, default=8)
    p.add_argument("--chaos-policy", default="auto")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "server_cpu.md"))
    a = p.parse_args()
    prompts = [json.loads(line)["turns"][0] for line in Path(a.prompts).read_text().splitlines() if line.strip()]
    tok = Tokenizer(a.model)
    if a.cut:  # prompts of about one length: the pools' padding then costs nothing (docs/batching.md)
        prompts = [tok.decode(ids[:a.cut]) for ids in map(tok.encode, prompts) if len(ids) >= a.cut]
    lines = ["# cli.py --serve under load (bench/bench_server.py)", "", *[f"- {x}" for x in machine_lines()],
             f"- command: `python bench/bench_server.py {' '.join(sys.argv[1:])}`", f"- model {Path(a.model).name}, "
             f"{a.dtype}{', ' + a.quantize if a.quantize else ''}; MT-Bench first turns ({len(prompts)}) through the "
             f"chat template, in file order{f', those of {a.cut}+ tokens cut to {a.cut}' if a.cut else ''}; greedy; "
             "every answer --max-tokens long (--ignore-eos); warm-up excluded"]
    for run in a.runs.split(","):
        {"capped": lambda: capped(a, prompts, tok, lines), "single": lambda: single(a, prompts, lines),
         "chaos": lambda: chaos(a, prompts, lines), "mixed": lambda: mixed(a, prompts, tok, lines)}[run]()
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
