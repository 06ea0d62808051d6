"""bench/bench_gpu_batch.py --smoke end to end on the CPU: every planned row, for full and auto, with figures."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def table(md: str, first_header: str) -> list[list[str]]:
    """The cells of the markdown table whose header row starts with `first_header`."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_smoke_writes_every_row(tmp_path):
    out = tmp_path / "smoke.md"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu_batch.py"), "--smoke", "--device", "cpu",
                        "--out", str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    md = out.read_text()
    assert "- nothing skipped" in md
    assert "tiny GQA, bfloat16" in md and "8 new tokens" in md

    rows = table(md, "prompt tokens")
    # the smoke plan 64x1,128x1,128x4,64x4: each (length, batch) once per method, sorted, full first
    assert [(L, B, m) for L, B, m, *_ in rows] == [(L, B, m) for L in ("64", "128") for B in ("1", "4")
                                                   for m in ("full", "auto")]
    for L, B, method, tps, ratio, step_ms, prefill, kept, peak_kv, full, gpu_mem in rows:
        assert float(tps) > 0 and float(step_ms) > 0 and float(prefill) >= 0, (L, B, method)
        assert float(peak_kv) > 0 and float(full) > 0 and gpu_mem == "n/a"  # no GPU memory on the CPU
        if method == "full":
            assert ratio == "" and float(kept) == 1.0
        else:
            assert float(ratio.rstrip("x")) > 0
            assert abs(float(kept) - 0.7) < 0.02  # the budget profile's default
    measured = json.loads(out.with_suffix(".json").read_text())["rows"]
    peak = {(r["length"], r["batch"], r["method"]): r["peak_kv"] for r in measured}  # bytes, not rounded MiB
    for L, B in {(L, B) for L, B, _ in peak}:  # auto's caches hold less than full's
        assert 0 < peak[L, B, "auto"] < peak[L, B, "full"], (L, B)
    assert all(r["prefill_s"] > 0 and r["decode_s"] > 0 and r["runs"] == 1 for r in measured)

    cap = re.search(r"Under a cap of ([\d.]+) MiB \(what 4 full caches of 64 \+ new tokens need\), (\d+) prompts", md)
    assert cap and float(cap[1]) > 0
    capped = {m: (int(running), float(tps)) for m, running, tps, *_ in table(md, "method")}
    assert set(capped) == {"full", "auto"}
    assert capped["full"][0] == 4  # the cap holds 4 full caches
    # auto's projection admits every prompt at once; with the tiny shape's 16-dim heads a store's per-row positions,
    # flags and scores are a large share of a row, so that may be no more than full's 4
    assert capped["auto"][0] == int(cap[2]) >= 4
    assert all(tps > 0 for _, tps in capped.values())
