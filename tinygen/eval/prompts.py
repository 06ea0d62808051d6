"""Prompt sets (JSONL or a JSON list) and the files the evaluation writes (temp name + rename)."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from ..cliutil import write_text_atomic
from ..errors import TinygenError


def prompt_of(record, where: str) -> str:
    """The prompt of one record: `prompt`, `instruction` (AlpacaEval) or the first of `turns` (MT-Bench)."""
    if isinstance(record, str):
        text = record
    elif not isinstance(record, dict):
        raise TinygenError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    elif isinstance(record.get("prompt"), str):
        text = record["prompt"]
    elif isinstance(record.get("instruction"), str):
        text = record["instruction"]
    elif isinstance(record.get("turns"), list) and record["turns"] and isinstance(record["turns"][0], str):
        text = record["turns"][0]
    else:
        raise TinygenError(f"{where}: no prompt (expected a string 'prompt', 'instruction' or 'turns' list)")
    if not text.strip():
        raise TinygenError(f"{where}: the prompt is empty")
    return text


def read_records(path: str) -> list[tuple[object, str]]:
    """The records of a JSON list or JSON Lines file, each with where it is (for messages); at least one."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise TinygenError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise TinygenError(f"{path} is not UTF-8 text (byte {e.start})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise TinygenError(f"{path}: bad JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        where = [f"{path}: record {i + 1}" for i in range(len(records))]
    else:
        records, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TinygenError(f"{path}: bad JSON on line {n} column {e.colno}: {e.msg}") from None
            where.append(f"{path}: line {n}")
    if not records:
        raise TinygenError(f"{path}: no prompts")
    return list(zip(records, where))


def record_id(record, index: int):
    """A record's question_id/id, else its index."""
    return record.get("question_id", record.get("id", index)) if isinstance(record, dict) else index


def load_prompts(path: str, limit: int | None = None, start: int = 0) -> list[dict]:
    """[{"id", "prompt"}] from a JSON list or JSON Lines file, `limit` of them from record `start` (0-based); ids are
    the record's question_id/id, else its index."""
    out = [{"id": record_id(rec, i), "prompt": prompt_of(rec, w)} for i, (rec, w) in enumerate(read_records(path))]
    out = out[start:]
    if not out:
        raise TinygenError(f"{path}: no prompts from record {start + 1} on")
    return out[:limit] if limit else out


def write_jsonl(path: Path, rows: list[dict]):
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def machine() -> dict:
    """Where the figures come from."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
