"""``factedit serve``: a local web page to edit a model, compare generations, locate facts
and undo edits.

Layering: this package imports the library and is imported by nobody in it (only by the CLI).
:class:`ServerState` holds the model and its edits; :func:`create_app` is the FastAPI app;
:func:`running_server` runs one in a background thread (tests, benchmarks, notebooks).
FastAPI, uvicorn and python-multipart come with ``pip install 'factedit[web]'``.
"""

from __future__ import annotations

from .app import bind, create_app, running_server, serve
from .state import NotFoundError, ServerState, WebInputError

__all__ = [
    "NotFoundError",
    "ServerState",
    "WebInputError",
    "bind",
    "create_app",
    "running_server",
    "serve",
]
