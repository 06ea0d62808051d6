"""Weight-only quantization chosen at load time: drop-in linear layers over torch's packed kernels.

- int8: one scale per output row, w = q * scale (q in -127..127); `aten._weight_int8pack_mm`.
- int4: groups of 32 weights along the input, w = (q - 8) * scale + zero (q in 0..15);
  `aten._weight_int4pack_mm_for_cpu` on the CPU, `aten._weight_int4pack_mm` on CUDA.
  A Q4_1 block (32 weights, w = d * q + m) is such a group with scale = d and zero = m + 8d, so a checkpoint
  directory holding `q4_1.safetensors` (written by weights/convert.py) runs as distributed, with no re-quantization.

Every linear layer and the LM head are quantized; the embedding and the norms stay in the model dtype. In int4 mode
the LM head is int8: the default model's head is tied to its embedding, which the GGUF ships in 8 bits (Q8_0), so
8 bits keep the distributed model's precision there (a 4-bit head cost +5.3% perplexity, measured).

Activations enter the kernels in bfloat16: with float32 activations the CPU kernels are 6-20x slower (measured
here), and the CUDA int4 kernel takes nothing else. `reference=True` builds the same quantized weights as dense
`nn.Linear` layers (dequantized in float32), the path tests hold the packed kernels against.

Unquantized CPU models get their matrices in the layout the decode kernels read fastest (`cpu_layout`): prepacked
for oneDNN (`MkldnnLinear`), or, for float32 at batch 1 on one thread, transposed views of (in, out) storage.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import checkpoint_sources, open_safetensors
from .errors import TinygenError

MODES = ("int8", "int4")
GROUP = 32  # int4 group size: one Q4_1 block
Q4_1_FILE = "q4_1.safetensors"
KERNEL_DTYPE = torch.bfloat16  # activations and scales inside the packed kernels
DENSE_ROWS = 32  # int8 with this many rows or more (prefill) dequantizes and runs a dense matmul instead
OPS = {("int8", "cpu"): ("_weight_int8pack_mm",), ("int8", "cuda"): ("_weight_int8pack_mm",),
       ("int4", "cpu"): ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"),
       ("int4", "cuda"): ("_convert_weight_to_int4pack", "_weight_int4pack_mm")}


def check_mode(mode: str, device: torch.device) -> None:
    """Raise TinygenError unless `mode` is known and this torch build has its kernels for `device`."""
    if mode not in MODES:
        raise TinygenError(f"unknown --quantize mode {mode!r} (choose int8 or int4, or leave --quantize out)")
    for op in OPS.get((mode, device.type), ("(none for this device type)",)):
        key = "CPU" if device.type == "cpu" else "CUDA"
        if not (hasattr(torch.ops.aten, op) and torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key)):
            raise TinygenError(f"--quantize {mode}: torch {torch.__version__} has no {op} kernel for {device.type} "
                               f"(use --device cpu, another torch build, or leave --quantize out)")


# ---- quantizers: float weights (out, in) -> codes and scales, all math in float32 ----

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: q (out, in) int8, scale (out,) float32 already rounded to the kernel's dtype."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).to(KERNEL_DTYPE).float()
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups (min/max, as Q4_1): q (out, in) uint8 0..15, scale and zero (out, in/group) in the
    kernel form w = (q - 8) * scale + zero, rounded to the kernel's dtype before the codes are chosen."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-10).to(KERNEL_DTYPE).float()
    zero = (lo + 8 * scale).to(KERNEL_DTYPE).float()
    q = ((g - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15).to(torch.uint8)
    return q.view(n, k), scale, zero


def q4_1_to_int4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 blocks (w = d * q + m, q in 0..15) -> the kernel form: the same codes, scale = d, zero = m + 8d.
    d and m are rounded to the kernel's dtype (bfloat16) only at the end: that rounding is the path's one error."""
    d, m = d.float(), m.float()
    return q, d.to(KERNEL_DTYPE).float(), (m + 8 * d).to(KERNEL_DTYPE).float()


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(out, in) float32 from codes (out, in) and per-group scale/zero (out, in/group)."""
    n, k = q.shape
    g = (q.view(n, scale.shape[1], -1).float() - 8) * scale[..., None] + zero[..., None]
    return g.view(n, k)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(rows, cols/2) uint8, low nibble = even column, high nibble = odd column -> (rows, cols) uint8 codes."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1)


# ---- the drop-in layers ----

class Int8Linear(nn.Module):
    """y = (x @ q.T) * scale over torch's int8 weight-only kernel. Any input dtype; the output has the input's."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q.contiguous())  # (out, in) int8
        self.register_buffer("scales", scale.to(KERNEL_DTYPE))  # (out,)

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
        if x2.shape[0] >= DENSE_ROWS:  # prefill: a dense bfloat16 matmul beats the kernel (2.5x at 200 rows here)
            y = F.linear(x2, self.weight.to(KERNEL_DTYPE)) * self.scales
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)  # (rows, out)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class Int4Linear(nn.Module):
    """y = x @ ((q - 8) * scale + zero).T in groups of `group` inputs, over torch's packed int4 kernel."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int = GROUP):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group, self.cpu = group, q.device.type == "cpu"
        self.register_buffer("weight", pack_int4(q))
        # (in/group, out, 2): the layout both kernels read
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
                             .to(KERNEL_DTYPE))

    def forward(self, x):
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if self.cpu else torch.ops.aten._weight_int4pack_mm
        y = mm(x.reshape(-1, self.in_features).to(KERNEL_DTYPE), self.weight, self.group, self.scales_and_zeros)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes (out, in) uint8 0..15 -> the packed tensor the device's int4 kernel reads."""
    if q.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)  # (out, in/2) uint8
    inner_k_tiles = next(t for t in (8, 4, 2) if q.shape[1] % (16 * t) == 0)
    return torch.ops.aten._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), inner_k_tiles)


def check_int4_shape(name: str, out_features: int, in_features: int, device: torch.device) -> None:
    rows = 16 if device.type == "cpu" else 8
    if in_features % GROUP or out_features % rows:
        raise TinygenError(f"--quantize int4: {name} is {out_features}x{in_features}; the {device.type} int4 kernel "
                           f"needs inputs in multiples of {GROUP} and outputs in multiples of {rows} "
                           f"(use --quantize int8)")


# ---- the model ----

class Q4_1Blocks:
    """The raw Q4_1 blocks beside a checkpoint: per HF weight NAME.weight, `NAME.q` (rows, cols/2) uint8 packed
    codes (column 2i in the low nibble), `NAME.d` and `NAME.m` (rows, cols/32) float16; w = d * q + m."""

    def __init__(self, path: Path):
        self.path, self.file = path, open_safetensors(path)
        self.names = {k.rsplit(".", 1)[0] + ".weight" for k in self.file.keys()}

    def get(self, name: str):
        name = name.removesuffix(".weight")
        try:
            q, d, m = (self.file.get_tensor(f"{name}.{part}") for part in "qdm")
        except Exception as e:
            raise TinygenError(f"cannot read the Q4_1 blocks of {name} from {self.path.name}: {e}") from None
        return unpack_nibbles(q), d, m


def quantize_model(model: nn.Module, mode: str, model_dir: Path, dtype: torch.dtype, reference: bool = False) -> str:
    """Replace every linear layer and the LM head of a float32 model by its quantized layer, then cast what is left
    (embedding, norms) to `dtype`. Returns where the int4 weights came from ("q4_1 blocks" or "float weights").

    reference=True: dense nn.Linear layers holding the dequantized weights instead (a float32 reference)."""
    device = model.embed.weight.device
    if not reference:
        check_mode(mode, device)
    blocks_path = Path(model_dir) / Q4_1_FILE
    blocks = Q4_1Blocks(blocks_path) if mode == "int4" and blocks_path.is_file() else None
    sources = checkpoint_sources(model.cfg)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if mode == "int4":
        for name, lin in linears:
            if name != "lm_head":
                check_int4_shape(name, lin.out_features, lin.in_features, device)
    if blocks is not None:
        missing = [s for n, m in linears if n != "lm_head" for s, _ in sources[n + ".weight"] if s not in blocks.names]
        if missing:
            raise TinygenError(f"{blocks_path.name} lacks the blocks of {missing[0]} (rerun weights/convert.py, or "
                               f"move the file away to quantize the float weights)")

    def int8_layer(w):
        q, scale = quantize_int8(w)
        return dense(q.float() * scale[:, None]) if reference else Int8Linear(q, scale)

    def int4_layer(name, w):
        if blocks is not None:  # rows stacked in the fused layer's order (q|k|v, gate|up)
            parts = [blocks.get(src) for src, _ in sources[name + ".weight"]]
            q, d, m = (torch.cat([p[i] for p in parts]).to(device) for i in range(3))
            q, scale, zero = q4_1_to_int4(q, d, m)
        else:
            q, scale, zero = quantize_int4(w)
        return dense(dequantize_int4(q, scale, zero)) if reference else Int4Linear(q, scale, zero)

    with torch.no_grad():
        for name, lin in linears:
            parent, _, attr = name.rpartition(".")
            layer = int8_layer(lin.weight) if mode == "int8" or name == "lm_head" else int4_layer(name, lin.weight)
            setattr(model.get_submodule(parent) if parent else model, attr, layer)
        if model.lm_head is None:  # tied: the head gets its own quantized copy, the embedding stays for lookups
            model.lm_head = int8_layer(model.embed.weight)
        for p in model.parameters():  # embedding, norms (and a reference's dense layers)
            p.data = p.data.to(dtype)
    return "q4_1 blocks" if blocks is not None else "float weights"


class MkldnnLinear(nn.Module):
    """A linear layer over oneDNN's prepacked weight (an opaque blocked layout, chosen for `rows` rows per call).
    bfloat16: the same results as F.linear bit for bit here, the matrix-vector product of decode 1.7-2.8x faster on
    this CPU. float32, packed for 8 rows: 30 of the default model's gate+up matrices (3072 x 576) took 22 ms for
    8 rows against 56 ms through F.linear over (in, out) storage (MKL), but one row 18.6 ms against 14.5 (1 thread,
    AMD EPYC with AVX512); results differ from F.linear's by rounding only."""

    def __init__(self, w: torch.Tensor, rows: int = 1):
        super().__init__()
        self.out_features, self.in_features = w.shape
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows))

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")


def mkldnn_linear() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def mkldnn_bf16() -> bool:
    return mkldnn_linear() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cpu_layout(model: nn.Module, rows: int = 1) -> None:
    """Store an unquantized CPU model's matrices in the layout its kernels read fastest for `rows` rows per decode
    step (the batch size a caller plans to run) and the torch threads set at load time.

    float32, one row, one thread: every matrix as (in, out) behind a transposed view, so F.linear and the tied head
    (x @ embed.T) hand MKL's GEMV a contiguous W^T (a decode step took 23% less time here than over (out, in); the
    lookup only gathers). Anything else, and bfloat16 (where oneDNN has bfloat16 kernels): every linear layer and
    the head prepacked for oneDNN (`MkldnnLinear`), whose kernels use both cores where MKL's GEMV did not (batch-1
    decode 1.13x, prefill 1.2-1.3x the GEMV layout's speed with 2 threads, 0.83x decode with 1) and whose 8-row
    products take 2.5x less time than MKL's. A tied head gets its own packed copy (+dim x vocab x itemsize bytes),
    the embedding stays for lookups."""
    w = model.embed.weight
    if w.device.type != "cpu" or any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules()):
        return
    if w.dtype == torch.float32 and ((rows == 1 and torch.get_num_threads() == 1) or not mkldnn_linear()):
        for p in model.parameters():
            if p.dim() == 2:
                p.data = p.data.t().contiguous().t()
    elif w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and mkldnn_bf16()):
        with torch.no_grad():
            for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, attr, MkldnnLinear(lin.weight, rows))
            if model.lm_head is None:
                model.lm_head = MkldnnLinear(w, rows)


def dense(w: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device)
    layer.weight.data = w
    return layer


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer of the layers, norms and head, plus one
    row of the embedding (a tied head reads the whole embedding once, as the head)."""
    embed = model.embed.weight
    total = sum(t.numel() * t.element_size() for n, t in [*model.named_parameters(), *model.named_buffers()]
                if n != "embed.weight")
    tied = model.lm_head is None
    return total + (embed.numel() if tied else embed.shape[1]) * embed.element_size()
