"""`cli.py --serve`: an OpenAI-compatible HTTP server on the continuous batcher (Starlette routes, uvicorn).

The HTTP side is async and thin: it checks a request (api.py, tokenizing off the event loop), hands it to the
engine thread (engine_loop.py, which alone owns the model and the caches) and relays what the engine posts back,
as server-sent events or one JSON body. Routes: POST /v1/chat/completions and /v1/completions, GET /v1/models,
/health, /metrics (Prometheus text) and / (the chat page, static/chat.html).

A request may bring its own `policy` and `kv_budget` (api.py: the server's FastGen configuration with those two
replaced); the runner mixes policies in one batch, each sequence keeping what its own policy keeps.

Admission: a prompt past the context, or one whose projected KV (under its own policy) could never fit under
--kv-budget-mb even alone, is a 400; past --max-waiting queued requests, a 503 with Retry-After. A client that
disconnects (or drops its stream) has its sequence cancelled: it leaves the batch, its caches freed, at the engine's
next step. SIGINT or SIGTERM: new requests get 503, queued ones a 503 error, running answers finish (for up to 10 s,
then they end with an error event), and the process exits 0. No authentication and no TLS: it binds 127.0.0.1
unless --host says otherwise; put a proxy in front of it to serve others.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
from pathlib import Path

from .api import ApiError, ServerSettings, chunk, completion, decode_body, parse
from .engine_loop import Engine, Request, Unavailable

MAX_BODY = 1 << 20  # bytes: a body past this is a 413 (a context of 8k tokens is some 40 kB of text)
CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"
# What /v1/models lists (the server's own first): a menu for the chat page. A request may name any policy --policy
# takes, these or others.
OFFERED = ("auto", "full", "local+frequent", "special+punct+frequent+local", "local", "frequent")


def build_app(engine: Engine, settings: ServerSettings, tok):
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    requests_total: dict[tuple[str, int], int] = {}  # (route, status) -> count; the event loop's own
    ids = itertools.count()

    def reply(route: str, status: int, body: dict, headers=None):
        requests_total[route, status] = requests_total.get((route, status), 0) + 1
        return JSONResponse(body, status, headers)

    def error(route: str, e: ApiError):
        return reply(route, e.status, e.body(), {"Retry-After": "1"} if e.status == 503 else None)

    async def read_body(request) -> bytes:
        if int(request.headers.get("content-length") or 0) > MAX_BODY:
            raise ApiError(413, f"the body is larger than {MAX_BODY} bytes")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > MAX_BODY:
                raise ApiError(413, f"the body is larger than {MAX_BODY} bytes")
        return bytes(raw)

    async def generate(request, chat: bool):
        route = request.url.path
        try:
            job = await run_in_threadpool(lambda raw: parse(decode_body(raw), chat, settings, tok),
                                          await read_body(request))
            if engine.too_large(len(job.prompt), job.max_tokens, job.fastgen):
                raise ApiError(400, "this prompt and max_tokens need more KV cache than --kv-budget-mb allows, "
                               "even alone", "max_tokens", "kv_cache_too_large")
            loop, queue = asyncio.get_running_loop(), asyncio.Queue()

            def post(event):  # from the engine thread
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, event)
                except RuntimeError:  # the event loop is closed: nobody is listening any more
                    pass

            req = Request(job.prompt, job.max_tokens, job.sampling, job.stop, post, job.fastgen)
            try:
                engine.submit(req)
            except Unavailable as e:
                raise ApiError(503, str(e), code="server_busy") from None
        except ApiError as e:
            return error(route, e)
        except ClientDisconnect:
            return PlainTextResponse("", 499)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{next(ids)}"
        if job.stream:
            requests_total[route, 200] = requests_total.get((route, 200), 0) + 1
            return Stream(events(rid, job.model, chat, queue), lambda: engine.cancel(req))
        text = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), 1.0)
                except asyncio.TimeoutError:  # nothing is sent until the end: look whether the client is still there
                    if await request.is_disconnected():
                        engine.cancel(req)
                        return PlainTextResponse("", 499)
                    continue
                if event[0] == "text":
                    text.append(event[1])
                elif event[0] == "done":
                    return reply(route, 200, completion(rid, job.model, chat, "".join(text), event[1], event[2]))
                else:
                    return error(route, ApiError(event[1], event[2]))
        except BaseException:  # the client went away (the task is cancelled): free its sequence
            engine.cancel(req)
            raise

    async def events(rid: str, model: str, chat: bool, queue: asyncio.Queue):
        """Server-sent events: a first chunk (chat: the role), the text as it comes, the end with `usage`."""
        def sse(payload) -> bytes:
            return f"data: {json.dumps(payload) if not isinstance(payload, str) else payload}\n\n".encode()

        if chat:
            yield sse(chunk(rid, model, chat, None))
        while True:
            event = await queue.get()
            if event[0] == "text":
                yield sse(chunk(rid, model, chat, event[1]))
                continue
            if event[0] == "done":
                yield sse(chunk(rid, model, chat, "", event[1], event[2]))
            else:
                yield sse(ApiError(event[1], event[2]).body())
            yield sse("[DONE]")
            return

    class Stream(StreamingResponse):
        """A streaming response that cancels its request however it ends: finished (a no-op then), the client
        gone, the server shutting down."""

        def __init__(self, content, on_close):
            super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self.on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.on_close()

    async def chat_completions(request):
        return await generate(request, chat=True)

    async def completions(request):
        return await generate(request, chat=False)

    async def models(request):
        return reply("/v1/models", 200, {"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": 0, "owned_by": "tinygen",
            "context": settings.context, "policy": settings.policy, "profile": settings.fastgen.profile,
            "kv_budget": settings.kv_budget,
            "policies": [settings.policy, *(p for p in OFFERED if p != settings.policy)]}]})

    async def health(request):
        if engine.draining:
            return reply("/health", 503, {"status": "shutting down"})
        return reply("/health", 200, {"status": "ok", "model": settings.model_name})

    async def metrics(request):
        return PlainTextResponse(prometheus(engine.metrics, requests_total),
                                 media_type="text/plain; version=0.0.4")

    async def page(request):
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        message = "no such route" if status == 404 else "method not allowed" if status == 405 else str(exc)
        return reply("other", status, ApiError(status, message).body())

    async def internal(request, exc):  # never a traceback for the client
        return reply("other", 500, ApiError(500, f"internal error ({type(exc).__name__})").body())

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models), Route("/health", health), Route("/metrics", metrics), Route("/", page)]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, Exception: internal})


def prometheus(m: dict, requests_total: dict) -> str:
    """The engine's last snapshot and the request counts as Prometheus text."""
    lines = []

    def metric(name, kind, help_, samples):
        lines.extend([f"# HELP tinygen_{name} {help_}", f"# TYPE tinygen_{name} {kind}"])
        lines.extend(f"tinygen_{name}{labels} {value}" for labels, value in samples)

    metric("running_sequences", "gauge", "sequences in the decode batch", [("", m["running"])])
    metric("waiting_sequences", "gauge", "requests queued for admission", [("", m["waiting"])])
    metric("tokens_per_second", "gauge", "tokens generated per second over the last 10 s",
           [("", round(m["tokens_per_second"], 3))])
    metric("decode_tokens_per_second", "gauge", "decode-step tokens per second of decode time, since start",
           [("", round(m["decode_tokens_per_second"], 3))])
    metric("generated_tokens_total", "counter", "tokens of finished and cancelled sequences",
           [("", m["generated_tokens"])])
    for name, help_ in (("allocated", "the paged KV pool's storage, allocated once (--kv-budget-mb)"),
                        ("used", "the pool's blocks the running sequences hold now"),
                        ("kept", "K and V of the tokens the running sequences' caches keep"),
                        ("full", "what full caches of the running sequences' lengths would hold"),
                        ("peak", "the most pool blocks' bytes held at once since start"),
                        ("cap", "--kv-budget-mb in bytes (0: no cap)")):
        metric(f"kv_bytes_{name}", "gauge", help_, [("", m[f"kv_bytes_{name}"])])
    kept = m["kv_bytes_kept"] / m["kv_bytes_full"] if m["kv_bytes_full"] else 1.0
    metric("kept_fraction", "gauge", "kept over full, running sequences (every policy)", [("", round(kept, 6))])
    metric("preemptions_total", "counter", "sequences preempted to free blocks (recomputed later)",
           [("", m["preemptions"])])
    metric("sequences_finished_total", "counter", "sequences ended, by finish reason",
           [(f'{{reason="{r}"}}', n) for r, n in sorted(m["finished"].items())])
    metric("policy_sequences_finished_total", "counter", "sequences ended, by FastGen policy (auto: @kv_budget "
           "under the budget profile)", [(f'{{policy="{p}"}}', n) for p, n in sorted(m["by_policy"].items())])
    metric("requests_total", "counter", "HTTP requests answered, by route and status",
           [(f'{{route="{r}",status="{s}"}}', n) for (r, s), n in sorted(requests_total.items())])
    return "\n".join(lines) + "\n"


def serve(a, model, tok, fastgen, sampling) -> int:
    """Run the server until SIGINT or SIGTERM; 0 once it has drained."""
    import uvicorn

    from .batch import BatchRunner

    from .fastgen.budget import calibration_path

    cap = None if a.kv_budget_mb is None else int(a.kv_budget_mb * 2**20)
    settings = ServerSettings(os.path.basename(os.path.normpath(a.model)), model.cfg.max_seq_len, a.max_new_tokens,
                              sampling, fastgen, calibration_path(a.model, a.calibration), model.cfg.n_layers)
    from .graphs import graphs_wanted

    engine = Engine(lambda: BatchRunner(model, tok, fastgen, sampling, a.max_new_tokens, a.batch, cap,
                                        a.ignore_eos, cuda_graphs=graphs_wanted(a, model)), tok, a.max_waiting)
    app = build_app(engine, settings, tok)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.drain()  # new requests get 503 at once; the engine lets running answers finish
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # handled: uvicorn would raise it again on the way out (exit 130/143)

    config = uvicorn.Config(app, host=a.host, port=a.port, log_level="warning", timeout_graceful_shutdown=15,
                            timeout_keep_alive=5)
    engine.start()
    print(f"[serving {settings.model_name} on http://{a.host}:{a.port} | policy {a.policy} | batch {a.batch} | KV cap "
          f"{'none' if cap is None else f'{a.kv_budget_mb:g} MiB'} | no auth: put a proxy in front to serve others]",
          flush=True)
    try:
        Server(config).run()
    finally:
        engine.stop()
    return 0
