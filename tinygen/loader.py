"""Load an HF-layout Llama checkpoint directory (config.json + safetensors, one file or shards) into `Llama`.

The model is built on the meta device, given empty storage of the chosen dtype on the chosen device, and each
parameter is filled from the memory-mapped safetensors one tensor at a time: there is never a second full copy.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import checkpoint_sources, open_safetensors, shard_map
from .config import ModelConfig
from .errors import TinygenError
from .model import Llama
from .quant import check_mode, cpu_layout, quantize_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' -> a device that exists here; anything else is a one-line TinygenError."""
    if name == "cpu":
        return torch.device("cpu")
    index = name[5:] if name.startswith("cuda:") else None
    if name != "cuda" and not (index and index.isdecimal()):
        raise TinygenError(f"unknown device {name!r} (use cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise TinygenError(f"--device {name}: no CUDA GPU is available on this machine (use --device cpu)")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise TinygenError(f"--device {name}: no such GPU, this machine has {count} (cuda:0 to cuda:{count - 1})")
    return torch.device(name)


def read_config(model_dir: Path) -> ModelConfig:
    if not model_dir.is_dir():
        raise TinygenError(f"model directory not found: {model_dir}")
    path = model_dir / "config.json"
    if not path.is_file():
        raise TinygenError(f"incomplete model directory {model_dir}: no config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinygenError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise TinygenError(f"{path} is not a JSON object")
    return ModelConfig.from_hf(raw)


def load_model(model_dir: str | Path, device: str = "cpu", dtype: str = "float32", quantize: str | None = None,
               batch: int = 1, prepack: bool = True) -> Llama:
    """Load a Llama checkpoint directory onto `device` in `dtype` ("float32", "bfloat16" or "float16").
    quantize: "int8" or "int4" weight-only linear layers (tinygen/quant.py), quantized from the checkpoint's floats.
    batch: the sequences a decode step will run at once; on the CPU it picks the weights' layout (`cpu_layout`).
    prepack: False keeps the plain (out, in) float matrices, for torch.compile to pack its own (compiled.py)."""
    model_dir = Path(model_dir)
    if dtype not in DTYPES:
        raise TinygenError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if batch < 1:
        raise TinygenError(f"batch must be at least 1, not {batch}")
    dev = resolve_device(device)
    if quantize is not None:
        check_mode(quantize, dev)
    cfg = read_config(model_dir)
    where = shard_map(model_dir)
    with torch.device("meta"):
        model = Llama(cfg).to(torch.float32 if quantize else DTYPES[dtype])  # quantize from float32
    model.to_empty(device=dev)
    params = dict(model.named_parameters())
    handles = {}
    with torch.no_grad():
        for name, sources in checkpoint_sources(cfg).items():
            param, row = params[name], 0
            for src, shape in sources:
                if src not in where:
                    raise TinygenError(f"checkpoint is missing tensor {src}")
                path = where[src]
                if path not in handles:
                    handles[path] = open_safetensors(path)
                try:
                    t = handles[path].get_tensor(src)
                except Exception as e:
                    raise TinygenError(f"cannot read tensor {src} from {path.name}: {e}") from None
                if tuple(t.shape) != shape:
                    raise TinygenError(f"tensor {src} has shape {tuple(t.shape)}, expected {shape}")
                param[row : row + shape[0]].copy_(t)
                row += shape[0]
    if quantize is not None:
        quantize_model(model, quantize, model_dir, DTYPES[dtype])
    if prepack:
        cpu_layout(model, batch)  # an unquantized model's matrices in the layout the CPU reads fastest for `batch` rows
    model.init_rope()
    return model.eval()
