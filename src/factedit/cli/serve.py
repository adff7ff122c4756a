"""``factedit serve``: the local web page (see :mod:`factedit.web`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from .common import add_model_args, load, status


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="a local web page to edit the model, compare generations, locate facts and undo",
        description=(
            "Load one model and serve a web page for it: edit (any method), compare generations "
            "before/after, list, revert, download and upload edits, causal tracing and the logit "
            "lens. Everything is served by this process (no CDN, fonts or telemetry); it listens "
            "on 127.0.0.1 unless --host says otherwise. Needs: pip install 'factedit[web]'."
        ),
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")
    add_model_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401

        from ..web import ServerState, bind, serve
    except ImportError as exc:
        raise RuntimeError(
            f"the web page needs FastAPI and uvicorn ({exc.name} is missing): pip install 'factedit[web]'"
        ) from None
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    sock = bind(args.host, args.port)  # before loading: a taken port fails in a second
    try:
        model, tok = load(args)
        state = ServerState(model, tok, model_name=args.model or "SmolLM2-135M-Instruct")
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        # The page's default test prompts, generated once in the background: the first
        # edit then only generates the "after" column.
        state.warm_up()
        status(f"factedit is serving {state.model_name} on http://{shown}:{port}/ (Ctrl-C stops)")
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a server stops
            serve(state, sock, log_level=args.log_level)
        status("stopped")
        if state.busy():
            # A job (an edit, a trace) is still computing in its thread; its result would be
            # thrown away, and torch must not be torn down under it at interpreter exit.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    finally:
        sock.close()
    return 0
