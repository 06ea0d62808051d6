"""The full cache's decode step on a GPU: eager (`decode_step`, op by op), compiled (`compiled.CompiledStep`,
Inductor) and compiled as a CUDA graph (torch.compile mode="reduce-overhead"), side by side on one random-weight model.

    python bench/bench_gpu_compile.py               # Llama-3.2-1B shape, 4k -> bench/results/gpu_compile_<gpu>.md
    python bench/bench_gpu_compile.py --smoke --device cpu   # tiny shape, eager and compiled (a check, not a result)

Method: the model of bench_gpu.build (HF LlamaForCausalLM's random weights copied into tinygen, bfloat16); one
prompt of --length random ids, prefilled eagerly into fresh full caches for each row, whose pool has room for their
final length from the start (no growth while timed, so a captured graph keeps its addresses); --warm steps first
(compiling, recording the graph), timed separately; then --steps greedy steps, each reading the sampled id on the
host, as generate does. Decode tok/s = steps / their wall time. Logit difference: the first step's logits against
the eager row's, max |difference|.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_gpu import SHAPES, SMOKE_SHAPES, build, sync  # noqa: E402
from bench.common import machine_lines, write_atomic  # noqa: E402
from tinygen.compiled import CompiledStep  # noqa: E402
from tinygen.generate import decode_step, full_caches, prefill  # noqa: E402
from tinygen.loader import DTYPES  # noqa: E402


@torch.inference_mode()
def run_row(name: str, model, ids: list[int], warm: int, steps: int, device: str) -> dict:
    decode, step = decode_step, None
    if name != "eager":
        step = CompiledStep(model, mode="reduce-overhead" if "graph" in name else None)
        decode = step.decoder
    caches = full_caches(model, len(ids) + warm + steps + 1)
    token = prefill(model, ids, caches).argmax(-1, keepdim=True)
    for c in caches:  # every block the run needs, up front: no table changes between steps
        c.pool.reserve(c.rows(), c.pool.max_len)
    pos, first = len(ids), None
    sync(device)
    t0 = time.perf_counter()
    for i in range(warm + steps):
        if i == warm:
            sync(device)
            warm_s, t0 = time.perf_counter() - t0, time.perf_counter()
        logits = decode(model, token, caches, pos)
        if first is None:
            first = logits.float().clone()
        token = logits.argmax(-1, keepdim=True)
        int(token)  # the step's host sync
        pos += 1
    decode_s = time.perf_counter() - t0
    return dict(method=name, warm_s=warm_s, decode_tps=steps / decode_s, ms_per_step=decode_s / steps * 1e3,
                compiled=getattr(step, "compiled", None), first_logits=first)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="Llama-3.2-1B shape", choices=tuple(SHAPES))
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, 48-token prompt, 8 steps")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    shape = SMOKE_SHAPES["tiny GQA"] if a.smoke else SHAPES[a.shape]
    length, steps = (48, 8) if a.smoke else (a.length, a.steps)
    cuda = torch.device(a.device).type == "cuda"
    gpu = torch.cuda.get_device_name(torch.device(a.device)) if cuda else "cpu"
    name = f"gpu_compile_{re.sub(r'[^A-Za-z0-9]+', '_', gpu)}.md"
    out = Path(a.out) if a.out else Path("/tmp/gpu_compile_smoke.md") if a.smoke else ROOT / "bench" / "results" / name
    header = machine_lines() + [f"device {a.device} ({gpu}), bfloat16, batch 1, {'tiny GQA' if a.smoke else a.shape}, "
                                f"{length}-token prompt, {a.warm} warm-up + {steps} timed steps, full cache"]
    print("\n".join(header), flush=True)
    hf, model = build(shape, a.device, DTYPES["bfloat16"])
    del hf
    ids = torch.randint(3, shape["vocab_size"], (length,), generator=torch.Generator().manual_seed(0)).tolist()
    rows, notes = [], []
    for name in ["eager", "compiled"] + (["compiled + CUDA graph"] if cuda else []):
        try:
            r = run_row(name, model, ids, a.warm, steps, a.device)
        except Exception as e:  # a failure is a result here: noted, and the other rows still run
            first_line = (str(e).strip().splitlines() or [""])[0][:300]
            notes.append(f"- {name}: failed ({type(e).__name__}: {first_line})")
            print(notes[-1], flush=True)
            continue
        eager = rows[0] if rows and rows[0]["method"] == "eager" else None
        r["logit_diff"] = (r["first_logits"] - eager["first_logits"]).abs().max().item() if eager else float("nan")
        rows.append(r)
        print(f"{name}: {r['decode_tps']:.1f} tok/s, {r['ms_per_step']:.2f} ms/step, warm-up {r['warm_s']:.1f} s, "
              f"logit diff {r['logit_diff']:.4f}, compiled {r['compiled']}", flush=True)
    lines = ["# The full cache's decode step: eager, compiled, compiled as a CUDA graph", "",
             *[f"- {h}" for h in header], "", "| method | decode tok/s | ms per step | vs eager | warm-up s (compile, "
             "record) | first-step logits: max abs diff to eager | compiled |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    base = rows[0]["decode_tps"] if rows and rows[0]["method"] == "eager" else float("nan")
    for r in rows:
        lines.append(f"| {r['method']} | {r['decode_tps']:.1f} | {r['ms_per_step']:.2f} | "
                     f"{r['decode_tps'] / base:.2f}x | {r['warm_s']:.1f} | {r['logit_diff']:.4f} | {r['compiled']} |")
    lines += ["", *notes, "", __doc__.split("Method: ", 1)[1].strip(), ""]
    write_atomic(out, "\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
