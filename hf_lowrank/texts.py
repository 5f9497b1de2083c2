"""The texts `hf-lowrank train` trains on: the bundled corpus, a .txt / .json / .jsonl file, or a `datasets` name,
cut into blocks of tokens. Every bad file or name is a `UsageError` naming it (missing, empty, no such field).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .commandline import UsageError
from .data import corpus_text

FILE_SUFFIXES = (".txt", ".text", ".md", ".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow")
TEXT_SUFFIXES, JSON_SUFFIXES = (".txt", ".text", ".md"), (".json", ".jsonl")

def _looks_like_file(data: str) -> bool:
    return Path(data).suffix.lower() in FILE_SUFFIXES or data.startswith(("/", ".", "~")) or "\\" in data


def _read_rows(path: Path, data: str, text_field: str) -> list:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--data {data}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if suffix in TEXT_SUFFIXES:
        return text.splitlines()
    if suffix not in JSON_SUFFIXES:
        raise UsageError(f"--data {data}: expected a .txt, .json or .jsonl file (or a `datasets` name)")
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UsageError(f"--data {data}: line {n} is not valid JSON ({e.msg})") from None
    else:
        if not text.strip():
            return []
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--data {data}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(rows, dict):
            rows = rows.get("data") or rows.get("train") or [rows]
    return [_text_of(row, n, data, text_field) for n, row in enumerate(rows, 1)]


def _text_of(row, n: int, data: str, text_field: str) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        return str(row)
    if text_field not in row:
        raise UsageError(f"--data {data}: row {n} has no field {text_field!r}; pass --text_field with one of "
                         f"{sorted(row)}")
    value = row[text_field]
    if not isinstance(value, str):
        raise UsageError(f"--data {data}: row {n}'s {text_field!r} is a {type(value).__name__}, not text")
    return value


def _load_dataset(data: str, text_field: str) -> list[str]:
    from .hub import source_problem

    if not Path(data).is_dir():
        problem = source_problem(data, repo_type="dataset")
        if problem:
            problem = problem.replace("is not a folder here", "is neither a file nor a folder here", 1)
            raise UsageError(f"--data {data} {problem}; pass a .txt / .json / .jsonl file or a `datasets` name")
    try:
        import datasets
    except ImportError:
        raise UsageError(f"--data {data} is not a file, and `datasets` is not installed to load it by name "
                         "(pip install datasets)") from None
    ds = datasets.load_dataset(data, split="train")
    if text_field not in ds.column_names:
        raise UsageError(f"--data {data}: the dataset has no column {text_field!r}; pass --text_field with one of "
                         f"{ds.column_names}")
    return [t if isinstance(t, str) else str(t) for t in ds[text_field]]


def load_texts(data: str | None, text_field: str) -> list[str]:
    """Texts from the bundled corpus, a .txt / .json / .jsonl file, or a `datasets` name; `UsageError` when the file
    is missing or holds no text."""

    if data is None:
        return [line for line in corpus_text().splitlines() if line.strip()]
    path = Path(data).expanduser()
    if path.is_file():
        texts = _read_rows(path, data, text_field)
    elif _looks_like_file(data):
        raise UsageError(f"--data {data}: file not found" + (f" (in {Path.cwd()})" if not path.is_absolute() else ""))
    else:
        texts = _load_dataset(data, text_field)
    texts = [t for t in texts if t.strip()]
    if not texts:
        where = f" in field {text_field!r}" if path.suffix.lower() in JSON_SUFFIXES or not path.is_file() else ""
        raise UsageError(f"--data {data}: has no text{where} (the file is empty or its texts are blank)")
    return texts


def block_dataset(texts: list[str], tokenizer, max_length: int):
    """Concatenate the tokenized texts and cut them into blocks of `max_length` tokens (labels = input ids)."""
    import torch

    if max_length < 2:
        raise UsageError(f"--max_length {max_length} is not valid: expected at least 2 tokens a block")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + eos
    if not ids:
        raise UsageError("--data: the texts tokenize to nothing")
    n = max(len(ids) // max_length, 1)
    ids = (ids * math.ceil(n * max_length / len(ids)))[: n * max_length]
    blocks = torch.tensor(ids).view(n, max_length)

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            return {"input_ids": blocks[i], "labels": blocks[i]}

    return Blocks()
