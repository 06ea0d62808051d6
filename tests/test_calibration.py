"""Budgets per layer from a calibration: the allocation on hand-made curves, the calibration tool on a tiny model, and
the command line taking the model directory's calibration (or none, or a bad one: a one-line error)."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_one_line_error

from tinygen.errors import TinygenError
from tinygen.eval.calibrate import calibrate
from tinygen.fastgen.budget import CALIBRATION_FILE, MENU, layer_budgets, read_calibration, weigh_by_sensitivity

SHARE = torch.tensor([1.0 if o.label == "full" else o.local_ratio + o.frequent_ratio for o in MENU],
                     dtype=torch.float64)  # each option's kept share


def curves(*kinds):
    """A layer's curve per kind: "flat" recovers everything at any share, "linear" recovers its share."""
    return torch.stack([torch.ones_like(SHARE) if k == "flat" else SHARE.clone() for k in kinds])


def test_layer_budgets_hand_cases():
    # A flat layer gains nothing from tokens: it takes the smallest share and the others get the rest.
    assert layer_budgets(curves("flat", "linear"), 0.5) == (0.05, 0.95)  # full (1.0) would pass the target
    # Both linear layers take full; the flat one takes the rest (0.10: what is left is spent, though it buys nothing).
    assert layer_budgets(curves("flat", "linear", "linear"), 0.7) == (0.1, 1.0, 1.0)
    # A layer that saturates at 0.3 gets 0.3; the rest goes where it still buys recovery.
    sat = torch.clamp(SHARE / 0.3, max=1.0)
    got = layer_budgets(torch.stack([sat, SHARE]), 0.6)
    assert got == (0.3, 0.9)
    # A floor keeps every layer at or above floor x target: the flat layer gets half the target, not 0.05.
    assert layer_budgets(curves("flat", "linear"), 0.5, floor=0.5) == (0.25, 0.75)


def test_sensitivity_weighs_each_layer_by_the_kl_a_unit_of_recovery_closed():
    """Weight = KL gain / recovery missing at the measured budget: two layers with the same curve (0.9 at 0.70)
    and gains 0.02 and 0.005 get weights 0.2 and 0.05; a negative gain counts as none."""
    c = torch.stack([torch.clamp(SHARE + 0.2, max=1.0)] * 3)  # recovery 0.9 at share 0.7
    w = weigh_by_sensitivity(c, torch.tensor([0.02, 0.005, -0.01], dtype=torch.float64), 0.7)
    torch.testing.assert_close(w[0], c[0] * 0.2)
    torch.testing.assert_close(w[1], c[1] * 0.05)
    assert (w[2] == 0).all()
    # With curves that reward tokens alike, the more sensitive layer gets the memory.
    lin = curves("linear", "linear")
    b = layer_budgets(weigh_by_sensitivity(lin, torch.tensor([0.03, 0.01], dtype=torch.float64), 0.7), 0.5)
    assert b[0] > b[1] and sum(b) <= 1.0 + 1e-9


def test_layers_with_no_measured_gain_take_the_leftover():
    """Issue 23, finding 6: a layer whose KL gain was measured as none has an all-zero curve; the budget it leaves
    is spent on it, and a kv_budget of 1 keeps every layer whole."""
    w = weigh_by_sensitivity(curves("linear", "linear"), torch.tensor([0.02, -0.001], dtype=torch.float64), 0.7)
    assert layer_budgets(w, 0.6) == (1.0, 0.2)
    assert layer_budgets(w, 1.0) == (1.0, 1.0)
    assert layer_budgets(w, 1.0, floor=0.75) == (1.0, 1.0)


def test_default_calibration_spends_every_budget():
    """The committed calibration of the default model (two layers measured no gain): at a kv_budget of 1 every layer
    keeps everything; at the evaluated budgets the shares average to exactly the budget."""
    path = ROOT / "weights" / "SmolLM2-135M-Instruct.fastgen_calibration.json"
    cal = read_calibration(path, 30)
    assert cal.budgets(1.0) == (1.0,) * 30
    for kv_budget in (0.55, 0.65, 0.7, 0.8):
        assert sum(cal.budgets(kv_budget)) / 30 == pytest.approx(kv_budget), kv_budget


def test_kv_budget_one_keeps_everything_on_a_calibrated_model(tiny_model_dir, tmp_path):
    """A calibration with layers of no measured gain, at a kv_budget of 1: every token kept, and the logits of the
    full cache at every step."""
    from tinygen.cache import kept_fraction
    from tinygen.fastgen.budget import with_calibration
    from tinygen.fastgen.cache import fastgen_caches
    from tinygen.fastgen.kinds import TokenKinds
    from tinygen.fastgen.policy import FastGenConfig
    from tinygen.generate import decode_step, full_caches, prefill
    from tinygen.loader import load_model

    model = load_model(tiny_model_dir)
    c = model.cfg
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"menu": [o.label for o in MENU], "layer_recovery": curves("linear", "flat", "linear")
                                .tolist(), "layer_sensitivity": [0.01, 0.0, -0.002], "sensitivity_budget": 0.7,
                                "layer_floor": 0.75}))
    cfg = with_calibration(FastGenConfig(kv_budget=1.0, observation=8), path, c.n_layers)
    assert cfg.layer_budgets == (1.0,) * c.n_layers
    L, steps = 37, 12
    ids = torch.randint(3, c.vocab_size, (L + steps,), generator=torch.Generator().manual_seed(8)).tolist()

    def logits(caches, feed):  # teacher-forced along the same tokens
        feed(ids[:L])
        out = [prefill(model, ids[:L], caches)]
        for pos in range(L, L + steps - 1):
            feed([ids[pos]])
            out.append(decode_step(model, torch.tensor([ids[pos]]), caches, pos))
        return torch.stack(out)

    got = []
    for policy in (cfg, FastGenConfig(policy="full")):  # calibrated at 1, then every head on the `full` policy
        kinds = TokenKinds([0] * c.vocab_size, L + steps, torch.device("cpu"))
        caches = fastgen_caches(model, kinds, policy, L + steps)
        got.append(logits(caches, kinds.append))
        assert kept_fraction(caches) == 1.0
    assert torch.equal(got[0], got[1])
    # the engine's plain full cache: prefill's block-wise attention and the fused kernel differ by float rounding
    torch.testing.assert_close(got[0], logits(full_caches(model, L + steps), lambda ids: None), atol=1e-5, rtol=0)


def test_calibrate_tiny_model_curves_are_recoveries(tiny_model_dir):
    from tinygen.loader import load_model

    model = load_model(tiny_model_dir)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (20, 33)]
    got, rows = calibrate(model, prompts, 6)
    assert got.shape == (model.cfg.n_layers, len(MENU)) and rows == 12
    labels = [o.label for o in MENU]
    assert torch.allclose(got[:, labels.index("full")], torch.ones(model.cfg.n_layers, dtype=got.dtype))
    assert ((got >= 0) & (got <= 1 + 1e-9)).all()
    f = got[:, [labels.index(f"f{s:02d}") for s in range(5, 100, 5)]]
    assert (f[:, 1:] >= f[:, :-1] - 1e-9).all()  # heavy-hitter sets are nested: more tokens never recover less
    assert (f[:, 0] < 1).all()  # keeping 5% loses attention somewhere


def test_read_calibration_checks_the_file(tmp_path):
    good = {"menu": [o.label for o in MENU], "layer_recovery": curves("flat", "linear").tolist()}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(good))
    assert torch.equal(read_calibration(path, 2)[0], curves("flat", "linear")) and read_calibration(path, 2)[1] == 0
    path.write_text(json.dumps(dict(good, layer_sensitivity=[0.02, 0.01], sensitivity_budget=0.7, layer_floor=0.75)))
    got, floor = read_calibration(path, 2)
    assert floor == 0.75
    torch.testing.assert_close(got, weigh_by_sensitivity(curves("flat", "linear"), torch.tensor([0.02, 0.01],
                                                                                               dtype=torch.float64), 0.7))
    path.write_text(json.dumps(dict(good, layer_sensitivity=[0.02], sensitivity_budget=0.7)))
    with pytest.raises(TinygenError, match="1 layer sensitivities for 2 layers"):
        read_calibration(path, 2)
    no_budget = tmp_path / "no_budget.json"  # sensitivities without the budget they were measured at
    no_budget.write_text(json.dumps(dict(good, layer_sensitivity=[0.02, 0.01])))
    with pytest.raises(TinygenError, match="cannot read the calibration .*sensitivity_budget"):
        read_calibration(no_budget, 2)
    with pytest.raises(TinygenError, match=r"needs \(3, 39\)"):
        read_calibration(path, 3)
    path.write_text(json.dumps(dict(good, menu=good["menu"][:-1])))
    with pytest.raises(TinygenError, match="another option menu"):
        read_calibration(path, 2)
    path.write_text("{not json")
    with pytest.raises(TinygenError, match="cannot read the calibration"):
        read_calibration(path, 2)


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_cli_spreads_the_budget_by_the_model_directory_calibration(chat_model, tmp_path):
    model = shutil.copytree(chat_model, tmp_path / "model")
    (model / CALIBRATION_FILE).write_text(json.dumps({"menu": [o.label for o in MENU],
                                                      "layer_recovery": curves("flat", "linear", "linear").tolist()}))
    out = tmp_path / "stats.json"
    args = ("--model", model, "--prompt", "tell me a long story about a dragon", "--max-new-tokens", 8,
            "--ignore-eos", "--stats-json", out)
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    stats = json.loads(out.read_text())
    assert stats["layer_budgets"] == [0.1, 1.0, 1.0] and stats["calibration"] == str(model / CALIBRATION_FILE)
    assert [set(layer) for layer in stats["policies"]][1:] == [{"full"}, {"full"}]
    assert all(p.endswith("r_f=0.1") or "r_l=0.05" in p for p in stats["policies"][0]), stats["policies"][0]
    r = cli(*args, "--calibration", "none")
    assert r.returncode == 0, r.stderr
    stats = json.loads(out.read_text())
    assert stats["layer_budgets"] is None and abs(stats["kept_fraction"] - 0.7) <= 0.05
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert_one_line_error(cli(*args, "--calibration", bad), "cannot read the calibration", code=1)
    assert_one_line_error(cli(*args, "--calibration", bad, "--policy", "full"), "--calibration is for", code=2)


def test_calibrate_command_writes_a_calibration_the_cli_reads(chat_model, tmp_path):
    """python -m tinygen.eval.calibrate (sensitivity on every prompt by default): one file with curves, one KL gain
    per layer and the layer floor, which read_calibration takes for this model; bad flags are one-line errors."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "tell me a story"}\n{"prompt": "count to ten"}\n')
    out = tmp_path / "cal.json"
    run = lambda *a: subprocess.run([sys.executable, "-m", "tinygen.eval.calibrate", "--model", chat_model,  # noqa: E731
                                     "--prompts", prompts, *map(str, a)], capture_output=True, text=True,
                                    timeout=300, cwd=ROOT)
    r = run("--start", 0, "--limit", 2, "--max-new-tokens", 4, "--out", out)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    n_layers = len(data["layer_recovery"])
    assert len(data["layer_sensitivity"]) == n_layers and data["layer_floor"] == 0.75
    assert data["generated_rows"] == 8 and data["sensitivity_budget"] == 0.7 and data["start"] == 0
    assert data["sensitivity_prompts"] == 2
    curves, floor = read_calibration(out, n_layers)
    assert curves.shape == (n_layers, len(MENU)) and floor == 0.75
    assert_one_line_error(run("--sensitivity-prompts", 3, "--limit", 2), "--sensitivity-prompts", code=2)
    assert_one_line_error(run("--start", 2), "no prompts from record 3 on")
