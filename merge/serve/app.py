"""The HTTP side: a FastAPI app with OpenAI's routes over a :class:`~merge.serve.service.Service`.

- ``POST /v1/chat/completions``: OpenAI's chat format (:mod:`merge.serve.schema`), answered whole or, with
  ``stream: true``, as server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``);
- ``GET /v1/models`` (and ``/v1/models/{id}``), ``GET /health``, and the chat page at ``/``.

Errors are OpenAI's JSON (:mod:`merge.serve.errors`) with the status that fits, never a traceback; the server goes
on serving. A client that goes away has its request cancelled (the engine drops its row at the next step). Each
request's events reach its handler through its own unbounded queue (at most ``max_tokens`` pieces), so a slow reader
holds only its own answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.requests import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from merge.contract.reading import load_json
from merge.errors import MergeError
from merge.runtime.engine import Failed, Finished, Piece
from merge.runtime.engine import Request as EngineRequest

from .errors import ApiError, bad_request
from .schema import ChatRequest, parse_chat_request
from .service import Service

log = logging.getLogger(__name__)

PREPARE_THREADS = 4  # requests whose media are fetched and decoded at once (the rest wait their turn)
DRAIN_FACTOR = 4  # a body past the limit is read on (and dropped) up to this many times it, so the client hears 413
FAILED_STATUS = {"bad_input": 400, "unavailable": 503, "internal": 500}


def page() -> str:
    return resources.files("merge.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(service: Service | None = None, *, close_on_shutdown: bool = True) -> FastAPI:
    """The app over ``service`` (or over ``app.state.service``, set later: a Ray Serve replica sets its own)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if close_on_shutdown and app.state.service is not None:
            await anyio.to_thread.run_sync(app.state.service.close)

    app = FastAPI(title="qwen3vl-merge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service = service
    app.state.limiter = None

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), code=code).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:  # pragma: no cover
        return JSONResponse(bad_request(f"the request is malformed ({exc.errors()[:1]})").body(), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=exc)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        error = ApiError(500, f"unexpected {type(exc).__name__} in the server: {first}", code="internal_error")
        return JSONResponse(error.body(), status_code=500)

    def serving(request: Request) -> Service:
        service = request.app.state.service
        if service is None:
            raise ApiError(503, "the model is still loading", code="loading")
        return service

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page())

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        service = serving(request)
        stats = service.engine.stats()
        closed = service.engine.closed
        return JSONResponse({"status": "stopped" if closed else "ok", "model": service.name, **stats},
                            status_code=503 if closed else 200)

    def model_card(service: Service) -> dict[str, Any]:
        return {"id": service.name, "object": "model", "created": service.created, "owned_by": "qwen3vl-merge"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [model_card(serving(request))]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> dict[str, Any]:
        service = serving(request)
        if model_id != service.name:
            raise _unknown_model(model_id, service)
        return model_card(service)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        service = serving(request)
        chat = parse_chat_request(await _read_json(request, service.options.max_request_bytes),
                                  service.options.max_tokens)
        if chat.model != service.name:
            raise _unknown_model(chat.model, service)
        service.check_room()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(event) -> None:  # the engine's thread: hand over, never wait
            loop.call_soon_threadsafe(events.put_nowait, event)

        if request.app.state.limiter is None:
            request.app.state.limiter = anyio.CapacityLimiter(PREPARE_THREADS)
        handle = await anyio.to_thread.run_sync(service.start, chat, sink, limiter=request.app.state.limiter)
        answer = _Answer(service, chat, handle, events, request)
        try:
            first = await answer.next()
        except BaseException:
            handle.cancel()
            raise
        if first is None:  # the client went away before the first token
            return Response(status_code=499)
        if isinstance(first, Failed):
            raise ApiError(FAILED_STATUS.get(first.kind, 500), first.message)
        if chat.stream:
            return StreamingResponse(answer.stream(first), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await answer.whole(first)

    return app


def _unknown_model(name: str, service: Service) -> ApiError:
    return ApiError(404, f"the model {name[:100]!r} is not served here; this server serves {service.name!r} "
                         "(GET /v1/models)", param="model", code="model_not_found")


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON, at most ``limit`` bytes (413 past it, after reading on a little so the client hears it)."""
    length = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body is larger than the {limit} bytes this server takes "
                              "(--max-request-bytes)", code="request_too_large")
    if length.isdigit() and int(length) > DRAIN_FACTOR * limit:
        raise too_large
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            body += chunk
        elif size > DRAIN_FACTOR * limit:
            break
    if size > limit:
        raise too_large
    try:
        return load_json(bytes(body), "the request body")
    except MergeError as exc:
        raise bad_request(str(exc)) from None


class _Answer:
    """One request's events, as a whole response or as server-sent events; the request is cancelled when the client
    goes away (its connection's ``http.disconnect``) or the handler is cancelled."""

    def __init__(self, service: Service, chat: ChatRequest, handle: EngineRequest, events: asyncio.Queue,
                 request: Request):
        self.service, self.chat, self.handle, self.events, self.request = service, chat, handle, events, request
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._gone: asyncio.Task | None = None

    async def _disconnected(self) -> None:
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                return

    async def next(self):
        """The next event, or None once the client is gone (the request then cancelled)."""
        if self._gone is None:
            self._gone = asyncio.ensure_future(self._disconnected())
        getter = asyncio.ensure_future(self.events.get())
        try:
            await asyncio.wait({getter, self._gone}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            getter.cancel()
            raise
        if getter.done():
            return getter.result()
        getter.cancel()
        self.handle.cancel()
        return None

    def close(self) -> None:
        if self._gone is not None:
            self._gone.cancel()

    def _usage(self, finished: Finished) -> dict[str, int]:
        return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
                "total_tokens": finished.prompt_tokens + finished.completion_tokens}

    async def whole(self, event) -> Response:
        try:
            while not isinstance(event, Finished | Failed):
                event = await self.next()
                if event is None:
                    return Response(status_code=499)
        finally:
            self.close()
        if isinstance(event, Failed):
            raise ApiError(FAILED_STATUS.get(event.kind, 500), event.message)
        return JSONResponse({
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.service.name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": event.text}, "logprobs": None,
                         "finish_reason": event.finish_reason}],
            "usage": self._usage(event),
        })

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> str:
        chunk: dict[str, Any] = {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.service.name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.chat.include_usage:
            chunk["usage"] = None
        return _sse(chunk)

    async def stream(self, event) -> AsyncIterator[str]:
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            while event is not None:
                if isinstance(event, Piece):
                    yield self._chunk({"content": event.text})
                elif isinstance(event, Failed):
                    error = ApiError(FAILED_STATUS.get(event.kind, 500), event.message)
                    yield _sse(error.body())
                    return
                elif isinstance(event, Finished):
                    yield self._chunk({}, event.finish_reason)
                    if self.chat.include_usage:
                        yield _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                    "model": self.service.name, "system_fingerprint": None, "choices": [],
                                    "usage": self._usage(event)})
                    yield "data: [DONE]\n\n"
                    return
                event = await self.next()
        finally:  # the client went away (the response was cancelled) or the answer ended: either way, stop it
            self.handle.cancel()
            self.close()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


@contextlib.contextmanager
def background_server(service: Service, host: str = "127.0.0.1", port: int = 0, *,
                      close: bool = True) -> Iterator[str]:
    """uvicorn serving the app over ``service`` in a thread of this process (port 0: a free one); yields the base URL
    (``http://HOST:PORT``) once it listens, and stops it after (closing ``service`` when ``close``). For tests,
    benchmarks and notebooks; ``python -m merge serve`` runs uvicorn in the main thread."""
    import uvicorn

    config = uvicorn.Config(create_app(service, close_on_shutdown=close), host=host, port=port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise MergeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(30)
