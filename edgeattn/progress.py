"""Progress of long steps: the library reports it, its caller decides whether and how to show it.

A progress callback is called as ``progress(step, done=None, total=None)``: ``step`` says
what runs now (a new text starts a new step), ``done`` of ``total`` how far a counted step
is. The API's entry points (``convert``, ``validate``, ``quality_report``) take one as
``progress=`` and, through ``@reports_progress``, make it the current one for the length
of the call, so that an inner loop (layer fits, distillation steps, perplexity windows)
reports with ``report`` without a parameter passed through every function in between.
Library code never prints.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol


class Progress(Protocol):
    def __call__(self, step: str, done: int | None = None, total: int | None = None) -> None: ...


_current: ContextVar[Progress | None] = ContextVar("edgeattn_progress", default=None)


@contextmanager
def reporting(progress: Progress | None) -> Iterator[None]:
    """Within ``with``: ``report`` goes to ``progress`` (None: nowhere)."""
    token = _current.set(progress)
    try:
        yield
    finally:
        _current.reset(token)


def report(step: str, done: int | None = None, total: int | None = None) -> None:
    """Tell the current progress callback, if any, that ``step`` runs (``done`` of ``total``)."""
    progress = _current.get()
    if progress is not None:
        progress(step, done, total)


def reports_progress(function: Callable) -> Callable:
    """Decorator: ``function``'s ``progress`` argument also receives the ``report`` calls made during it."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        progress = signature.bind(*args, **kwargs).arguments.get("progress")
        if progress is None:  # an outer call's callback, if any, stays the current one
            return function(*args, **kwargs)
        with reporting(progress):
            return function(*args, **kwargs)

    return wrapper
