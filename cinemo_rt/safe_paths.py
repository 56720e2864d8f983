"""Where outputs may go: never over an input, never over a device or other non-regular file, an existing
output only when the caller says so, and into a folder only what the writer owns.

Pure `os`/`pathlib`, no heavy imports: the CLI runs these checks before loading anything.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable, Iterable


class OutputError(ValueError):
    """The output path cannot be written (missing or read-only folder, or a clash with existing data)."""


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when both paths name one existing file (links and `..` included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        try:
            return Path(a).resolve() == Path(b).resolve()
        except (OSError, RuntimeError):  # a symbolic link loop (RuntimeError before Python 3.13)
            return False


TEMP_NAME_EXTRA = len(".") + len(".12345678.tmp")  # what writers add around a name for their temporary


def check_name_length(path: str | os.PathLike) -> None:
    """A name the file system cannot hold (with the temporary's prefix and suffix) fails in milliseconds,
    not after the whole run: NAME_MAX of the folder (255 bytes on most), PATH_MAX for the whole path."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
        path_max = os.pathconf(parent, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    name_bytes = len(os.fsencode(path.name)) + TEMP_NAME_EXTRA
    if name_bytes > name_max or len(os.fsencode(str(path.absolute()))) + TEMP_NAME_EXTRA > path_max:
        raise OutputError(f"--out name {path.name[:40]!r}... is too long for this file system ({name_max} bytes "
                          f"a name, {path_max} a path, with room for the temporary); choose a shorter name")


def check_file_output(path: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = (),
                      is_folder_output: bool = False) -> None:
    """Refuse an output path that would destroy something: one of `inputs`, a non-regular file (device,
    fifo, socket), or any existing output unless `overwrite`. Folders of frames are checked by the writer."""
    path = Path(path)
    check_name_length(path)
    for source in inputs:
        if source is not None and same_file(path, source):
            raise OutputError(f"--out {str(path)!r} is the input {str(source)!r}; choose another output name")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise OutputError(f"cannot use --out {str(path)!r}: {err.strerror}") from err
    if stat.S_ISDIR(mode):
        if not is_folder_output:
            raise OutputError(f"--out {str(path)!r} is a folder; give a file name (e.g. {path / 'cinemo.mp4'})")
    elif not stat.S_ISREG(mode) or is_folder_output:
        kind = "a file" if stat.S_ISREG(mode) else "not a regular file (a device, pipe or socket)"
        raise OutputError(f"--out {str(path)!r} exists and is {kind}; refusing to write over it, choose "
                          "another output name")
    if not overwrite:
        raise OutputError(f"--out {str(path)!r} already exists; pass --overwrite to replace it, or choose "
                          "another output name")


PACKAGE_DIR = Path(__file__).resolve().parent


def check_outside_package(folder: str | os.PathLike, what: str) -> None:
    """Refuse a folder inside the installed package: in an editable install a training run exporting to
    `cinemo_rt/assets/demo` would silently replace the bundled demo weights every user runs."""
    resolved = Path(folder).resolve()
    if resolved == PACKAGE_DIR or PACKAGE_DIR in resolved.parents:
        raise OutputError(f"{what} {str(folder)!r} is inside the cinemo_rt package ({PACKAGE_DIR}); training "
                          "never writes there. Choose a run folder instead, e.g. runs/my_run")


def foreign_entries(folder: Path, owns: Callable[[str], bool]) -> list[str]:
    """Names in `folder` that `owns(name)` does not claim (hidden temporaries of ours are claimed)."""
    return sorted(name for name in os.listdir(folder) if not owns(name))


def check_owned_folder(folder: str | os.PathLike, owns: Callable[[str], bool], what: str) -> None:
    """An existing `folder` may be written into (or replaced) only when everything in it is ours to
    replace; otherwise refuse, listing what else is there. `what` says what we write ("a checkpoint")."""
    folder = Path(folder)
    try:
        foreign = foreign_entries(folder, owns)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise OutputError(f"{folder} exists and is not a folder; choose a new folder for {what}") from None
    if foreign:
        shown = ", ".join(foreign[:6]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 6 else "")
        raise OutputError(f"{folder} holds files that are not {what} ({shown}); refusing to write there so "
                          "nothing of yours is replaced. Choose a new or empty folder.")
