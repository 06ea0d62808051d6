"""tinygen on a GPU at long contexts: full cache, FastGen with a forced policy map, local+frequent, and HF transformers.

    python bench/bench_gpu.py                          # both shapes, 4k/16k/32k prompts -> bench/results/gpu_<gpu>.md
    python bench/bench_gpu.py --smoke --device cpu     # tiny shapes, end to end on the CPU (a check, not a result)
    python bench/bench_gpu.py --profile 8 ...          # also: kernels, ops and GPU-busy time of 8 decode steps per row

Method (also written beside the results):
- Models: random weights (seeded) of the Llama-3.2-1B shape (GQA 32/8 heads, head_dim 64, tied embeddings, llama3
  rope scaling) and the Llama-2-7B shape (32/32 heads, head_dim 128; context raised to fit 32k), built once as HF
  `LlamaForCausalLM` on the device and copied tensor by tensor into tinygen (the loader's name map): both engines
  hold the same weights. No checkpoint files and no network are needed.
- Prompts: L random token ids; greedy, batch 1, --new-tokens forced decode steps; each step reads the sampled token
  on the host (the one sync per step, as `generate` does), for HF too (a plain forward loop over its DynamicCache).
- Methods: `full` (FullRows, the full cache's rows in the paged pool: SDPA prefill, the Triton paged decode
  kernel where triton is installed); `auto (forced
  map)`: FastGen with its paper profile run on the prompt (so profiling is timed), then the per-KV-head policy map
  replaced by a fixed pattern (random weights give near-uniform attention, which would send every head to `full`);
  `local+frequent` for every head; `HF` transformers (SDPA attention). Token kinds: ids 0-2 special, every 23rd id
  punctuation (no tokenizer here).
- Each method runs once per length after a short warm-up of every method per shape (Triton compiles then), decode
  tok/s = new tokens / the decode loop's wall time; KV bytes: the pool blocks the caches' rows hold after decode;
  peak memory: torch.cuda.max_memory_allocated during prefill + decode, above what was allocated before (weights of
  both engines stay resident and are not counted).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine_lines, write_atomic  # noqa: E402
from tinygen.cache import full_kv_bytes, kept_fraction  # noqa: E402
from tinygen.config import ModelConfig  # noqa: E402
from tinygen.fastgen.cache import FastGenCache, fastgen_caches  # noqa: E402
from tinygen.fastgen.kinds import TokenKinds  # noqa: E402
from tinygen.fastgen.policy import (FREQUENT, FULL, LOCAL, PUNCT, SPECIAL, FastGenConfig, policy_letter,  # noqa: E402
                                    policy_name)
from tinygen.generate import decode_step, full_caches, prefill  # noqa: E402
from tinygen.checkpoint import checkpoint_sources  # noqa: E402
from tinygen.loader import DTYPES  # noqa: E402
from tinygen.model import Llama  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {
    "Llama-3.2-1B shape": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                               head_dim=64, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                               rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, max_position_embeddings=131072),
    "Llama-2-7B shape": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                             head_dim=128, intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False,
                             rope_theta=10000.0, max_position_embeddings=33024),
}
SMOKE_SHAPES = {
    "tiny GQA": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                     intermediate_size=256, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=1024),
    "tiny MHA": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                     intermediate_size=256, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=1024),
}
SPF = SPECIAL | PUNCT | FREQUENT
# The forced map, cycled over each layer's KV heads: about what `auto` picks on SmolLM2 at T = 0.98 (several
# policies per layer, roughly a third of the heads full), so every decode step runs four stores per layer.
FORCED = (FULL, SPF | LOCAL, SPF, FULL, SPF | LOCAL, LOCAL | FREQUENT, SPF | LOCAL, SPECIAL | PUNCT)
# "+graphs": the decode step replayed as CUDA graphs (tinygen/graphs.py; the first step, which records the graph, is
# not timed); "auto 0.70": the default budget profile
METHODS = ("full", "full+graphs", "auto 0.70+graphs", "auto (forced map)", "local+frequent", "HF")


def build(shape: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """(HF LlamaForCausalLM, tinygen Llama) with the same random weights, both on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated")  # newer transformers: `cache`
    torch.manual_seed(seed)
    hf_cfg = LlamaConfig(rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa", **shape)
    with torch.device(device):
        hf = LlamaForCausalLM(hf_cfg).to(dtype).eval()
    cfg = ModelConfig.from_hf({**hf_cfg.to_dict(), "architectures": ["LlamaForCausalLM"]})
    with torch.device("meta"):
        model = Llama(cfg).to(dtype)
    model.to_empty(device=device)
    params, hf_params = dict(model.named_parameters()), dict(hf.named_parameters())
    hf_params.setdefault("lm_head.weight", hf.lm_head.weight)
    with torch.no_grad():
        for name, sources in checkpoint_sources(cfg).items():
            params[name].copy_(torch.cat([hf_params[src] for src, _ in sources]))
    model.init_rope()
    return hf, model.eval()


def synthetic_kinds(vocab_size: int) -> list[int]:
    return [SPECIAL if i < 3 else PUNCT if i % 23 == 0 else 0 for i in range(vocab_size)]


def forced_caches(model, kinds: TokenKinds, max_len: int):
    """FastGen caches that profile like `auto` (paper profile) but keep the FORCED policy map."""
    paper = {"profile": "paper"} if "profile" in {f.name for f in dataclasses.fields(FastGenConfig)} else {}
    caches = fastgen_caches(model, kinds, FastGenConfig(policy="auto", threshold=0.98, **paper), max_len)
    assert hasattr(FastGenCache, "_build"), "this FastGenCache has no _build(head_cfgs, ...) to force a map through"
    forced = [FORCED[h % len(FORCED)] for h in range(model.cfg.n_kv_heads)]
    for c in caches:  # after profiling, the cache builds one store per policy: hand it the forced map instead
        c._build = lambda head_cfgs, *rest, c=c: FastGenCache._build(c, [(p, c.cfg) for p in forced], *rest)
    return caches


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def kv_bytes_of(past) -> int:
    layers = getattr(past, "layers", None)
    tensors = ([t for l in layers for t in (l.keys, l.values)] if layers is not None
               else [*past.key_cache, *past.value_cache])
    return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)


@torch.inference_mode()
def run_method(method: str, hf, model, ids: list[int], n_new: int, device: str, profile_steps: int = 0) -> dict:
    cuda = torch.device(device).type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    max_len = len(ids) + n_new + profile_steps + 1
    prompt = torch.tensor(ids, device=device)
    feed, caches, fn = None, None, None
    if method.endswith("+graphs"):
        from tinygen.graphs import GraphStep

        fn = GraphStep(model)
    sync(device)
    t0 = time.perf_counter()
    if method == "HF":
        out = hf(prompt[None], use_cache=True, logits_to_keep=1)
        past, token = out.past_key_values, out.logits[0, -1].argmax(-1, keepdim=True)
    else:
        if method.startswith("full"):
            caches = full_caches(model, max_len)
        elif method.startswith("auto 0.70"):
            kinds = TokenKinds(synthetic_kinds(model.cfg.vocab_size), max_len, torch.device(device))
            caches = fastgen_caches(model, kinds, FastGenConfig(kv_budget=0.7), max_len)
            feed = kinds.append
            feed(ids)
        else:
            kinds = TokenKinds(synthetic_kinds(model.cfg.vocab_size), max_len, torch.device(device))
            caches = (forced_caches(model, kinds, max_len) if method.startswith("auto") else
                      fastgen_caches(model, kinds, FastGenConfig(policy="local+frequent"), max_len))
            feed = kinds.append
            feed(ids)
        token = prefill(model, ids, caches).argmax(-1, keepdim=True)
    int(token)
    prefill_s = time.perf_counter() - t0
    def step(i):
        nonlocal past, token
        if feed:
            feed([int(token)])
        if method == "HF":
            out = hf(token[None], past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax(-1, keepdim=True)
        else:
            token = decode_step(model, token, caches, len(ids) + i, fn).argmax(-1, keepdim=True)
        int(token)  # the step's host sync

    past = past if method == "HF" else None
    first = 0
    if fn is not None:  # the step that records the graph, untimed
        step(0)
        first = 1
    t0 = time.perf_counter()
    for i in range(first, n_new):
        step(i)
    decode_s = time.perf_counter() - t0
    step_profile = profile_decode(lambda j: step(n_new + j), profile_steps, cuda) if profile_steps else None
    c = model.cfg
    length = len(ids) + n_new
    r = dict(method=method, prompt_tokens=len(ids), new_tokens=n_new, prefill_s=prefill_s, decode_tps=(n_new - first) / decode_s,
             kv_full=full_kv_bytes(c.n_layers, c.n_kv_heads, c.head_dim, length, model.embed.weight.dtype),
             peak_bytes=(torch.cuda.max_memory_allocated() - base) if cuda else None)
    if method == "HF":
        r.update(kv_bytes=kv_bytes_of(past), kept=1.0, profile_s=0.0)
    else:
        r.update(kv_bytes=sum(x.nbytes() for x in caches), kept=kept_fraction(caches),
                 profile_s=sum(getattr(x, "profile_seconds", 0.0) for x in caches))
    if method.startswith("auto"):
        r["policies"] = "".join(policy_letter(p) for p in caches[0].policies)
    if step_profile:
        r["step_profile"] = step_profile
    return r


def profile_decode(step, n: int, cuda: bool, top: int = 6) -> dict:
    """Where `n` decode steps' time goes (torch profiler): op calls and kernel launches per step, and the time the
    GPU spent in kernels against the step's wall time (the rest is the host issuing ops: a launch-bound step)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for j in range(n):
            step(j)
        wall = time.perf_counter() - t0
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    ops = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us()
    busy = sum(by_name.values())
    return {"steps": n, "wall_ms": wall / n * 1e3, "aten_ops": len(ops) / n, "kernels": len(kernels) / n,
            "gpu_busy_ms": busy / n / 1e3,
            "top_kernels": [(k[:70], us / n / 1e3) for k, us in sorted(by_name.items(), key=lambda x: -x[1])[:top]]}


def profile_markdown(results: list[dict]) -> list[str]:
    rows = [r for r in results if "step_profile" in r]
    if not rows:
        return []
    lines = ["## Where a decode step's time goes (torch profiler over a few steps after the timed ones)", "",
             "Wall time per step is with the profiler on (it adds host time). GPU busy: the summed time of the "
             "step's kernels; the rest of the wall time the GPU waits for the host to issue work. Aten ops count nested "
             "ones too (a linear and the matmul it calls).", "",
             "| shape | prompt tokens | method | wall ms per step | GPU busy ms | busy share | aten ops per step | "
             "kernels per step | top kernels (ms per step) |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        p = r["step_profile"]
        top = "; ".join(f"`{k}` {ms:.2f}" for k, ms in p["top_kernels"])
        lines.append(f"| {r['shape']} | {r['prompt_tokens']} | {r['method']} | {p['wall_ms']:.2f} | "
                     f"{p['gpu_busy_ms']:.2f} | {p['gpu_busy_ms'] / p['wall_ms']:.0%} | {p['aten_ops']:.0f} | "
                     f"{p['kernels']:.0f} | {top} |")
    return [*lines, ""]


def markdown(results: list[dict], header: list[str], notes: list[str]) -> str:
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.0f}"
    rows = []
    for r in results:
        ref = {x["method"]: x for x in results if x["shape"] == r["shape"] and x["prompt_tokens"] == r["prompt_tokens"]}
        ratio = lambda m: f"{r['decode_tps'] / ref[m]['decode_tps']:.2f}x" if m in ref else "n/a"
        rows.append(f"| {r['shape']} | {r['prompt_tokens']} | {r['method']} | {r['decode_tps']:.1f} | {ratio('full')} | "
                    f"{ratio('HF')} | {r['prefill_s']:.2f} | {r['profile_s']:.2f} | {r['kept']:.3f} | "
                    f"{mib(r['kv_bytes'])} | {r['kv_bytes'] / r['kv_full']:.3f} | {mib(r['peak_bytes'])} |")
    return "\n".join([
        "# tinygen on the GPU: full cache, FastGen, HF transformers (random weights, batch 1, greedy)", "",
        *[f"- {h}" for h in header], "",
        "| shape | prompt tokens | method | decode tok/s | vs full | vs HF | prefill s | profiling s | kept | "
        "KV MiB (physical) | KV vs full | peak MiB above weights |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *rows, "",
        *notes, "", *profile_markdown(results), __doc__.split("Method (also written beside the results):\n", 1)[1].strip(),
        ""])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    ap.add_argument("--lengths", default="4096,16384,32768")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES")
    ap.add_argument("--max-seconds", type=float, default=330, help="skip what is left after this long (noted)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also profile STEPS decode steps of each row after its timed ones (default 0: none)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, prompts of 48 and 96 tokens, 8 new tokens")
    ap.add_argument("--out", default=None, help="markdown file (default bench/results/gpu_<gpu name>.md; with "
                                                 "--smoke a file in /tmp); raw JSON beside it")
    a = ap.parse_args()
    shapes = SMOKE_SHAPES if a.smoke else {n: SHAPES[n] for n in a.shapes.split(",")}
    lengths = [48, 96] if a.smoke else [int(x) for x in a.lengths.split(",")]
    n_new = 8 if a.smoke else a.new_tokens
    dtype = DTYPES[a.dtype]
    gpu = torch.cuda.get_device_name(torch.device(a.device)) if torch.device(a.device).type == "cuda" else "cpu"
    out = Path(a.out) if a.out else (Path("/tmp") / "gpu_smoke.md" if a.smoke else
                                     ROOT / "bench" / "results" / f"gpu_{re.sub(r'[^A-Za-z0-9]+', '_', gpu)}.md")
    header = machine_lines() + [f"device {a.device} ({gpu}), {a.dtype}, batch 1, greedy, {n_new} new tokens"]
    print("\n".join(header), flush=True)
    start, results, notes = time.perf_counter(), [], []
    gen = torch.Generator().manual_seed(0)
    for shape_name, shape in shapes.items():
        if time.perf_counter() - start > a.max_seconds:
            notes.append(f"- {shape_name}: skipped (time limit --max-seconds {a.max_seconds:g} reached)")
            continue
        t0 = time.perf_counter()
        hf, model = build(shape, a.device, dtype)
        print(f"{shape_name}: built in {time.perf_counter() - t0:.1f} s", flush=True)
        warm = torch.randint(3, shape["vocab_size"], (64,), generator=gen).tolist()
        for method in METHODS:  # warm-up: Triton compiles, cuBLAS picks its kernels
            try:
                run_method(method, hf, model, warm, 4, a.device)
            except AssertionError:
                pass  # noted when the method runs
        for L in lengths:
            if time.perf_counter() - start > a.max_seconds:
                notes.append(f"- {shape_name}, {L} tokens: skipped (time limit --max-seconds {a.max_seconds:g})")
                continue
            ids = torch.randint(3, shape["vocab_size"], (L,), generator=gen).tolist()
            for method in METHODS:
                try:
                    r = run_method(method, hf, model, ids, n_new, a.device, a.profile)
                except torch.OutOfMemoryError:
                    notes.append(f"- {shape_name}, {L} tokens, {method}: out of GPU memory")
                    continue
                except AssertionError as e:  # e.g. a FastGen version the forced map cannot hook into
                    notes.append(f"- {shape_name}, {L} tokens, {method}: not run ({e})")
                    continue
                results.append({"shape": shape_name, **r})
                save(out, results, header, notes)  # after every row: a run cut short keeps what it measured
                print(f"{shape_name} L={L} {method}: decode {r['decode_tps']:.1f} tok/s, prefill {r['prefill_s']:.2f}"
                      f" s, profile {r['profile_s']:.2f} s, kept {r['kept']:.3f}, KV {r['kv_bytes'] / 2**20:.0f} MiB"
                      + (f", map {r['policies']}" if "policies" in r else ""), flush=True)
        del hf, model
    save(out, results, header, notes)
    print(f"wrote {out} and {out.with_suffix('.json')}")


def save(out: Path, results: list[dict], header: list[str], notes: list[str]):
    forced = ", ".join(policy_name(p) for p in FORCED)
    notes = [*notes, f"- forced map, cycled over each layer's KV heads: {forced}"]
    write_atomic(out, markdown(results, header, notes))
    write_atomic(out.with_suffix(".json"), json.dumps({"header": header, "notes": notes, "results": results}, indent=1))


if __name__ == "__main__":
    main()
