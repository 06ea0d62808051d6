"""Prefill, one decode step, and the generation loop that yields tokens as they are chosen."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .cache import FullRows, KVCache
from .errors import TinygenError
from .model import Llama
from .paged import PagedCache, lone_batch
from .sampling import SamplingParams, sample


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    stop_reason: str = ""  # "eos", "length", "context" or "interrupted"

    @property
    def decode_tokens_per_second(self) -> float:
        # The first generated token comes out of prefill; decode steps produce the rest.
        return self.decode_steps / self.decode_seconds if self.decode_steps and self.decode_seconds > 0 else 0.0


def full_caches(model: Llama, max_len: int, first_len: int | None = None, paged=None, slot: int = 0) -> list[FullRows]:
    """One full cache per layer, up to max_len tokens, on the model's device and dtype: the rows of batch slot
    `slot` of `paged`, or, without one, of a sequence on its own (a batch of one, its pool with room for first_len
    tokens, default max_len, doubling when that runs out)."""
    lone = paged is None
    if lone:
        paged = lone_batch(model, max_len, first_len)
    caches = [FullRows(paged, slot, i, model.cfg.n_kv_heads) for i in range(model.cfg.n_layers)]
    if lone:
        paged.set_batch([(slot, caches)])
    return caches


@torch.inference_mode()
def prefill(model: Llama, prompt_ids: list[int], caches: list[KVCache], start_pos: int = 0,
            on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
    """Run the prompt's tokens (at positions start_pos..) through the model, filling the caches; returns the last
    position's logits (vocab,). start_pos > 0 continues a cache that has seen start_pos tokens (a chat's next turn).
    on_layer(i) is called as each layer finishes (progress)."""
    tokens = torch.tensor(prompt_ids, dtype=torch.long, device=model.embed.weight.device)
    return model(tokens, caches, start_pos=start_pos, last_only=True, on_layer=on_layer)[0]


@torch.inference_mode()
def decode_step(model: Llama, token: torch.Tensor, caches: list[KVCache], pos: int, fn=None) -> torch.Tensor:
    """One token (a (1,) tensor) at position `pos` -> logits (vocab,) for the next one: the paged
    batch's step (step.py) for a sequence in the pool (fn: that step compiled), the model's forward for other
    caches (the eval's baselines)."""
    if isinstance(caches[0], PagedCache):
        paged = caches[0].paged
        paged.reserve(caches)  # its rows' blocks for the new token
        return paged.step(model, token.view(1), [pos], fn)[0]
    return model(token, caches, start_pos=pos)[0]


def generate(model: Llama, prompt_ids: list[int], caches: list[KVCache], max_new_tokens: int,
             sampling: SamplingParams = SamplingParams(), eos_ids=frozenset(), ignore_eos: bool = False,
             stats: GenerationStats | None = None,
             on_tokens: Callable[[list[int]], None] | None = None, start_pos: int = 0,
             on_layer: Callable[[int], None] | None = None, decode: Callable = decode_step) -> Iterator[int]:
    """Yield generated token ids. `stats` (if given) is filled in as generation goes, stop reason included.

    `on_tokens(ids)` is called with each batch of ids just before the model sees them (caches that need to know
    token kinds, like FastGen's, hook in here). `start_pos` > 0: the caches have seen that many tokens and
    `prompt_ids` continue them (a chat's next turn). `on_layer` reports the prefill's progress (see `prefill`).
    `decode`: the step function, `decode_step` or a drop-in (compiled.CompiledDecoder for full caches).
    """
    stats = stats if stats is not None else GenerationStats()
    limit = model.cfg.max_seq_len
    if not prompt_ids:
        raise TinygenError("the prompt is empty")
    if start_pos + len(prompt_ids) >= limit:
        raise TinygenError(f"the prompt has {start_pos + len(prompt_ids)} tokens; the model's context is {limit}")
    device = model.embed.weight.device
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(sampling.seed)
    stats.prompt_tokens = len(prompt_ids)
    stats.stop_reason = "length"

    t0 = time.perf_counter()
    if on_tokens:
        on_tokens(prompt_ids)
    logits = prefill(model, prompt_ids, caches, start_pos, on_layer)
    token = sample(logits, sampling, generator)
    token_id = int(token.item())  # reading the sampled token (in the decode loop below, a step's one host sync)
    stats.prefill_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    pos = start_pos + len(prompt_ids)
    while True:
        if token_id in eos_ids and not ignore_eos:
            stats.stop_reason = "eos"
            return
        stats.generated_tokens += 1
        yield token_id
        if stats.generated_tokens >= max_new_tokens:
            return
        if pos >= limit:
            stats.stop_reason = "context"
            return
        if on_tokens:
            on_tokens([token_id])
        logits = decode(model, token, caches, pos)
        token = sample(logits, sampling, generator)
        token_id = int(token.item())  # the one host sync per step: reading the sampled token
        pos += 1
        stats.decode_steps += 1
        stats.decode_seconds = time.perf_counter() - t0
