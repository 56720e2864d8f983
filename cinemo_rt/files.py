"""Small helpers for reading user files with clear errors and writing outputs atomically."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable


class FileFormatError(ValueError):
    """A file the user gave cannot be parsed; the message names the file."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_default_mode(path: str | os.PathLike) -> None:
    """`tempfile.mkstemp`/`mkdtemp` create 0600 files and 0700 folders; once renamed into place they are
    the user's output, so give them the mode a plain `open`/`mkdir` would have (0666/0777 less the umask)."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from `path`; any parse or type problem is one `FileFormatError` naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FileFormatError(f"{path} is not valid JSON ({err}); fix or replace the file") from err
    except OSError as err:
        raise FileFormatError(f"cannot read {path}: {err.strerror or err}") from err
    if not isinstance(data, dict):
        raise FileFormatError(f"{path} holds a JSON {type(data).__name__}, expected an object {{...}}")
    return data


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


_DEST_TAKEN = (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR)


def swap_in_folder(tmp: str | os.PathLike, dest: str | os.PathLike,
                   check_replaceable: Callable[[Path], None] = lambda dest: None, attempts: int = 100) -> None:
    """Rename the finished folder `tmp` to `dest`. An existing `dest` is first checked with
    `check_replaceable` (which raises to refuse), then renamed aside and removed. Safe against a concurrent
    writer of the same `dest`: a destination that appears or vanishes between the steps is retried, so one
    complete folder ends up there and the loser's temporaries are gone."""
    tmp, dest = Path(tmp), Path(dest)
    for attempt in range(attempts):
        if attempt:
            time.sleep(random.uniform(0, 0.002 * min(attempt, 10)))  # let the other writer finish its swap
        try:
            os.rename(tmp, dest)  # fails when dest exists and is not an empty folder
            return
        except OSError as err:
            if err.errno not in _DEST_TAKEN:
                raise
        try:
            check_replaceable(dest)
        except FileNotFoundError:
            continue  # it vanished while being checked (a concurrent writer): try the rename again
        aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
        try:
            os.rename(dest, aside / "old")
        except FileNotFoundError:
            pass  # another writer moved it first; try again
        finally:
            shutil.rmtree(aside, ignore_errors=True)
    raise OSError(errno.EBUSY, f"{dest} keeps changing under another writer; try again")
