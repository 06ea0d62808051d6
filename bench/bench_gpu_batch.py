"""Batches on a GPU: decode throughput and peak KV bytes of full and auto at 4k and 16k prompts, batch up to 64,
and what a KV byte cap admits (the GPU version of bench/bench_batch.py's table).

    python bench/bench_gpu_batch.py                       # 1B shape -> bench/results/gpu_batch_<gpu name>.md
    python bench/bench_gpu_batch.py --smoke --device cpu  # tiny shape, short prompts: seconds (a check, not a result)

Method (also written beside the results):
- Model: random weights (seeded) of the Llama-3.2-1B shape, built by bench_gpu.build (HF LlamaForCausalLM copied
  into tinygen; the HF copy is then freed). No checkpoint, no tokenizer: prompts are random token ids (3 and up), and
  the runner gets a stand-in tokenizer with no EOS ids (EOS is ignored anyway), ids 0-2 special and every 23rd id
  punctuation (bench_gpu's convention; the budget profile protects no kinds, so they do not matter for `auto`).
- Each row runs B prompts of L tokens through `BatchRunner` (on CUDA its step replayed as CUDA graphs, the default:
  the first step of each batch size records its graph inside the timed decode) with batch B and no cap: each prompt is prefilled alone
  (auto: profiling and the budget planner included), then all B decode together, --new-tokens forced steps each,
  greedy. Decode tok/s = tokens out of decode steps, all sequences, over the decode steps' wall time (each step ends
  in the host reading the sampled ids, so the GPU has finished it). Prefill s: all B prefills together.
  Methods: `full` (FullRows, the full cache's rows in the paged pool: SDPA prefill, the Triton paged decode kernel)
  and `auto` (FastGenConfig(): budget profile, keeps 0.7 of every KV head's tokens); every row of every sequence
  attends in one kernel call per layer.
- Peak KV: the runner's peak of the pool's blocks in use (a prefill's whole prompt included); "full would hold": full
  caches of the running sequences' lengths at their most. Peak GPU memory:
  torch.cuda.max_memory_allocated during the run, above what was allocated before it (the weights).
- Under a cap: --kv-budget-mb set to what N full caches of L + new tokens need (the runner's projection: the blocks
  of the final length plus the new token's slot), P prompts where P is how many auto's projection admits at once
  (one of them prefilling); batch P. Both
  methods run the same P prompts; full runs them in waves. Decode tok/s over the whole run, waves included.
- A warm-up run of each method (2 prompts of the plan's shortest length, 4 new tokens) precedes the rows: Triton
  compiles, cuBLAS picks its kernels. Each row is run --repeats times (median decode tok/s); rows run in --plan
  order. Before each run its KV bytes are projected (projected_bytes) and a run that would not fit in the GPU's free
  memory is skipped; so is a run whose time, estimated from the same length's earlier rows, would pass --max-seconds;
  a run still going at the limit is cut off. Skips are listed under the tables.
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_gpu import SHAPES, SMOKE_SHAPES, build  # noqa: E402
from bench.common import machine_lines, write_atomic  # noqa: E402
from tinygen.batch import BatchRunner  # noqa: E402
from tinygen.projection import projected_bytes  # noqa: E402
from tinygen.fastgen.policy import FastGenConfig  # noqa: E402
from tinygen.loader import DTYPES  # noqa: E402
from tinygen.sampling import SamplingParams  # noqa: E402

METHODS = {"full": FastGenConfig(policy="full"), "auto": FastGenConfig()}
SHAPE = "Llama-3.2-1B shape"
PLAN = "4096x1,16384x1,16384x16,4096x16,cap4096x16,4096x64"  # cheap rows first: they time the bigger ones
SMOKE_PLAN = "64x1,128x1,128x4,64x4,cap64x4"
MiB = 2**20


def mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / MiB:.0f}" if b >= 10 * MiB else f"{b / MiB:.2f}"


def gb(b: float) -> str:
    return f"{b / 1e9:.1f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"


class RandomTokens:
    """The tokenizer a BatchRunner and FastGen's vocab_kinds read, for random token ids."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eos_ids = frozenset()
        self.special_ids = frozenset(range(3))

    def token_text(self, i: int) -> str:
        return "," if i % 23 == 0 else "a"


class OutOfTime(Exception):
    pass


class TimedRunner(BatchRunner):
    """A BatchRunner that stops once `deadline` (perf_counter) passes: before each prefill and after each step."""

    def __init__(self, *args, deadline: float, **kwargs):
        super().__init__(*args, on_progress=self._check, **kwargs)
        self.deadline = deadline

    def _check(self, *_):
        if time.perf_counter() > self.deadline:
            raise OutOfTime

    def _start(self, seq, *args):
        self._check()
        super()._start(seq, *args)


def kv_need(model, cfg: FastGenConfig, L: int, new: int, running: int) -> int:
    """Bytes a run may hold at most: `running` sequences' caches, one of them while it prefills, and a prefill's
    activations (hidden states and the MLP's fused gate|up rows of the prompt, plus 256 MiB for attention blocks)."""
    steady, prefill = projected_bytes(model, cfg, L, new)
    c = model.cfg
    activations = L * (2 * c.ffn_dim + 6 * c.dim) * model.embed.weight.dtype.itemsize + 256 * MiB
    return running * steady + (prefill - steady) + activations


def run_once(model, tok, cfg, prompts, batch, new, cap, deadline, device) -> dict:
    cuda = torch.device(device).type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    kept = []
    runner = TimedRunner(model, tok, cfg, SamplingParams(), new, batch, cap, ignore_eos=True, deadline=deadline,
                         cuda_graphs=torch.device(device).type == "cuda")
    s = runner.run(list(enumerate(prompts)), lambda seq: kept.append(seq.kept_fraction))
    return dict(decode_tps=s.decode_tokens_per_second, decode_s=s.decode_seconds, decode_tokens=s.decode_tokens,
                prefill_s=s.prefill_seconds, seconds=s.seconds, running=s.max_running, peak_kv=s.peak_kv_bytes,
                peak_kv_full=s.peak_kv_bytes_full, kept=statistics.mean(kept),
                peak_mem=(torch.cuda.max_memory_allocated() - base) if cuda else None)


def estimate_seconds(done: list[dict], L: int, method: str, n_prompts: int, new: int) -> float | None:
    """Time of a run from earlier runs at this length and method: per-prompt prefill plus per-token decode time,
    both scaled by the prompts (decode time per token falls with the batch, so this errs long)."""
    same = [r for r in done if r["length"] == L and r["method"] == method]
    if not same:
        return None
    r = max(same, key=lambda r: r["prompts"])
    return n_prompts * (r["prefill_s"] / r["prompts"] + new * r["decode_s"] / max(1, r["decode_tokens"]))


def plan_item(model, item: str, new: int) -> tuple[int, int, int | None, int]:
    """'LxB' -> (L, B, None, B prompts); 'capLxN' -> (L, N, cap = what N full caches need, prompts = as many as
    auto's projection admits at once under the cap, the last one while it prefills). Every run has batch = prompts."""
    cap_run = item.startswith("cap")
    L, n = (int(x) for x in item.removeprefix("cap").split("x"))
    if not cap_run:
        return L, n, None, n
    cap = n * projected_bytes(model, METHODS["full"], L, new)[0]
    steady, prefill = projected_bytes(model, METHODS["auto"], L, new)
    return L, n, cap, max(n, (cap - prefill) // steady + 1)


def markdown(rows: list[dict], capped: list[dict], header: list[str], notes: list[str], device: str) -> str:
    rate = {(r["length"], r["batch"], r["method"]): r["decode_tps"] for r in rows}
    where = "the GPU" if device.startswith("cuda") else f"{device} (a smoke run of the GPU benchmark, not a result)"
    lines = [f"# Batches on {where}: decode throughput and KV bytes, full vs auto (random weights)", "",
             *[f"- {h}" for h in header], "",
             "| prompt tokens | batch | method | decode tok/s (all sequences) | auto / full | ms per step | "
             "prefill s (all) | kept | peak KV MiB | full would hold MiB | peak GPU MiB above weights |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (r["length"], r["batch"], r["method"] != "full")):
        full = rate.get((r["length"], r["batch"], "full"))
        ratio = f"{r['decode_tps'] / full:.2f}x" if r["method"] == "auto" and full else ""
        step_ms = 1000 * r["batch"] / r["decode_tps"]  # every step runs all B sequences (no cap: they join first)
        lines.append(f"| {r['length']} | {r['batch']} | {r['method']} | {r['decode_tps']:.1f} | {ratio} | "
                     f"{step_ms:.1f} | {r['prefill_s']:.3f} | {r['kept']:.3f} | {mib(r['peak_kv'])} | "
                     f"{mib(r['peak_kv_full'])} | {mib(r['peak_mem'])} |")
    goal = [rate.get((16384, 16, m)) for m in METHODS]
    if all(goal):
        lines += ["", f"Issue 10's GPU goal, auto >= 1.2x full at batch 16 with 16k prompts: "
                      f"{goal[1] / goal[0]:.2f}x here ({'met' if goal[1] >= 1.2 * goal[0] else 'not met'})."]
    if capped:
        c = capped[0]
        lines += ["", f"Under a cap of {mib(c['cap'])} MiB (what {c['cap_full']} full caches of "
                      f"{c['length']} + new tokens need), {c['prompts']} prompts of {c['length']} tokens, batch "
                      f"{c['prompts']}:", "",
                  "| method | sequences at once | decode tok/s | prefill s (all) | peak KV MiB | "
                  "peak GPU MiB above weights |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in capped:
            lines.append(f"| {r['method']} | {r['running']} | {r['decode_tps']:.1f} | {r['prefill_s']:.3f} | "
                         f"{mib(r['peak_kv'])} | {mib(r['peak_mem'])} |")
    lines += ["", *(notes or ["- nothing skipped"]), "",
              __doc__.split("Method (also written beside the results):\n", 1)[1].strip(), ""]
    return "\n".join(lines)


def main():
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    ap.add_argument("--plan", default=None, help=f"runs in order: LxB (B prompts of L tokens at batch B) or capLxN "
                                                 f"(cap = N full caches); default {PLAN}")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per row (median decode tok/s)")
    ap.add_argument("--max-seconds", type=float, default=115, help="from the start; what is left is skipped (noted)")
    ap.add_argument("--memory-gb", type=float, default=None,
                    help="memory a run may take beyond the weights (default: 90%% of the GPU's free memory; CPU: none)")
    ap.add_argument("--smoke", action="store_true", help=f"tiny shape, plan {SMOKE_PLAN}, 8 new tokens")
    ap.add_argument("--out", default=None, help="markdown file (default bench/results/gpu_batch_<gpu name>.md; "
                                                "with --smoke /tmp/gpu_batch_smoke.md); JSON beside it")
    a = ap.parse_args()
    deadline = t_start + a.max_seconds
    device, dtype = a.device, DTYPES[a.dtype]
    cuda = torch.device(device).type == "cuda"
    shape_name, shape = ("tiny GQA", SMOKE_SHAPES["tiny GQA"]) if a.smoke else (SHAPE, SHAPES[SHAPE])
    plan = (a.plan or (SMOKE_PLAN if a.smoke else PLAN)).split(",")
    new = 8 if a.smoke else a.new_tokens
    gpu = torch.cuda.get_device_name(torch.device(device)) if cuda else "cpu"
    out = Path(a.out) if a.out else (Path("/tmp") / "gpu_batch_smoke.md" if a.smoke else
                                     ROOT / "bench" / "results" / f"gpu_batch_{re.sub(r'[^A-Za-z0-9]+', '_', gpu)}.md")

    hf, model = build(shape, device, dtype)
    del hf  # the HF copy only carried the weights in
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    limit = a.memory_gb * 1e9 if a.memory_gb is not None else (0.9 * torch.cuda.mem_get_info()[0] if cuda else None)
    tok = RandomTokens(shape["vocab_size"])
    header = machine_lines() + [
        f"device {device} ({gpu}), {shape_name}, {a.dtype}, random weights, greedy, EOS ignored, {new} new tokens "
        f"per sequence; {a.repeats} timed run(s) per row (median) after one warm-up run per method",
        f"memory a run may take beyond the weights: {'no check' if limit is None else gb(limit)}; "
        f"time limit --max-seconds {a.max_seconds:g} from the start (build {time.perf_counter() - t_start:.1f} s)"]
    print("\n".join(header), flush=True)
    gen = torch.Generator().manual_seed(0)
    prompts = lambda n, L: [torch.randint(3, shape["vocab_size"], (L,), generator=gen).tolist() for _ in range(n)]

    # Warm-up at the plan's shortest length: kernels see sizes like the rows' (Triton specialises some on them).
    warm = prompts(2, min(int(item.removeprefix("cap").split("x")[0]) for item in plan))
    for cfg in METHODS.values():
        run_once(model, tok, cfg, warm, 2, 4, None, float("inf"), device)
    print(f"warm-up done at {time.perf_counter() - t_start:.1f} s", flush=True)

    rows, capped, notes = [], [], []

    def save():
        write_atomic(out, markdown(rows, capped, header, notes, device))
        write_atomic(out.with_suffix(".json"), json.dumps(dict(header=header, notes=notes, rows=rows, capped=capped),
                                                          indent=1))

    for item in plan:
        L, n, cap, n_prompts = plan_item(model, item, new)
        ids = prompts(n_prompts, L)
        what = f"cap {mib(cap)} MiB ({n} full caches), {n_prompts} prompts of {L}" if cap else f"{L}x{n}"
        for name, cfg in METHODS.items():
            running = n_prompts if cap is None else min(n_prompts, cap // projected_bytes(model, cfg, L, new)[0])
            need = kv_need(model, cfg, L, new, max(1, running))
            left = deadline - time.perf_counter()
            est = estimate_seconds(rows + capped, L, name, n_prompts, new)
            if limit is not None and need > limit:
                notes.append(f"- {what}, {name}: skipped, needs about {gb(need)}, {gb(limit)} allowed (--memory-gb)")
                continue
            if left <= 0 or (est is not None and a.repeats * est > left):
                guess = f"estimated {a.repeats * est:.1f} s, " if est is not None else ""
                notes.append(f"- {what}, {name}: skipped, time limit --max-seconds {a.max_seconds:g} ({guess}"
                             f"{max(0, left):.0f} s left)")
                continue
            runs = []
            try:
                for _ in range(a.repeats):
                    runs.append(run_once(model, tok, cfg, ids, n_prompts, new, cap, deadline, device))
            except OutOfTime:
                done = f"; {len(runs)} of {a.repeats} runs done" if runs else ""
                notes.append(f"- {what}, {name}: cut off at the time limit (--max-seconds {a.max_seconds:g}){done}")
            except torch.OutOfMemoryError:
                notes.append(f"- {what}, {name}: out of GPU memory (projected {gb(need)})")
            if not runs:
                continue
            r = dict(runs[-1], decode_tps=statistics.median(x["decode_tps"] for x in runs), method=name, length=L,
                     batch=n_prompts, prompts=n_prompts, runs=len(runs))
            if cap:
                capped.append(dict(r, cap=cap, cap_full=n))
            else:
                rows.append(r)
            save()  # after every run: a run cut short keeps what it measured
            print(f"{what} {name}: decode {r['decode_tps']:.1f} tok/s, {r['running']} at once, prefill "
                  f"{r['prefill_s']:.2f} s, kept {r['kept']:.3f}, peak KV {mib(r['peak_kv'])} MiB "
                  f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
    save()
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
