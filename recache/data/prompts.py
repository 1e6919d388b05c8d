"""Prompt files for training and searching schedules on a diffusers pipeline: ``.txt`` (one prompt per line),
``.jsonl`` (one ``{"prompt": ..., "negative_prompt": ...}`` object per line) or ``.csv`` (a ``prompt`` column and an
optional ``negative_prompt`` column). Each prompt becomes a dict of pipeline arguments."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from recache.errors import RecacheError

PROMPT_KEYS = ("prompt", "negative_prompt")


def _checked(rows: list[dict], path: Path) -> list[dict]:
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise RecacheError(f"prompts file {path}: entry {i} has no non-empty 'prompt'")
        extra = set(row) - set(PROMPT_KEYS)
        if extra:
            raise RecacheError(f"prompts file {path}: entry {i} has unknown keys {sorted(extra)}; "
                               f"allowed: {', '.join(PROMPT_KEYS)}")
    if not rows:
        raise RecacheError(f"prompts file {path} holds no prompts")
    if len({tuple(sorted(row)) for row in rows}) > 1:
        raise RecacheError(f"prompts file {path}: give a negative_prompt for every prompt or for none")
    return rows


def _lines(text: str, path: Path) -> list[str]:
    """The lines of a one-prompt-per-line file; an empty line before the last prompt is refused (it would shift the
    conditions, which are numbered by line), empty lines at the end are ignored."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if (empty := next((i for i, line in enumerate(lines, start=1) if not line.strip()), None)) is not None:
        raise RecacheError(f"prompts file {path}: line {empty} is empty; give one prompt per line, without empty "
                           "lines (prompts are numbered by line)")
    return lines


def load_prompts(path: str | os.PathLike) -> list[dict]:
    """The prompts of a ``.txt``, ``.jsonl`` or ``.csv`` file as pipeline keyword arguments, in file order."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecacheError(f"prompts file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecacheError(f"prompts file {path} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    suffix = path.suffix.lower()
    if suffix in (".txt", ".jsonl"):
        lines = _lines(text, path)
        if suffix == ".txt":
            return _checked([{"prompt": line.strip()} for line in lines], path)
        rows = []
        for i, line in enumerate(lines, start=1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RecacheError(f"prompts file {path}: line {i} is not valid JSON ({e.msg})") from None
        return _checked(rows, path)
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if "prompt" not in (reader.fieldnames or []):
            raise RecacheError(f"prompts file {path}: the CSV needs a 'prompt' column (has {reader.fieldnames})")
        return _checked([{k: v for k, v in row.items() if k in PROMPT_KEYS and v is not None} for row in reader], path)
    raise RecacheError(f"prompts file {path}: unknown format {suffix or '(no suffix)'}; use .txt, .jsonl or .csv")
