"""Small helpers for writing outputs atomically with ordinary permissions."""

from __future__ import annotations

import os


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_default_mode(path: str | os.PathLike) -> None:
    """`tempfile.mkstemp`/`mkdtemp` create 0600 files and 0700 folders; once renamed into place they are
    the user's output, so give them the mode a plain `open`/`mkdir` would have (0666/0777 less the umask)."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file, read in 16 MiB blocks (engines and external data are gigabytes)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
