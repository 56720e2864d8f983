"""The server's API key, read once for every entry point (`cinemo-rt serve`, `serve run ...ray_app:app`)."""

from __future__ import annotations


def api_key(flag: str | None, environ) -> str | None:
    """--api-key, else CINEMO_API_KEY, else None (no key). An empty or blank key would silently turn
    authentication off, and a key with control characters cannot be sent in a header: both refused."""
    from ..image import InputError

    key, source = (flag, "--api-key") if flag is not None else (environ.get("CINEMO_API_KEY"), "CINEMO_API_KEY")
    if key is None:
        return None
    if not key.strip():
        raise InputError(f"{source} is empty; give a key, or leave {source} out to serve without one")
    if key != key.strip() or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise InputError(f"{source} has spaces at its ends or control characters, which HTTP headers cannot carry "
                         "intact; choose a key of printable characters")
    return key
