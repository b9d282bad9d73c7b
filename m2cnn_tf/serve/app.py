"""The grader's web page and HTTP API: FastAPI routes around one loaded `Grader`.

    GET  /            the page: upload photographs, see grades and Grad-CAM, download a CSV
    GET  /healthz     {"status": "ok"}, answered while a batch computes
    GET  /v1/model    the model panel's facts (stage, resolution, preset, val kappa, data)
    POST /v1/grade    multipart parts named `files` (one or many), ?gradcam=1 for the panels
    GET  /docs        OpenAPI docs (Swagger UI served from the package: works offline)

Each file is decoded and preprocessed on a worker thread, then graded in a micro-batch on the
model thread (`batching.MicroBatcher`): the event loop only moves bytes. With a token, every
route but /healthz and the static files needs `Authorization: Bearer TOKEN` or the cookie that
opening the page once as `/?token=TOKEN` sets. Uploads stay in memory; neither their names nor
their bytes are logged (the access log has method, path without query, status and time).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import swagger_ui_bundle
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field

from m2cnn_tf import __version__
from m2cnn_tf.common import IMAGE_EXTENSIONS
from m2cnn_tf.config import NUM_CLASSES
from m2cnn_tf.metrics import REFERABLE_GRADE
from m2cnn_tf.prediction import CSV_COLUMNS
from m2cnn_tf.serve.batching import MicroBatcher
from m2cnn_tf.serve.grader import NOTICE, Grader, Job, Prepared
from m2cnn_tf.serve.uploads import FIELD, MB, Limits, RequestRefused, read_uploads

HERE = Path(__file__).resolve().parent
COOKIE = "m2cnn_token"
log = logging.getLogger("m2cnn_tf.serve")
templates = Jinja2Templates(directory=HERE / "templates")


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """serve.py's request and batching settings."""

    limits: Limits
    max_wait_ms: float = 20.0
    token: str | None = None
    workers: int = 2  # decoding and preprocessing threads


class GradeResult(BaseModel):
    """One file's result (the OpenAPI schema; responses are built as plain JSON)."""

    filename: str
    grade: int | None = Field(description="0-4 from the score and the cut points; null on error")
    score: float | None = Field(description="the regression output (§II-B)")
    probabilities: list[float] | None = Field(description="softmax over grades 0-4")
    referable: bool | None = Field(description="grade >= 2 (moderate NPDR or worse)")
    warnings: list[str] = Field(description="quality warnings: the grade may be less reliable")
    error: str | None = Field(description="why the file could not be graded, in one line")
    gradcam_png: str | None = Field(
        None, description="with ?gradcam=1: base64 PNG, preprocessed image beside its Grad-CAM"
    )


class GradeResponse(BaseModel):
    results: list[GradeResult]


_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": [FIELD],
                "properties": {
                    FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}
                },
            }
        }
    },
}


# ---------------------------------------------------------------------------------------------
# Access control


def _authorised(request: Request) -> bool:
    token = request.app.state.settings.token
    if not token:
        return True
    given = request.cookies.get(COOKIE, "")
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        given = header[7:].strip()
    return hmac.compare_digest(given.encode(), token.encode())


def require_token(request: Request) -> None:
    if not _authorised(request):
        raise HTTPException(
            401,
            "this server needs its token: send 'Authorization: Bearer TOKEN'",
            headers={"WWW-Authenticate": "Bearer"},
        )


# ---------------------------------------------------------------------------------------------
# Routes

router = APIRouter()
protected = APIRouter(dependencies=[Depends(require_token)])


@router.get("/healthz", summary="Liveness: answers while a batch computes")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page(request: Request, token: str | None = None) -> Response:
    """The page; with a token, `/?token=TOKEN` once stores it in a cookie and comes back."""
    settings: ServeSettings = request.app.state.settings
    if settings.token and token is not None:
        if not hmac.compare_digest(token.encode(), settings.token.encode()):
            return _token_page(request, wrong=True)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https"
        )
        return response
    if not _authorised(request):
        return _token_page(request, wrong=False)
    grader: Grader = request.app.state.grader
    context = {
        "facts": grader.facts(),
        "extensions": list(IMAGE_EXTENSIONS),
        "columns": list(CSV_COLUMNS),
        "max_upload_mb": settings.limits.max_file_bytes / MB,
        "max_batch": grader.max_batch,
    }
    return templates.TemplateResponse(request, "index.html", context)


def _token_page(request: Request, wrong: bool) -> Response:
    return templates.TemplateResponse(request, "token.html", {"wrong": wrong}, status_code=401)


@protected.get("/v1/model", summary="The model panel's facts")
async def model_facts(request: Request) -> dict[str, Any]:
    facts = request.app.state.grader.facts()
    batcher: MicroBatcher = request.app.state.batcher
    settings: ServeSettings = request.app.state.settings
    facts["serving"] = {
        "max_batch": batcher.max_batch,
        "max_wait_ms": settings.max_wait_ms,
        "max_upload_mb": settings.limits.max_file_bytes / MB,
        "max_files": settings.limits.max_files,
        "model_calls": batcher.calls,
        "images_graded": batcher.items,
    }
    return facts


@protected.post(
    "/v1/grade",
    summary="Grade photographs",
    response_model=None,
    responses={
        200: {"model": GradeResponse, "description": "one result per file, in order"},
        413: {"description": "a file over the size limit, or too many files"},
        422: {"description": "no files, or not a multipart form"},
    },
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def grade(request: Request, gradcam: bool = False) -> Response:
    """Parts named `files`, one or many. A file that cannot be graded gets its own `error`;
    the others are graded. The type is decided by content, not by name."""
    state = request.app.state
    try:
        uploads = await read_uploads(
            request.headers.get("content-type"),
            request.headers.get("content-length"),
            request.stream(),
            state.settings.limits,
        )
    except RequestRefused as err:
        return JSONResponse({"detail": err.reason}, status_code=err.status)
    loop = asyncio.get_running_loop()

    async def one(upload) -> dict[str, Any]:
        prepared: Prepared = await loop.run_in_executor(
            state.prep_pool, state.grader.prepare, upload.filename, upload.data
        )
        row = None
        if prepared.image is not None:
            (row,) = await state.batcher.submit([Job(prepared.image, gradcam)])
        return result_json(prepared, row, gradcam)

    results = await asyncio.gather(*(one(u) for u in uploads))
    return JSONResponse({"results": results})


def result_json(prepared: Prepared, row: dict[str, Any] | None, gradcam: bool) -> dict[str, Any]:
    """The API's object for one file, from predict.py's row (None when it was not graded)."""
    error = prepared.error or (row["error"] if row else None) or None
    out: dict[str, Any] = {
        "filename": prepared.filename,
        "grade": None,
        "score": None,
        "probabilities": None,
        "referable": None,
        "warnings": list(prepared.warnings),
        "error": error,
    }
    if row is not None and not error:
        probabilities = [row[f"p{k}"] for k in range(NUM_CLASSES)]
        out.update(
            grade=row["grade"],
            score=row["score"],
            probabilities=probabilities,
            referable=row["grade"] >= REFERABLE_GRADE,
        )
    if gradcam:
        out["gradcam_png"] = row.get("gradcam_png") if row is not None and not error else None
    return out


@protected.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@protected.get("/docs", include_in_schema=False)
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="M²CNN grader API",
        swagger_js_url="/docs-static/swagger-ui-bundle.js",
        swagger_css_url="/docs-static/swagger-ui.css",
        swagger_favicon_url="/docs-static/favicon-32x32.png",
    )


# ---------------------------------------------------------------------------------------------
# The application


class _AccessLogAndHeaders:
    """ASGI middleware: one log line per request without query string or body, and the
    headers that keep the page from being framed, sniffed or leaking its URL."""

    _PAGE_CSP = (
        b"default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
        b"base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    )

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 0
        docs = scope["path"] == "/docs"  # Swagger UI's page starts with an inline script

        async def send_with_headers(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff")]
                headers += [(b"referrer-policy", b"no-referrer")]
                if not docs:
                    headers += [(b"content-security-policy", self._PAGE_CSP)]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            seconds = time.perf_counter() - started
            log.info("%s %s %d %.3fs", scope["method"], scope["path"], status, seconds)


def create_app(
    grader: Grader, settings: ServeSettings, on_ready: Callable[[], None] | None = None
) -> FastAPI:
    """The app around a loaded grader; the micro-batcher starts (and warms the model up) with
    the app's lifespan, so the first request does not pay for tracing; then `on_ready()`."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher = MicroBatcher(
            grader.infer, max_batch=grader.max_batch, max_wait=settings.max_wait_ms / 1000
        )
        app.state.prep_pool = ThreadPoolExecutor(settings.workers, thread_name_prefix="prepare")
        await app.state.batcher.run_on_model_thread(grader.warm_up)
        app.state.batcher.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await app.state.batcher.stop()
            app.state.prep_pool.shutdown(wait=True)

    app = FastAPI(
        title="M²CNN grader",
        version=__version__,
        summary=f"Diabetic retinopathy grades (0-4) of fundus photographs; {NOTICE}.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.grader, app.state.settings = grader, settings
    app.include_router(router)
    app.include_router(protected)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.mount("/docs-static", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path))

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception) -> JSONResponse:
        log.error("%s %s failed: %s", request.method, request.url.path, type(err).__name__)
        return JSONResponse({"detail": f"the server failed: {type(err).__name__}"}, 500)

    app.add_middleware(_AccessLogAndHeaders)
    return app
