"""cinemo-rt: a fast inference runtime for Cinemo image animation.

`from cinemo_rt import Animator, Request, EditRequest`; heavy imports (torch, PyAV) happen on first use.
"""

__version__ = "0.1.0"
__all__ = ["Animator", "Request", "EditRequest"]


def __getattr__(name):
    if name == "Animator":
        from .pipeline import Animator

        return Animator
    if name in ("Request", "EditRequest"):
        from . import request

        return getattr(request, name)
    raise AttributeError(f"module 'cinemo_rt' has no attribute {name!r}")
