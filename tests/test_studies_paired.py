"""bench/studies/paired.py on hand-made records: per-prompt differences and their standard error, same memory only."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_paired_differences_by_hand(tmp_path):
    rec = lambda label, kept, kl, agree, n: {"method": {"label": label}, "kept_fraction": kept,  # noqa: E731
                                             "kl": kl, "agreement": agree, "prompt_tokens": n}
    rows = [rec("auto budget=0.7 calibrated", 0.70, kl, a, n) for kl, a, n in [(0.1, 0.9, 50), (0.3, 0.8, 60)]]
    rows += [rec("frequent r=0.7", 0.702, kl, a, n) for kl, a, n in [(0.2, 0.8, 50), (0.6, 0.8, 60)]]
    rows += [rec("sinks r=0.5", 0.55, 1.0, 0.5, n) for n in (50, 60)]  # other memory: left out
    f = tmp_path / "s_prompts.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "studies" / "paired.py"), str(f)], capture_output=True,
                         text=True, check=True).stdout
    # KL differences -0.1 and -0.3: mean -0.2, standard error stdev/sqrt(2) = 0.1414/1.414 = 0.1;
    # agreement +0.1 and 0.0: mean +0.05, standard error 0.05
    assert "vs frequent r=0.7" in out and "KL -0.2000 ± 0.1000, agreement +0.0500 ± 0.0500" in out
    assert "sinks" not in out
