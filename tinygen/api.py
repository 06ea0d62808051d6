"""The OpenAI API's request bodies, checked by hand into what the engine runs, and its response shapes.

Checked field by field so that every bad request gets a 400 naming the field (a framework's validator answers 422
in its own format). Accepted, as in OpenAI's API: `model`, `max_tokens` (chat also `max_completion_tokens`),
`temperature` in [0, 2], `top_p` in (0, 1], `seed`, `stop` (a string or up to 4), `stream`, `stream_options`
(`include_usage`), `n` = 1, `user`, and `frequency_penalty` / `presence_penalty` at 0; chat: `messages` (roles
system, user, assistant; content a string or text parts); completions: `prompt` (a string, or a list of one). Two
fields of tinygen's choose the request's own KV cache: `policy` (any name `--policy` takes: auto, full, or
components joined by '+') and `kv_budget` (in (0, 1]: auto's kept fraction, for the budget profile only). Each
left out is the server's flag; the rest of the FastGen configuration (--profile, --threshold, --shapes, the ratios,
the calibration) is always the server's. Any other field is a 400, as OpenAI does. Defaults come from the server's
command line (`--temperature`, `--top-p`, `--top-k`, `--seed`, `--max-new-tokens`, `--policy`, `--kv-budget`).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import TinygenError
from .fastgen.budget import with_calibration
from .fastgen.policy import FULL, FastGenConfig, parse_policy
from .sampling import SamplingParams

KNOWN = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n", "user",
         "frequency_penalty", "presence_penalty", "policy", "kv_budget"}
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """An OpenAI-style error: the HTTP status, a message, its type and the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                503: "server_busy", 500: "server_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """A checked request: the prompt's ids and how to answer it."""
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    model: str
    fastgen: FastGenConfig  # the request's own: the server's, with its policy and kv_budget


@dataclass
class ServerSettings:
    """What requests are checked against: the served model and the command line's defaults."""
    model_name: str
    context: int  # the model's positions: a prompt must leave room for one new token
    max_new_tokens: int
    sampling: SamplingParams
    fastgen: FastGenConfig  # the server's, as it runs (with its calibration's layer budgets, if any)
    calibration: Path | None = None  # the budget profile's per-layer calibration, for a request's own kv_budget
    n_layers: int = 0
    configs: dict = field(default_factory=dict)  # (policy, kv_budget) -> FastGenConfig, built once each

    @property
    def policy(self) -> str:
        return self.fastgen.policy

    @property
    def kv_budget(self) -> float | None:
        """auto with the budget profile: its kept fraction; None otherwise."""
        return self.fastgen.kv_budget if self.fastgen.budgeted else None


def number(body: dict, name: str, lo: float, hi: float, default, open_lo: bool = False):
    x = body.get(name)
    if x is None:
        return default
    if type(x) not in (int, float) or not math.isfinite(x) or x < lo or x > hi or (open_lo and x == lo):
        raise ApiError(400, f"{name} must be a number in {'(' if open_lo else '['}{lo:g}, {hi:g}]", name)
    return x


def integer(body: dict, name: str, lo: int, hi: int, default):
    x = body.get(name)
    if x is None:
        return default
    if type(x) is not int or not lo <= x <= hi:
        raise ApiError(400, f"{name} must be an integer in [{lo}, {hi}]", name)
    return x


def decode_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def text_of(content, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{where}.content must be a string or a list of text parts", where)


def parse(body: dict, chat: bool, s: ServerSettings, tok) -> Job:
    """Check a request body against the settings; tokenize its prompt. Raises ApiError."""
    own = {"messages", "max_completion_tokens"} if chat else {"prompt"}
    extra = sorted(set(body) - KNOWN - own)
    if extra:
        raise ApiError(400, f"unrecognized request argument: {extra[0]}", extra[0])
    model = body.get("model", s.model_name)
    if not isinstance(model, str):
        raise ApiError(400, "model must be a string", "model")
    if model != s.model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server has {s.model_name!r}", "model",
                       "model_not_found")
    for name, want in (("stream", bool), ("user", str), ("stream_options", dict), ("policy", str)):
        if body.get(name) is not None and not isinstance(body[name], want):
            raise ApiError(400, f"{name} must be a {want.__name__ if want is not dict else 'object'}", name)
    integer(body, "n", 1, 1, 1)
    for name in ("frequency_penalty", "presence_penalty"):
        number(body, name, 0, 0, 0)
    fastgen = request_config(s, body.get("policy"), number(body, "kv_budget", 0, 1, None, open_lo=True))
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = integer(body, name, 1, 10**9, s.max_new_tokens)
    sampling = SamplingParams(number(body, "temperature", 0, 2, s.sampling.temperature), s.sampling.top_k,
                              number(body, "top_p", 0, 1, s.sampling.top_p, open_lo=True),
                              integer(body, "seed", 0, 2**64 - 1, s.sampling.seed))
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4", "stop")
    ids = prompt_ids(body, chat, tok)
    if len(ids) >= s.context:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; the model's context is {s.context}",
                       "messages" if chat else "prompt", "context_length_exceeded")
    return Job(ids, max_tokens, sampling, tuple(stop), bool(body.get("stream")), s.model_name, fastgen)


def request_config(s: ServerSettings, policy: str | None, budget: float | None) -> FastGenConfig:
    """The server's FastGen configuration with the request's policy and kv_budget (None: the server's), checked by
    the rules --policy and --kv-budget follow. Raises ApiError naming the field."""
    policy = s.policy if policy is None else policy
    key = (policy, budget)
    if key in s.configs:
        return s.configs[key]
    try:
        bits = parse_policy(policy)
    except TinygenError as e:
        raise ApiError(400, str(e), "policy", "invalid_policy") from None
    policy = "full" if bits == FULL else policy  # "full+full" too: the runner tells a full cache by its name
    if policy == s.policy and budget in (None, s.kv_budget):
        cfg = s.fastgen
    else:
        # layer budgets belong to one kv_budget (they average to it): dropped, then rebuilt from the calibration
        cfg = replace(s.fastgen, policy=policy, layer_budgets=None)
        if budget is not None:
            if not cfg.budgeted:
                why = "the budget profile (this server's auto runs --profile paper)" if policy == "auto" else \
                    f"policy auto with the budget profile; this request's policy is {policy!r} (the server's " \
                    "unless the request names one)"
                raise ApiError(400, f"kv_budget is for {why}", "kv_budget", "invalid_kv_budget")
            cfg = replace(cfg, kv_budget=budget)
        cfg = with_calibration(cfg, s.calibration, s.n_layers)
    if len(s.configs) < 256:  # bounded: a client may send any number of budgets
        s.configs[key] = cfg
    return cfg


def prompt_ids(body: dict, chat: bool, tok) -> list[int]:
    """Chat: the messages through the checkpoint's template (as cli.py renders one user turn); completions: the raw
    text with BOS where the model uses one (as cli.py --no-chat)."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", "messages")
        rendered = []
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict) or m.get("role") not in ROLES or set(m) - {"role", "content", "name"}:
                raise ApiError(400, f"{where} must be an object with role ({', '.join(ROLES)}) and content", where)
            rendered.append({"role": m["role"], "content": text_of(m.get("content"), where)})
        try:
            return tok.encode(tok.render_chat(rendered))
        except TinygenError as e:
            raise ApiError(400, str(e), "messages") from None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string (or a list of one)", "prompt")
    return tok.encode(prompt, bos=tok.add_bos)


def chunk(rid: str, model: str, chat: bool, text: str | None, finish: str | None = None, usage=None) -> dict:
    """One server-sent event's payload: chat's delta, or a completion's piece of text."""
    choice = {"index": 0, "finish_reason": finish}
    if chat:
        choice["delta"] = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
    else:
        choice.update(text=text or "", logprobs=None)
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
           "model": model, "choices": [choice]}
    if usage is not None:
        out["usage"] = usage
    return out


def completion(rid: str, model: str, chat: bool, text: str, finish: str, usage: dict) -> dict:
    """A whole (non-streaming) answer."""
    choice = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage}
