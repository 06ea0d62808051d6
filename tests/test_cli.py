"""The command line: bad input gets one line on stderr and a non-zero exit; Ctrl-C stops cleanly."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, assert_one_line_error, interruptible
from safetensors.torch import load_file, save_file


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def assert_error(result, code, *fragments):
    assert_one_line_error(result, *fragments, code=code)


def broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def test_generates_and_writes_stats_json(chat_model, tmp_path):
    out = tmp_path / "stats.json"
    r = cli("--model", chat_model, "--prompt", "hi", "--max-new-tokens", 5, "--ignore-eos", "--stats-json", out,
            "--policy", "full")
    assert r.returncode == 0, r.stderr
    stats = json.loads(out.read_text())
    assert stats["generated_tokens"] == 5 and stats["prompt_tokens"] > 5
    # tokens the cache saw (the last generated one is never fed back) x 3 layers x 2 KV heads x 16 dims x K,V x 4 B
    length, token_bytes = stats["prompt_tokens"] + 4, 3 * 2 * 16 * 2 * 4
    assert stats["kv_bytes_full"] == stats["kv_bytes_kept"] == length * token_bytes
    # held: the pool blocks of the tokens (and of the next token's slot), a slot being K, V and 9 bytes of position,
    # flag and score
    block = 16 * (2 * 16 * 4 + 9)
    assert 3 * 2 * -(-length // 16) * block <= stats["kv_bytes"] <= 3 * 2 * -(-(length + 1) // 16) * block
    assert "decode" in r.stderr and "tok/s" in r.stderr
    assert "MiB in blocks, " in r.stderr and " MiB kept vs full " in r.stderr


def test_auto_keeps_the_default_budget_and_reports_kept_bytes(chat_model, tmp_path):
    out = tmp_path / "stats.json"
    r = cli("--model", chat_model, "--prompt", "tell me a story", "--max-new-tokens", 8, "--ignore-eos",
            "--stats-json", out)
    assert r.returncode == 0, r.stderr
    stats = json.loads(out.read_text())
    assert stats["policy"] == "auto" and stats["profile"] == "budget" and stats["kv_budget"] == 0.7
    assert stats["shapes"] == "local+frequent"
    names = {p for layer in stats["policies"] for p in layer}
    assert all(n == "full" or n.startswith("frequent+local r_l=") for n in names), names
    assert abs(stats["kept_fraction"] - 0.7) <= 0.02  # the budget profile keeps within 0.02 of the budget
    # kept bytes are the kept tokens' K+V: the kept fraction of a full cache's (kept_fraction is rounded to 6 places)
    assert stats["kv_bytes_kept"] / stats["kv_bytes_full"] == pytest.approx(stats["kept_fraction"], abs=1e-6)
    assert "policy map" in r.stderr and "kept share" in r.stderr


def test_paper_profile_reports_policy_map_and_kept_bytes(chat_model, tmp_path):
    """The threshold moves what profiling picks: at 0.98 this random model's heads all need the full cache, at 0.8
    and 0.6 none does, and the lower threshold keeps less (cheaper candidates reach it)."""
    out, kept = tmp_path / "stats.json", {}
    known = {"special", "special+punct", "special+punct+frequent", "special+punct+frequent+local", "full"}
    for threshold in ("0.98", "0.8", "0.6"):
        r = cli("--model", chat_model, "--prompt", "tell me a story", "--max-new-tokens", 8, "--ignore-eos",
                "--profile", "paper", "--threshold", threshold, "--stats-json", out)
        assert r.returncode == 0, r.stderr
        stats = json.loads(out.read_text())
        assert stats["policy"] == "auto" and len(stats["policies"]) == 3
        names = {p for layer in stats["policies"] for p in layer}
        assert names <= known and stats["profile_seconds"] > 0
        assert names == {"full"} if threshold == "0.98" else "full" not in names, (threshold, names)
        assert stats["kv_bytes_kept"] / stats["kv_bytes_full"] == pytest.approx(stats["kept_fraction"], abs=1e-6)
        assert "policy map" in r.stderr and "kept" in r.stderr
        kept[threshold] = stats["kept_fraction"]
    assert kept["0.98"] == 1.0 > kept["0.8"] > kept["0.6"] > 0, kept


def test_missing_and_incomplete_model_dir(chat_model, tmp_path):
    assert_error(cli("--model", tmp_path / "nope", "--prompt", "hi"), 1, "model directory not found")
    d = broken_copy(chat_model, tmp_path / "noweights", lambda d: (d / "model.safetensors").unlink())
    assert_error(cli("--model", d, "--prompt", "hi"), 1, "no model.safetensors")
    d = broken_copy(chat_model, tmp_path / "noconfig", lambda d: (d / "config.json").unlink())
    assert_error(cli("--model", d, "--prompt", "hi"), 1, "no config.json")
    d = broken_copy(chat_model, tmp_path / "notok", lambda d: (d / "tokenizer.json").unlink())
    assert_error(cli("--model", d, "--prompt", "hi"), 1, "no tokenizer.json or tokenizer.model")


def test_unsupported_architecture(chat_model, tmp_path):
    def gpt2(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        (d / "config.json").write_text(json.dumps(cfg))
    assert_error(cli("--model", broken_copy(chat_model, tmp_path / "m", gpt2), "--prompt", "hi"), 1,
                 "unsupported architecture", "GPT2LMHeadModel")


def test_truncated_and_corrupt_safetensors(chat_model, tmp_path):
    def truncate(d):
        f = d / "model.safetensors"
        os.truncate(f, f.stat().st_size // 2)
    assert_error(cli("--model", broken_copy(chat_model, tmp_path / "t", truncate), "--prompt", "hi"), 1,
                 "corrupt or truncated")
    garbage = lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64)
    assert_error(cli("--model", broken_copy(chat_model, tmp_path / "g", garbage), "--prompt", "hi"), 1,
                 "corrupt or truncated")


def test_missing_and_misshapen_tensors(chat_model, tmp_path):
    def edit(drop=None, reshape=None):
        def go(d):
            tensors = load_file(d / "model.safetensors")
            if drop:
                del tensors[drop]
            if reshape:
                tensors[reshape] = tensors[reshape][:-1]
            save_file(tensors, d / "model.safetensors")
        return go
    name = "model.layers.1.self_attn.k_proj.weight"
    d = broken_copy(chat_model, tmp_path / "drop", edit(drop=name))
    assert_error(cli("--model", d, "--prompt", "hi"), 1, "missing tensor", name)
    d = broken_copy(chat_model, tmp_path / "shape", edit(reshape=name))
    assert_error(cli("--model", d, "--prompt", "hi"), 1, name, "shape (31, 64)", "expected (32, 64)")


def test_prompt_longer_than_context(chat_model):
    assert_error(cli("--model", chat_model, "--no-chat", "--prompt", "word " * 80), 1, "context is 64")


@pytest.mark.parametrize("flags,message", [
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--temperature", "-1"], "--temperature"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--top-k", "-2"], "--top-k"), (["--ctx", "1"], "--ctx"),
    (["--policy", "bogus"], "unknown policy"), (["--policy", "full+local"], "cannot be combined"),
    (["--threshold", "0"], "--threshold"), (["--threshold", "1.5"], "--threshold"),
    (["--local-ratio", "-0.1"], "--local-ratio"), (["--frequent-ratio", "1.1"], "--frequent-ratio"), (["--dtype", "int3"], "--dtype"), (["--max-new-tokens", "x"], "invalid"),
])
def test_out_of_range_flags(flags, message):
    assert_error(cli("--prompt", "hi", *flags), 2, message)


def test_prompt_file_errors(chat_model, tmp_path):
    assert_error(cli("--model", chat_model, "--prompt-file", tmp_path / "absent.txt"), 2, "no such file")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    assert_error(cli("--model", chat_model, "--prompt-file", bad), 1, "not UTF-8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu(chat_model):
    assert_error(cli("--model", chat_model, "--prompt", "hi", "--device", "cuda"), 1, "no CUDA GPU")


def test_ctrl_c_keeps_text_prints_stats_exits_130(default_model_dir):
    p = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "--prompt", "Write a long story about a cat.",
                          "--max-new-tokens", "2000", "--ignore-eos"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    first = p.stdout.read(20)  # wait until generation is streaming
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    rest, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert len(first + rest) > 20 and "Traceback" not in err
    assert "stop: interrupted" in err and "generated" in err


def test_budget_profile_keeps_about_kv_budget_and_maps_each_head(chat_model, tmp_path):
    out = tmp_path / "stats.json"
    r = cli("--model", chat_model, "--prompt", "tell me a long story about a dragon", "--max-new-tokens", 12,
            "--ignore-eos", "--profile", "budget", "--kv-budget", "0.5", "--shapes", "profile", "--stats-json", out)
    assert r.returncode == 0, r.stderr
    stats = json.loads(out.read_text())
    assert stats["profile"] == "budget" and stats["kv_budget"] == 0.5 and stats["shapes"] == "profile"
    assert abs(stats["kept_fraction"] - 0.5) <= 0.05  # a ~40-token prompt: ceilings are coarse
    names = [p for layer in stats["policies"] for p in layer]
    assert all(n == "full" or n.startswith(("frequent r_l=0 ", "frequent+local r_l=")) for n in names), names
    assert any(n.startswith("frequent r_l=0 ") for n in names), "--shapes profile: the profile picks frequent heads"
    assert "kept share" in r.stderr and "fNN = frequent" in r.stderr
    assert stats["kv_bytes"] < stats["kv_bytes_full"]


@pytest.mark.parametrize("args,fragment", [
    (["--kv-budget", "0"], "--kv-budget must be in (0, 1]"),
    (["--kv-budget", "1.5"], "--kv-budget must be in (0, 1]"),
    (["--kv-budget", "0.5", "--policy", "local+frequent"], "--kv-budget is for --policy auto"),
    (["--kv-budget", "0.5", "--threshold", "0.9"], "not both"),
    (["--kv-budget", "0.5", "--profile", "paper"], "--kv-budget is for --profile budget"),
    (["--profile", "budget", "--threshold", "0.9"], "--threshold is for --profile paper"),
    (["--profile", "budget", "--local-ratio", "0.2"], "sets them from --kv-budget"),
    (["--shapes", "profile", "--policy", "local+frequent"], "--shapes is for --policy auto with the budget profile"),
    (["--shapes", "profile", "--threshold", "0.9"], "--shapes is for --policy auto with the budget profile"),
    (["--shapes", "frequent"], "--shapes"),
    (["--profile", "greedy"], "--profile"),
])
def test_budget_flags_bad_input(chat_model, args, fragment):
    assert_error(cli("--model", chat_model, "--prompt", "hi", *args), 2, fragment)


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "nan"], "finite"), (["--temperature", "inf"], "finite"), (["--top-p", "nan"], "finite"),
    (["--kv-budget", "nan"], "finite"), (["--threshold", "inf"], "finite"),
    (["--seed", str(2**64)], "--seed"), (["--seed", "-1"], "--seed"),
    (["--device", "gpu"], "--device"), (["--device", "cuda:x"], "--device"),
    (["--compile", "--policy", "full", "--device", "gpu"], "--device"),
    (["--compile", "--policy", "full", "--device", "cuda:0"], "--compile runs on the CPU only"),
    (["--max-new-tokens", "99999999999999999999"], "--max-new-tokens"),
    (["--system", "be brief", "--no-chat"], "--system is for the chat template"),
    (["--prompt", " \n"], "--prompt is empty"), (["--prompt", ""], "--prompt is empty"),
    (["--resume"], "--resume is for --prompts-file"),
])
def test_flags_that_gave_tracebacks(flags, message):
    """Values that once ended in a traceback (inf, nan, huge ints, a bad device) or were silently ignored."""
    args = ["--prompt", "hi", *flags] if "--prompt" not in flags else flags
    assert_error(cli(*args), 2, message)


@pytest.mark.parametrize("flags,message", [
    (["--kv-budget-mb", "inf"], "finite"), (["--kv-budget-mb", "1e400"], "finite"),
    (["--batch", "99999999999999999999"], "--batch"), (["--kv-budget-mb", "nan"], "finite"),
])
def test_prompts_file_flags_that_gave_tracebacks(flags, message, tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "a"}\n')
    assert_error(cli("--prompts-file", src, "--out", tmp_path / "a.jsonl", *flags), 2, message)


def test_outputs_are_checked_before_any_work(tmp_path):
    """Before the model loads: a missing directory, a directory, a device file and the input file itself."""
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "a"}\n')
    for out, fragment in ((tmp_path / "no" / "a.jsonl", "does not exist"), (tmp_path, "is a directory"),
                          ("/dev/null", "not a regular file"), (src, "is the input file")):
        r = cli("--model", tmp_path / "absent", "--prompts-file", src, "--out", out, timeout=30)
        assert_error(r, 2, "--out", fragment)
    r = cli("--model", tmp_path / "absent", "--prompt", "hi", "--stats-json", tmp_path / "no" / "s.json")
    assert_error(r, 2, "--stats-json", "does not exist")
    assert src.read_text() == '{"prompt": "a"}\n'


def test_perplexity_writes_stats_json(chat_model, tmp_path):
    text, out = tmp_path / "t.txt", tmp_path / "s.json"
    text.write_text("the cat sat on the mat " * 8)
    r = cli("--model", chat_model, "--perplexity", text, "--ctx", 32, "--policy", "full", "--stats-json", out)
    assert r.returncode == 0, r.stderr
    stats = json.loads(out.read_text())
    assert f"perplexity={stats['perplexity']:.4f} tokens={stats['tokens']}" in r.stdout
    assert stats["ctx"] == 32 and stats["policy"] == "full" and stats["tokens"] > 32


def test_empty_prompt_file(chat_model, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert_error(cli("--model", chat_model, "--prompt-file", empty), 1, "holds no prompt")
    assert_error(cli("--model", chat_model, "--prompt-file", tmp_path / "absent.txt"), 2, "no such file")


def test_an_internal_error_is_one_line(capsys, monkeypatch):
    """An exception nobody foresaw (a bug, running out of memory) ends in one `error:` line and exit 1, with the
    traceback only under TINYGEN_DEBUG=1."""
    import cli as cli_module

    def boom(a):
        raise RuntimeError("something nobody foresaw\nsecond line")
    monkeypatch.setattr(cli_module, "run", boom)
    monkeypatch.delenv("TINYGEN_DEBUG", raising=False)
    assert cli_module.main(["--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err == ("error: internal error (RuntimeError: something nobody foresaw); TINYGEN_DEBUG=1 shows the "
                   "traceback\n")
    monkeypatch.setenv("TINYGEN_DEBUG", "1")
    with pytest.raises(RuntimeError, match="nobody foresaw"):
        cli_module.main(["--prompt", "hi"])
