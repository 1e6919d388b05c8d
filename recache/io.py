"""Artefact files: atomic output (write to a temporary file beside the target, then rename, so no half-written file
is left), JSON input with clear errors, and the one JSONL reader and writer (logs, memos, rows)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
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
MAX_JSONL_BYTES = 256 * 2**20  # logs, memos and result rows: a few MiB at most


def output_target(path: str | os.PathLike) -> Path:
    """Where writing ``path`` puts the file: ``path`` itself, or the file a symbolic link there points to (the link
    stays a link). Refused when that is something other than a regular file (a folder, a device, a FIFO)."""
    target = Path(os.path.realpath(path))
    longest = os.pathconf(next((p for p in target.parents if p.exists()), Path("/")), "PC_NAME_MAX")
    if len(target.name.encode()) > longest:
        raise RecacheError(f"the file name of {path} has {len(target.name.encode())} bytes; this file system allows "
                           f"at most {longest}")
    if target.is_dir():
        raise RecacheError(f"output file {path} is a folder; give a file name")
    if target.exists() and not target.is_file():
        raise RecacheError(f"{path} exists and is not a regular file; give the path of a file to write")
    return target


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside the target (``output_target``); on success it replaces the target, keeping an
    existing file's permissions; on error it is removed and the previous file is left as it was. A write error (a
    full disk, a file-size limit, a name too long) is one ``RecacheError`` that says so."""
    target = output_target(path)
    existed = target.exists()
    tmp = None
    try:
        mode = target.stat().st_mode & 0o7777 if existed else 0o666 & ~_umask()
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:200]}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, mode)  # mkstemp makes 0600 files: give the target's, or the usual, permissions
        os.replace(tmp, target)
    except OSError as e:
        after = "the previous file is intact" if existed else "nothing was written"
        raise RecacheError(f"cannot write {path} ({e.strerror or e}); {after}") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


STALE = re.compile(r"\..+\.tmp|\.tmp[A-Za-z0-9]{6}")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files a run killed mid-write (SIGKILL, power loss) left in ``folder``: ``atomic_path``'s
    ``.<name>.<random>.tmp``, and ``.tmp<6 letters or digits>``, the file safetensors (0.8) writes a tensor file
    through before renaming it. Call it holding ``folder_lock``, so that no live writer's file is taken."""
    stale = [p for p in sorted(Path(folder).glob(".*")) if p.is_file() and STALE.fullmatch(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextmanager
def folder_lock(folder: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on the output folder while a run writes into it (``flock`` on the folder itself, so
    no lock file is left behind; the kernel releases it when the process ends, however it ends). A second run on
    the same folder is refused with one line. ``enabled=False`` (the ranks that do not write) holds nothing."""
    if not enabled:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RecacheError(f"another recache run is writing to {folder}; wait for it to end or choose another "
                               "--out") from None
        yield
    finally:
        os.close(fd)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_regular(path: str | os.PathLike, what: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes. The read itself is bounded, and a device, FIFO or
    folder is refused before it is opened, so no path can make a reader block or grow without end."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise RecacheError(f"{what} {path} is not a regular file")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise RecacheError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise RecacheError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    if len(data) > limit:
        raise RecacheError(f"{what} {path} is more than {limit // 2**20} MiB; an artefact file has at most "
                           f"{limit // 2**20} MiB")
    return data


def check_regular(path: str | os.PathLike, what: str) -> None:
    """Refuse a missing input, or one that is a folder, device or FIFO (a reader could block on it or read forever)."""
    if not os.path.exists(path):
        raise RecacheError(f"{what} {path} is missing")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise RecacheError(f"{what} {path} is not a regular file")


def state_mismatch(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """What keeps ``state`` from loading into ``module``: the first missing, unknown or reshaped tensor, by name and
    shapes; None when it fits."""
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    if missing := sorted(set(expected) - set(state)):
        return f"tensor {missing[0]!r} is missing from the file"
    if unknown := sorted(set(state) - set(expected)):
        return f"the file has an unknown tensor {unknown[0][:100]!r}"
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            return f"tensor {name!r} has shape {tuple(state[name].shape)} in the file, {shape} in the model"
    return None


def read_jsonl(path: str | os.PathLike, what: str = "JSONL file") -> list[dict]:
    """The objects of a JSONL file, one a line; a missing file has none. A line that is cut (an interrupted write),
    damaged or not an object is skipped: readers check the fields they need and redo the work a lost line held."""
    if not os.path.lexists(path):
        return []
    rows = []
    for line in read_regular(path, what, MAX_JSONL_BYTES).decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except (RecursionError, ValueError):  # damaged JSON, or an integer of more than 4,300 digits
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) < len(keys):
        twice = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"the key {twice[:100]!r} appears twice in one object")
    return dict(pairs)


def read_json(path: str | os.PathLike, what: str):
    """The parsed JSON of an artefact file, or a ``RecacheError`` that names ``what`` it is and why it cannot be
    read. An object that repeats a key is refused (which of the two would count is not for a reader to guess)."""
    data = read_regular(path, what, MAX_JSON_BYTES)
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except RecursionError:
        raise RecacheError(f"{what} {path} cannot be read as JSON (nested too deeply)") from None
    except UnicodeDecodeError as e:
        raise RecacheError(f"{what} {path} cannot be read as JSON (not valid JSON: {e})") from None
    except json.JSONDecodeError as e:
        raise RecacheError(f"{what} {path} cannot be read as JSON (not valid JSON: {e})") from None
    except ValueError as e:  # a repeated key, or an integer of more than 4,300 digits
        reason = "a number has more than 4300 digits" if "digits" in str(e) else str(e)
        raise RecacheError(f"{what} {path} cannot be read as JSON ({reason})") from None


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
