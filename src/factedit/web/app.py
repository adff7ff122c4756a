"""The ASGI app: one static page (HTML, JS, CSS shipped in the package) and JSON endpoints.

Nothing is fetched from elsewhere: the page uses the browser's own fonts, and a
Content-Security-Policy of ``'self'`` makes the browser refuse any outside resource.
Heavy work runs in :class:`~factedit.web.state.ServerState`; handlers only translate.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .state import NotFoundError, ServerState, WebInputError

#: Files of the page, served from the package (``factedit/web/static``).
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    # Only this server: no CDN, fonts, analytics or other outside resource can load.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _static(name: str) -> bytes:
    return resources.files("factedit.web").joinpath("static", name).read_bytes()


LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}


def _host_name(host_header: str) -> str:
    return urlsplit("//" + host_header).hostname or ""


def create_app(state: ServerState, *, loopback_only: bool = True) -> FastAPI:
    """A FastAPI app serving the page and the API for ``state``'s model.

    Other web sites open in the same browser must not drive the model: a request that changes
    something is refused when it comes from a page of another origin (its ``Origin`` header
    differs from the ``Host`` it was sent to), and with ``loopback_only`` (a server listening on
    127.0.0.1) only requests addressed to a loopback name are served, which defeats DNS
    rebinding.
    """
    app = FastAPI(title="factedit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.factedit = state

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Any:
        host = request.headers.get("host", "")
        if loopback_only and _host_name(host) not in LOOPBACK_NAMES:
            return JSONResponse(
                {"error": f"this server answers only to 127.0.0.1/localhost, not {host!r}"},
                status_code=403,
            )
        origin = request.headers.get("origin")
        if request.method not in ("GET", "HEAD") and origin and urlsplit(origin).netloc != host:
            return JSONResponse(
                {"error": f"requests from {origin} are not accepted"}, status_code=403
            )
        response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    @app.exception_handler(WebInputError)
    async def bad_input(request: Request, exc: WebInputError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(NotFoundError)
    async def not_found(request: Request, exc: NotFoundError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return JSONResponse({"error": "bad request: " + "; ".join(parts)}, status_code=400)

    async def body(request: Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise WebInputError("the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise WebInputError("the request body must be a JSON object")
        return data

    def page(name: str) -> Response:
        return Response(_static(name), media_type=STATIC_FILES[name])

    @app.get("/")
    async def index() -> Response:
        return page("index.html")

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise NotFoundError(f"no file {name!r}")
        return page(name)

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        return state.info()

    @app.post("/api/edit")
    async def submit_edit(request: Request) -> dict[str, Any]:
        payload = await body(request)
        return {"job": await run_in_threadpool(state.submit_edit, payload)}

    @app.post("/api/trace")
    async def submit_trace(request: Request) -> dict[str, Any]:
        payload = await body(request)
        return {"job": state.submit_trace(payload)}

    @app.get("/api/jobs/{job_id}")
    async def job(job_id: str) -> dict[str, Any]:
        return state.job(job_id)

    @app.get("/api/edits")
    async def edits() -> dict[str, Any]:
        return {"edits": state.edits()}

    @app.post("/api/edits/{edit_id}/revert")
    async def revert(edit_id: str) -> dict[str, Any]:
        reverted = await run_in_threadpool(state.revert, edit_id)
        return {"reverted": reverted, "edits": state.edits()}

    @app.post("/api/revert-all")
    async def revert_all() -> dict[str, Any]:
        reverted = await run_in_threadpool(state.revert_all)
        return {"reverted": reverted, "edits": state.edits()}

    @app.get("/api/edits.safetensors")
    async def download() -> Response:
        data = await run_in_threadpool(state.download)
        return Response(
            data,
            media_type="application/octet-stream",
            headers={"Content-Disposition": 'attachment; filename="factedit-edits.safetensors"'},
        )

    @app.post("/api/upload")
    async def upload(file: UploadFile = File(...)) -> dict[str, Any]:  # noqa: B008 (FastAPI idiom)
        data = await file.read(state.info()["limits"]["upload_bytes"] + 1)
        entry = await run_in_threadpool(state.upload, data, file.filename or "upload.safetensors")
        return {"edit": entry, "edits": state.edits()}

    @app.post("/api/lens")
    async def lens(request: Request) -> dict[str, Any]:
        payload = await body(request)
        return await run_in_threadpool(state.lens, payload)

    @app.post("/api/generate")
    async def gen(request: Request) -> dict[str, Any]:
        payload = await body(request)
        return await run_in_threadpool(state.generate, payload)

    return app


def bind(host: str = "127.0.0.1", port: int = 7860) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port). Raises ``OSError`` with the
    address when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock


def _is_loopback(sock: socket.socket) -> bool:
    import ipaddress

    return ipaddress.ip_address(sock.getsockname()[0]).is_loopback


def make_server(state: ServerState, sock: socket.socket, *, log_level: str = "warning") -> Any:
    """A uvicorn server for ``state`` that will listen on ``sock`` (not started)."""
    import uvicorn

    app = create_app(state, loopback_only=_is_loopback(sock))
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off")
    return uvicorn.Server(config)


def serve(state: ServerState, sock: socket.socket, *, log_level: str = "warning") -> None:
    """Serve on ``sock`` until interrupted (Ctrl-C)."""
    server = make_server(state, sock, log_level=log_level)
    try:
        server.run(sockets=[sock])
    finally:
        state.close()


@contextlib.contextmanager
def running_server(
    state: ServerState, host: str = "127.0.0.1", port: int = 0, *, timeout: float = 30.0
) -> Iterator[str]:
    """Run a server in a background thread; yield its base URL; stop it on exit.

    For tests, benchmarks and notebooks. The server is accepting connections when the URL is
    yielded. ``state`` stays usable afterwards (a new server may serve it); the caller owns it
    and calls ``state.close()`` when done.
    """
    sock = bind(host, port)
    server = make_server(state, sock)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="factedit-web-server", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the web server did not start")
        time.sleep(0.01)
    addr = sock.getsockname()
    shown = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
    try:
        yield f"http://{shown}:{addr[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
