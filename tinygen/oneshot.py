"""`python cli.py --prompt ...` (or --prompt-file): one prompt, its answer streamed to stdout, one stats line.

The prompt goes through the chat template (unless --no-chat), then `generate` (the eager decode step, or the
compiled one with --compile); Ctrl-C or SIGTERM at any point ends the answer with what is known. The stats line and
--stats-json read the caches only after an uninterrupted run: a signal may land inside a step, between two layers.
"""
from __future__ import annotations

import sys

from .cache import cache_figures
from .cliutil import check_interrupted, exit_code, held, read_text, write_json_atomic
from .compiled import compiled_step
from .graphs import GraphStep, graphs_wanted
from .errors import TinygenError
from .fastgen.cache import make_caches, policy_map
from .generate import GenerationStats, decode_step, generate
from .tokenizer import StreamDecoder


def run_one_shot(a, model, tok, fastgen, sampling, progress, device: str, calibration) -> int:
    """The checked flags `a` on a loaded model -> the exit code (0, or 130 / 143 when interrupted)."""
    cfg = model.cfg
    text = a.prompt if a.prompt is not None else read_text(a.prompt_file)
    if not text.strip():
        raise TinygenError(f"{a.prompt_file} holds no prompt (it is empty)")
    ids = tok.encode_prompt(text, a.system, chat=not a.no_chat)
    if len(ids) >= cfg.max_seq_len:
        raise TinygenError(f"the prompt has {len(ids)} tokens; the model's context is {cfg.max_seq_len}")
    max_len = min(cfg.max_seq_len, len(ids) + a.max_new_tokens)
    caches, on_tokens = make_caches(model, tok, fastgen, max_len)
    decode, compile_seconds, compiled = decode_step, 0.0, None
    if a.compile:
        compiled, compile_seconds = compiled_step(model, tok, fastgen)
        decode = compiled.decoder
    elif graphs_wanted(a, model):
        decode = GraphStep(model).decoder
    stats = GenerationStats()
    stream = StreamDecoder(tok)
    code = 0
    try:
        for token_id in generate(model, ids, caches, a.max_new_tokens, sampling, tok.eos_ids, a.ignore_eos, stats,
                                 on_tokens, on_layer=checked(progress.callback(len(ids))), decode=decode):
            sys.stdout.write(stream.push(token_id))
            sys.stdout.flush()
            check_interrupted()
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM, in prefill or decode
        stats.stop_reason, code = "interrupted", exit_code(e)
    with held():  # the answer's end, the stats line and file are written whole
        progress.end_line()
        sys.stdout.write(stream.flush() + "\n")
        sys.stdout.flush()
        report = {
            "prompt_tokens": stats.prompt_tokens,
            "generated_tokens": stats.generated_tokens,
            "prefill_seconds": round(stats.prefill_seconds, 6),
            "decode_tokens_per_second": round(stats.decode_tokens_per_second, 3),
            "policy": a.policy,
            "profile": a.profile if a.policy == "auto" else None,
            "kv_budget": fastgen.kv_budget if fastgen.budgeted else None,
            "shapes": fastgen.shapes if fastgen.budgeted else None,
            "calibration": str(calibration) if fastgen.layer_budgets else None,
            "layer_budgets": list(fastgen.layer_budgets) if fastgen.layer_budgets else None,
            "stop_reason": stats.stop_reason,
            "device": device,
            "dtype": a.dtype,
            "quantize": a.quantize,
            "compiled": compiled is not None and compiled.compiled,  # False where --compile fell back to the eager step
            "compile_seconds": round(compile_seconds, 3),
        }
        line = (f"[prompt {stats.prompt_tokens} tok | generated {stats.generated_tokens} tok | prefill "
                f"{stats.prefill_seconds:.3f} s | decode {report['decode_tokens_per_second']:.1f} tok/s")
        if code:  # an interruption may land inside a step, between two layers: the caches are not read
            print(f"{line} | stop: interrupted]", file=sys.stderr)
        else:
            report.update(cache_report(caches, cfg, model.embed.weight.dtype, on_tokens is not None))
            if on_tokens is not None and a.policy == "auto":
                print(policy_map(caches), file=sys.stderr)
            if stats.stop_reason == "context":
                print(f"[stopped: reached the model's context limit of {cfg.max_seq_len} tokens]", file=sys.stderr)
            print(f"{line} (profiling {report['profile_seconds']:.3f} s) | kept {report['kept_fraction']:.1%} of "
                  f"tokens | KV cache {report['kv_bytes'] / 2**20:.2f} MiB in blocks, "
                  f"{report['kv_bytes_kept'] / 2**20:.2f} MiB kept vs full {report['kv_bytes_full'] / 2**20:.2f} "
                  f"MiB | stop: {stats.stop_reason}]", file=sys.stderr)
        if a.stats_json:
            write_json_atomic(a.stats_json, report)
    return code


def checked(on_layer):
    """A prefill's per-layer callback that also looks for a signal whose exception was swallowed."""
    def each(i):
        check_interrupted()
        if on_layer:
            on_layer(i)
    return each


def cache_report(caches, cfg, kv_dtype, fastgen: bool) -> dict:
    """What a finished generation's caches hold (cache_figures), and with FastGen its profiling time and policies."""
    report = {**cache_figures(caches, cfg, kv_dtype), "profile_seconds": 0.0}
    if fastgen:
        report["profile_seconds"] = round(sum(c.profile_seconds for c in caches), 6)
        report["policies"] = [c.head_names() for c in caches]
    return report
