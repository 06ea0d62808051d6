"""tinygen command line: chat or complete a prompt, or score a text's perplexity.

    python cli.py --prompt "What is the capital of France?"
    python cli.py --chat
    python cli.py --prompts-file prompts.jsonl --out answers.jsonl --batch 8
    python cli.py --perplexity ../shared/eval/wikitext2_test.txt --ctx 512
    python cli.py --serve --port 8000
"""
from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # from the first line on, Ctrl-C or SIGTERM exits quietly (130 / 143) until run_main
    for _sig in (signal.SIGINT, signal.SIGTERM):  # puts its own handler in place
        signal.signal(_sig, lambda signum, frame: sys.exit(128 + signum))

import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from tinygen.cliutil import (OneLineParser, PrefillProgress, check_interrupted, held,  # noqa: E402
                             read_text, run_main, write_json_atomic)
DEFAULT_MODEL = ROOT / "weights" / "SmolLM2-135M-Instruct"


def parse_args(argv):
    p = OneLineParser(description="tinygen: a compact Llama inference engine with FastGen KV-cache compression")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the user message (or raw text with --no-chat)")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    src.add_argument("--perplexity", metavar="FILE", help="score this UTF-8 text file instead of generating")
    src.add_argument("--prompts-file", metavar="FILE", help="answer every prompt of a JSONL file (records with "
                     "prompt, instruction or turns) in batches; needs --out")
    src.add_argument("--chat", action="store_true", help="an interactive conversation whose cache carries it from "
                     "turn to turn (/reset, /stats, /exit; with stdin not a terminal, one user turn per line)")
    src.add_argument("--serve", action="store_true", help="an OpenAI-compatible HTTP server on the continuous "
                     "batcher (docs/server.md); no authentication: put a proxy in front to serve others")
    p.add_argument("--host", default=None, help="--serve: the address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="--serve: the port (default 8000)")
    p.add_argument("--max-waiting", type=int, default=None, metavar="N", help="--serve: requests queued for "
                   "admission at most; past it a 503 with Retry-After (default 64)")
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens for --perplexity (default 512)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="HF-layout Llama checkpoint directory")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when present; default)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--quantize", metavar="MODE", default=None, help="weight-only quantization at load time: int8 "
                   "(per output channel) or int4 (groups of 32; the checkpoint's own Q4_1 blocks when it has them)")
    p.add_argument("--policy", default="auto", help="KV-cache policy: auto (FastGen profiling, default), full, or "
                   "components joined by '+' for every head: special, punct, local, frequent (e.g. local+frequent)")
    p.add_argument("--profile", choices=("budget", "paper"), default=None, help="how auto chooses each head's policy: "
                   "budget (spend --kv-budget where profiling says it matters; the default) or paper (the first of the "
                   "paper's candidates that recovers --threshold)")
    p.add_argument("--kv-budget", type=float, default=None, metavar="F", help="auto: keep about this fraction of the "
                   "KV cache, in (0, 1] (default 0.7)")
    p.add_argument("--shapes", choices=("local+frequent", "profile"), default=None, help="auto, budget profile: what "
                   "each head keeps of its share: local+frequent (half recent window, half heavy hitters; the "
                   "default) or profile (the prompt's profile picks frequent or local+frequent per head)")
    p.add_argument("--calibration", metavar="FILE", default=None, help="auto, budget profile: spread --kv-budget "
                   "across layers by this calibration (python -m tinygen.eval.calibrate); default: the model "
                   "directory's fastgen_calibration.json if there is one; 'none' spreads it evenly")
    p.add_argument("--threshold", type=float, default=None, help="auto with the paper's profile: recovery threshold "
                   "T in (0, 1] (default 0.98; giving it selects --profile paper)")
    p.add_argument("--local-ratio", type=float, default=None, help="fixed policies and --profile paper: local window "
                   "as a share of the length, in [0, 1] (default 0.3)")
    p.add_argument("--frequent-ratio", type=float, default=None, help="fixed policies and --profile paper: "
                   "heavy-hitter budget share, in [0, 1] (default 0.3)")
    p.add_argument("--system", help="system prompt for the chat template")
    p.add_argument("--no-chat", action="store_true", help="raw completion: no chat template")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens tokens")
    p.add_argument("--stats-json", metavar="FILE", help="also write the stats as JSON to FILE (with --chat: a list, "
                   "one record per turn)")
    p.add_argument("--out", metavar="FILE", help="--prompts-file: write the answers here (JSONL, input order)")
    p.add_argument("--batch", type=int, default=None, help="--prompts-file and --serve: most sequences decoded at "
                   "once (default 8)")
    p.add_argument("--kv-budget-mb", type=float, default=None, metavar="M", help="--prompts-file and --serve: cap on "
                   "the KV caches' bytes (MiB); a prompt joins the batch when its projected cache fits")
    p.add_argument("--no-cuda-graphs", action="store_true", help="on CUDA, decode op by op instead of replaying "
                   "the step as CUDA graphs (graphs.py)")
    p.add_argument("--compile", action="store_true", help="decode through torch.compile (CPU, every policy; a "
                   "prompt, a chat or a prompts file): fewer, fused ops per step; compiling takes about a minute at "
                   "every start")
    p.add_argument("--progress", action="store_true", help="show the progress line of long prefills (1k tokens or "
                   "more) even when stderr is not a terminal")
    p.add_argument("--resume", action="store_true", help="--prompts-file: keep the answers already in --out and "
                   "answer only the prompts missing there (after a crash, a kill or a full disk)")
    a = p.parse_args(argv)
    for message in invalid(a):
        p.error(message)
    return a


DEVICE = re.compile(r"auto|cpu|cuda(:\d{1,3})?")


def finite(x) -> bool:
    return x is None or math.isfinite(x)


def invalid(a) -> list[str]:
    """Every check of the command line's values and combinations, in one place, before any work starts: the
    messages of what is wrong (the first one is reported)."""
    batch_given, a.batch = a.batch is not None, 8 if a.batch is None else a.batch
    a.profile = a.profile or ("paper" if a.threshold is not None else "budget")
    modes = [a.prompt is not None, a.prompt_file is not None, a.perplexity is not None, a.chat,
             a.prompts_file is not None, a.serve]
    server_given = {"--host": a.host is not None, "--port": a.port is not None,
                    "--max-waiting": a.max_waiting is not None}
    a.host = "127.0.0.1" if a.host is None else a.host
    a.port = 8000 if a.port is None else a.port
    a.max_waiting = 64 if a.max_waiting is None else a.max_waiting
    budgeted = a.policy == "auto" and a.profile == "budget"
    generating = a.perplexity is None
    checks = [
        (not any(modes), "give --prompt, --prompt-file, --prompts-file, --chat, --perplexity or --serve"),
        (a.prompts_file is not None and a.out is None, "--prompts-file needs --out FILE for the answers"),
        *[(given and a.prompts_file is None, f"{flag} is for --prompts-file")
          for flag, given in (("--out", a.out is not None), ("--resume", a.resume))],
        *[(given and a.prompts_file is None and not a.serve, f"{flag} is for --prompts-file and --serve")
          for flag, given in (("--batch", batch_given), ("--kv-budget-mb", a.kv_budget_mb is not None))],
        *[(given and not a.serve, f"{flag} is for --serve") for flag, given in server_given.items()],
        *[(given and a.serve, f"{flag} is not for --serve{why}") for flag, given, why in (
            ("--stats-json", a.stats_json is not None, ": /metrics and each answer's usage carry the figures"),
            ("--system", a.system is not None, ": a chat request brings its own system message"),
            ("--no-chat", a.no_chat, ": /v1/completions takes raw text, /v1/chat/completions messages"),
            ("--compile", a.compile, ""), ("--progress", a.progress, ""))],
        (not 1 <= a.port <= 65535, "--port must be in [1, 65535]"),
        (not a.host.strip(), "--host is empty"),
        (not 1 <= a.max_waiting <= 10**6, "--max-waiting must be at least 1 (and at most 1000000)"),
        (a.chat and a.no_chat, "--chat needs the chat template; --no-chat is for one raw completion"),
        (a.system is not None and (a.no_chat or not generating), "--system is for the chat template; --no-chat "
         "and --perplexity have none"),
        (a.prompt is not None and not a.prompt.strip(), "--prompt is empty"),
        (not all(map(finite, (a.temperature, a.top_p, a.kv_budget, a.kv_budget_mb, a.threshold, a.local_ratio,
                              a.frequent_ratio))), "numbers must be finite (not inf or nan)"),
        (a.max_new_tokens < 1, "--max-new-tokens must be at least 1"),
        (a.max_new_tokens > 10**9, "--max-new-tokens must be at most 1000000000"),
        (not a.temperature >= 0, "--temperature must be >= 0"),
        (a.top_k < 0, "--top-k must be >= 0"),
        (not 0 < a.top_p <= 1, "--top-p must be in (0, 1]"),
        (a.seed is not None and not 0 <= a.seed < 2**64, "--seed must be in [0, 2**64)"),
        (not 2 <= a.ctx <= 10**7, "--ctx must be at least 2 (and at most 10000000)"),
        (not 1 <= a.batch <= 65536, "--batch must be at least 1 (and at most 65536)"),
        (a.kv_budget_mb is not None and not a.kv_budget_mb > 0, "--kv-budget-mb must be positive"),
        (a.threshold is not None and not 0 < a.threshold <= 1, "--threshold must be in (0, 1]"),
        (a.kv_budget is not None and not 0 < a.kv_budget <= 1, "--kv-budget must be in (0, 1]"),
        (a.local_ratio is not None and not 0 <= a.local_ratio <= 1, "--local-ratio must be in [0, 1]"),
        (a.frequent_ratio is not None and not 0 <= a.frequent_ratio <= 1, "--frequent-ratio must be in [0, 1]"),
        (DEVICE.fullmatch(a.device) is None, f"--device must be cpu, cuda, cuda:N or auto, not {a.device!r}"),
        (a.kv_budget is not None and a.policy != "auto", "--kv-budget is for --policy auto; a fixed policy "
         "takes --local-ratio / --frequent-ratio"),
        (a.kv_budget is not None and a.threshold is not None, "give --kv-budget (budget profile) or --threshold "
         "(paper profile), not both"),
        (a.kv_budget is not None and a.profile == "paper", "--kv-budget is for --profile budget; the paper's "
         "profile takes --threshold"),
        (a.calibration is not None and not budgeted, "--calibration is for --policy auto with the budget profile"),
        (a.shapes is not None and not budgeted, "--shapes is for --policy auto with the budget profile"),
        (a.compile and a.perplexity is not None, "--compile is for --prompt, --prompt-file, --chat and "
         "--prompts-file"),
        (a.compile and a.device.startswith("cuda"), "--compile runs on the CPU only (not tested on CUDA yet)"),
        (budgeted and a.threshold is not None, "--threshold is for --profile paper; the budget profile takes "
         "--kv-budget"),
        (budgeted and (a.local_ratio is not None or a.frequent_ratio is not None), "--local-ratio and "
         "--frequent-ratio are for fixed policies and --profile paper; the budget profile sets them from "
         "--kv-budget"),
    ]
    bad = [message for failed, message in checks if failed]
    if bad:
        return bad
    from tinygen.cliutil import check_readable, check_writable
    from tinygen.errors import TinygenError
    from tinygen.fastgen.policy import parse_policy

    try:
        parse_policy(a.policy)
        for flag, path in (("--prompt-file", a.prompt_file), ("--perplexity", a.perplexity),
                           ("--prompts-file", a.prompts_file)):
            if path is not None:
                check_readable(path, flag)
        for flag, path in (("--out", a.out), ("--stats-json", a.stats_json)):
            if path is not None:
                check_writable(path, flag)
        sources = [x for x in (a.prompts_file, a.prompt_file, a.perplexity) if x is not None]
        for flag, path in (("--out", a.out), ("--stats-json", a.stats_json)):
            if path is not None and os.path.exists(path) and any(os.path.samefile(path, x) for x in sources):
                raise TinygenError(f"{flag} {path} is the input file: it would be overwritten")
        if a.out is not None and a.stats_json is not None and os.path.abspath(a.out) == os.path.abspath(a.stats_json):
            raise TinygenError("--out and --stats-json name the same file")
    except TinygenError as e:
        return [str(e)]
    return []


def run(a) -> int:
    # A signal while modules import or the weights load takes effect once they are in: an exception raised inside a
    # third-party import can leave that module half-built (seen: numpy.linalg, imported lazily by torch._dynamo).
    with held():
        import torch

        from tinygen.errors import TinygenError
        from tinygen.fastgen.budget import calibration_path, with_calibration
        from tinygen.fastgen.cache import make_caches
        from tinygen.oneshot import run_one_shot
        from tinygen.fastgen.policy import FastGenConfig
        from tinygen.loader import load_model
        from tinygen.perplexity import perplexity
        from tinygen.sampling import SamplingParams
        from tinygen.tokenizer import Tokenizer

        given = {"kv_budget": a.kv_budget, "threshold": a.threshold, "local_ratio": a.local_ratio,
                 "frequent_ratio": a.frequent_ratio, "shapes": a.shapes}
        fastgen = FastGenConfig(a.policy, a.profile, **{k: x for k, x in given.items() if x is not None})
        device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
        # A prompts file decodes up to --batch sequences per step: the CPU weights take the layout batches read
        # fastest.
        batch = a.batch if a.prompts_file or a.serve else 1
        if a.compile and device != "cpu":
            raise TinygenError("--compile runs on the CPU only (not tested on CUDA yet): add --device cpu or leave "
                               "out --compile")
        # --compile: plain float matrices, which the compiler packs itself
        model = load_model(a.model, device=device, dtype=a.dtype, quantize=a.quantize, batch=batch,
                           prepack=not a.compile)
        cfg = model.cfg
        tok = Tokenizer(a.model, cfg.eos_token_ids)
    check_interrupted()  # a signal whose exception was swallowed (inside hasattr(), say)
    calibration = calibration_path(a.model, a.calibration) if fastgen.budgeted else None
    fastgen = with_calibration(fastgen, calibration, cfg.n_layers)  # budgets per layer, if calibrated

    if a.perplexity:
        ids = tok.encode(read_text(a.perplexity))
        # A compressed cache only differs from the full one once it decodes: prefill half of each window, then
        # score the other half token by token while the cache evicts.
        split = None if a.policy == "full" else 0.5
        def window_caches(n):
            check_interrupted()  # between windows
            return make_caches(model, tok, fastgen, n)
        ppl, n = perplexity(model, ids, a.ctx, window_caches, split)
        print(f"perplexity={ppl:.4f} tokens={n}")
        if a.stats_json:
            write_json_atomic(a.stats_json, {"perplexity": ppl, "tokens": n, "ctx": a.ctx, "policy": a.policy,
                                             "profile": a.profile if a.policy == "auto" else None,
                                             "device": device, "dtype": a.dtype, "quantize": a.quantize})
        return 0

    sampling = SamplingParams(a.temperature, a.top_k, a.top_p, a.seed)
    progress = PrefillProgress(cfg.n_layers, force=a.progress)
    if a.serve:
        from tinygen.server import serve

        return serve(a, model, tok, fastgen, sampling)
    if a.prompts_file:
        from tinygen.answers import run_prompts_file

        return run_prompts_file(a, model, tok, fastgen, sampling, progress.show)
    if a.chat:
        from tinygen.chat import ChatSession, run_chat
        from tinygen.graphs import GraphStep, graphs_wanted

        decode = None
        if a.compile:
            from tinygen.compiled import compiled_step

            decode = compiled_step(model, tok, fastgen)[0].decoder
        elif graphs_wanted(a, model):
            decode = GraphStep(model).decoder
        session = ChatSession(model, tok, fastgen, sampling, a.max_new_tokens, a.system, progress, a.ignore_eos,
                              decode)
        return run_chat(session, a.stats_json)

    return run_one_shot(a, model, tok, fastgen, sampling, progress, device, calibration)


def main(argv=None) -> int:
    """Parse and run with one interruption path from the first line on: Ctrl-C or SIGTERM while flags are checked,
    torch is imported or the model loads also exits 130 / 143 without a traceback."""
    return run_main(lambda argv: run(parse_args(argv)), sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    status = main()
    for _sig in (signal.SIGINT, signal.SIGTERM):  # the run is over, its status decided: a late signal changes nothing
        signal.signal(_sig, signal.SIG_IGN)
    sys.exit(status)
