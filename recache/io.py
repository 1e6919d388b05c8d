"""Artefact files: atomic output (write to a temporary file beside the target, then rename, so no half-written file
is left), JSON input with clear errors, and the one JSONL reader and writer (logs, memos, rows)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import save_file

from recache.errors import RecacheError

# JSON artefacts (schedules, configs, calibrations) are kilobytes; refuse what cannot be one
MAX_JSON_BYTES = 64 * 2**20


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The objects of a JSONL file, one a line; a missing file has none. A line that is cut (an interrupted write),
    damaged or not an object is skipped: readers check the fields they need and redo the work a lost line held."""
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError, ValueError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_json(path: str | os.PathLike, what: str):
    """The parsed JSON of an artefact file, or a ``RecacheError`` that names ``what`` it is and why it cannot be
    read."""
    try:
        size = Path(path).stat().st_size
        if size > MAX_JSON_BYTES:
            raise RecacheError(f"{what} {path} is {size / 2**20:.0f} MiB; "
                               f"an artefact file has at most {MAX_JSON_BYTES // 2**20} MiB")
        return json.loads(Path(path).read_text())
    except RecursionError:
        raise RecacheError(f"{what} {path} cannot be read as JSON (nested too deeply)") from None
    except FileNotFoundError:
        raise RecacheError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecacheError(f"{what} {path} cannot be read as JSON (not valid JSON: {e})") from None
    except OSError as e:
        raise RecacheError(f"{what} {path} cannot be read ({e.strerror})") from None


def check_fields(data: dict, cls, what: str, optional: tuple[str, ...] = ()) -> None:
    """The keys of ``data`` are the fields of dataclass ``cls`` (all of them but ``optional``), or a ``RecacheError``
    that lists the unknown and missing ones (names shown with repr, so a damaged key cannot break the line)."""
    known = {f.name for f in fields(cls)}
    required = known - set(optional)
    unknown, missing = sorted(map(repr, set(data) - known)), sorted(required - set(data))
    if unknown or missing:
        parts = [f"unknown {', '.join(unknown)[:200]}" if unknown else "",
                 f"missing {', '.join(missing)}" if missing else ""]
        raise RecacheError(f"{what} has missing or unknown fields: {'; '.join(p for p in parts if p)}")


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor that holds NaN or inf, or None (weights and checkpoints)."""
    return next((name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
