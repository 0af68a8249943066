"""JSONL reading with line-numbered errors, and atomic writes (temporary file + rename)."""

from __future__ import annotations

import codecs
import gzip
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhf.errors import UserError


def parse_jsonl(lines: Iterable[str], name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, object) for each non-blank line of `lines` (a file or stdin); a malformed line
    raises UserError naming `name` and the line."""
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{name}:{line_no}: not valid JSON ({exc.msg})") from None
        except (ValueError, RecursionError) as exc:  # an integer of over 4300 digits; absurd nesting
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
            raise UserError(f"{name}:{line_no}: not valid JSON ({reason})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{name}:{line_no}: expected a JSON object, got {type(obj).__name__}")
        yield line_no, obj


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """`parse_jsonl` over a UTF-8 file, gzip-compressed when its name ends in .gz (a leading byte-order mark is
    allowed); a missing or unreadable file, a broken gzip stream, or a line that is not UTF-8, raises UserError
    (naming the line)."""
    path = Path(path)
    try:
        handle = gzip.open(path, "rb") if path.suffix.lower() == ".gz" else path.open("rb")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with handle:
        try:
            yield from parse_jsonl(_utf8_lines(handle, str(path)), str(path))
        except (OSError, EOFError) as exc:  # gzip: not gzip data, or cut short
            raise UserError(f"{path}: cannot read as gzip ({exc})") from None


def _utf8_lines(handle, name: str) -> Iterator[str]:
    """The lines of a binary file as text, decoded one by one so that an error can name its line."""
    for line_no, raw in enumerate(handle, start=1):
        if line_no == 1 and raw.startswith(codecs.BOM_UTF8):  # what some Windows editors write first
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{name}:{line_no}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                            f"{exc.start + 1})") from None


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside `path`; rename it over `path` only if the block succeeds.

    A crash or an exception leaves any previous file untouched and no half-written output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically, one JSON object per line; returns the row count."""
    count = 0
    with atomic_write(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def replace_folder(target: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a temporary folder beside `target`, then swap it in: a failure leaves the previous
    folder (if any) whole and nothing half-written."""
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    old = None
    try:
        write(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target
