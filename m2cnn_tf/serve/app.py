"""The grader's web page and HTTP API: FastAPI routes around one loaded `Grader`.

    GET  /            the page: upload photographs, see grades and Grad-CAM, download a CSV
    POST /            the token form (with a token): sets the cookie, back to /
    GET  /healthz     {"status": "ok"}, answered while a batch computes; 503 once the model's
                      batcher has stopped
    GET  /v1/model    the model panel's facts (stage, resolution, preset, val kappa, data)
    POST /v1/grade    multipart parts named `files` (one or many), ?gradcam=1 for the panels
    GET  /docs        OpenAPI docs (Swagger UI served from the package: works offline)

Each file is decoded and preprocessed on a worker thread, then graded in a micro-batch on the
model thread (`batching.MicroBatcher`): the event loop only moves bytes. A grading request is
admitted within the memory budget and the queue bound (`admission`), or answered 503 with
Retry-After at once; if its client goes away, its images leave the queue. With a token, every
route but /healthz and the static files needs `Authorization: Bearer TOKEN` or the cookie that
the token form (or opening the page once as `/?token=TOKEN`) sets; wrong tokens are limited per
client (429). Uploads stay in memory; neither their names nor their bytes are logged. The whole
app sits inside `guard.Guard` (hosts, origins, headers, the access log).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import swagger_ui_bundle
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from m2cnn_tf import __version__
from m2cnn_tf.common import IMAGE_EXTENSIONS
from m2cnn_tf.config import NUM_CLASSES
from m2cnn_tf.decoding import pixel_limit
from m2cnn_tf.metrics import REFERABLE_GRADE
from m2cnn_tf.prediction import CSV_COLUMNS, CSV_TEXT_COLUMNS, FORMULA_PREFIXES
from m2cnn_tf.serve import access
from m2cnn_tf.serve.admission import Admission, Busy, TooLarge
from m2cnn_tf.serve.batching import MicroBatcher
from m2cnn_tf.serve.grader import NOTICE, Grader, Job, Prepared
from m2cnn_tf.serve.guard import Guard, HostRule, csp_with_inline_scripts, describe
from m2cnn_tf.serve.uploads import FIELD, MB, Limits, RequestRefused, read_uploads

HERE = Path(__file__).resolve().parent
log = logging.getLogger("m2cnn_tf.serve")
templates = Jinja2Templates(directory=HERE / "templates")
GRADING_FAILED = "the server could not grade this image (its model call failed)"


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """serve.py's request, admission and batching settings."""

    limits: Limits
    max_wait_ms: float = 20.0
    token: str | None = None
    workers: int = 2  # decoding and preprocessing threads
    max_inflight_bytes: int = 1024 * MB  # the memory budget, on top of the model
    max_queue: int = 64  # images admitted and not yet answered
    hosts: HostRule | None = None  # None: loopback names only (checked without a token)


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
# Routes

router = APIRouter()
protected = APIRouter(dependencies=[Depends(access.require_token)])


@router.get("/healthz", summary="Liveness: answers while a batch computes", response_model=None)
async def healthz(request: Request) -> dict[str, str] | JSONResponse:
    """503 once the model's batcher has stopped: the server can no longer grade anything."""
    if not request.app.state.batcher.alive:
        body = {"status": "failing", "detail": "the model's batcher has stopped"}
        return JSONResponse(body, status_code=503)
    return {"status": "ok"}


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page(request: Request, token: str | None = None) -> Response:
    """The page; with a token, `/?token=TOKEN` once stores it in a cookie and comes back (the
    token form posts instead, which keeps the token out of the address and the history)."""
    settings: ServeSettings = request.app.state.settings
    if settings.token and token is not None:
        return _open_with(request, token)
    given = access.presented(request)
    refused = access.refusal(request, given)
    if refused is not None:
        return _token_page(request, refused, wrong=bool(given))
    grader: Grader = request.app.state.grader
    context = {
        "facts": grader.facts(),
        "extensions": list(IMAGE_EXTENSIONS),
        "columns": list(CSV_COLUMNS),
        "csv_text_columns": list(CSV_TEXT_COLUMNS),
        "formula_prefixes": list(FORMULA_PREFIXES),
        "max_upload_mb": settings.limits.max_file_bytes / MB,
        "max_batch": grader.max_batch,
    }
    return templates.TemplateResponse(request, "index.html", context)


@router.post("/", include_in_schema=False)
async def token_form(request: Request) -> Response:
    """The token page's form: the token in the body, never in the address."""
    if not request.app.state.settings.token:
        return RedirectResponse("/", status_code=303)
    try:
        token = await access.form_token(request)
    except RequestRefused as err:
        return JSONResponse({"detail": err.reason}, status_code=err.status)
    return _open_with(request, token)


def _open_with(request: Request, token: str) -> Response:
    refused = access.refusal(request, token)
    if refused is not None:
        return _token_page(request, refused, wrong=bool(token))
    response = RedirectResponse("/", status_code=303)
    access.set_cookie(response, token, https=request.url.scheme == "https")
    return response


def _token_page(request: Request, refused: tuple[int, dict[str, str]], wrong: bool) -> Response:
    status, headers = refused
    context = {"wrong": wrong and status == 401, "limited": status == 429}
    return templates.TemplateResponse(request, "token.html", context, status, headers)


@protected.get("/v1/model", summary="The model panel's facts")
async def model_facts(request: Request) -> dict[str, Any]:
    facts = request.app.state.grader.facts()
    batcher: MicroBatcher = request.app.state.batcher
    settings: ServeSettings = request.app.state.settings
    admission: Admission = request.app.state.admission
    facts["serving"] = {
        "max_batch": batcher.max_batch,
        "max_wait_ms": settings.max_wait_ms,
        "max_upload_mb": settings.limits.max_file_bytes / MB,
        "max_files": settings.limits.max_files,
        "decoder_max_megapixels": pixel_limit() / 1e6,  # the decoders' own limit (serve.py's)
        "max_inflight_mb": settings.max_inflight_bytes / MB,
        "max_queue": settings.max_queue,
        "inflight_mb": round(admission.used / MB, 3),
        "images_admitted": admission.images,
        "images_queued": batcher.queued,
        "refused_busy": admission.refused,
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
        400: {"description": "an unusable multipart boundary"},
        413: {"description": "a file, the body or its fields over a limit, or too many files"},
        422: {"description": "no files, or not a multipart form"},
        503: {"description": "busy (memory budget or queue full): retry after Retry-After"},
    },
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def grade(request: Request, gradcam: bool = False) -> Response:
    """Parts named `files`, one or many. A file that cannot be graded gets its own `error`;
    the others are graded. The type is decided by content, not by name."""
    state = request.app.state
    try:
        with state.admission.ticket() as ticket:
            state.admission.check_queue()  # before reading a byte of the body
            uploads = await read_uploads(
                request.headers.get("content-type"),
                request.headers.get("content-length"),
                request.stream(),
                state.settings.limits,
                hold=ticket.hold_body,
            )
            ticket.admit(len(uploads), _input_bytes(state.grader.size, gradcam))
            results = await _grade_while_connected(request, uploads, gradcam)
    except RequestRefused as err:
        return JSONResponse({"detail": err.reason}, status_code=err.status)
    except TooLarge as err:
        return JSONResponse({"detail": err.reason}, status_code=413)
    except Busy as err:
        state.admission.refused += 1
        retry = {"Retry-After": str(state.batcher.retry_after())}
        return JSONResponse({"detail": err.reason}, status_code=503, headers=retry)
    except ClientDisconnect:
        results = None
    if results is None:  # the client went away: nobody reads this
        return Response(status_code=499)
    return JSONResponse({"results": results})


def _input_bytes(size: int, gradcam: bool) -> int:
    """Memory for one admitted image: its model input, and its Grad-CAM panel (two images wide,
    as PNG in base64 at most about as large) when asked for."""
    return size * size * 3 * (1 + 3 * gradcam)


async def _grade_while_connected(request: Request, uploads, gradcam: bool) -> list | None:
    """Every upload's result, in order; None if the client disconnects first (its images
    still waiting then leave the queue, and no model call grades them)."""
    state, loop = request.app.state, asyncio.get_running_loop()

    async def one(upload) -> dict[str, Any]:
        prepared: Prepared = await loop.run_in_executor(
            state.prep_pool, state.grader.prepare, upload.filename, upload.data
        )
        if prepared.image is None:
            return result_json(prepared, None, gradcam)
        try:
            (row,) = await state.batcher.submit([Job(prepared.image, gradcam)])
        except Exception as err:  # its model call failed, or the batcher stopped: this one only
            log.error("grading an image failed: %s", describe(err))
            return result_json(dataclasses.replace(prepared, error=GRADING_FAILED), None, gradcam)
        return result_json(prepared, row, gradcam)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(asyncio.gather(*(one(u) for u in uploads)))
    gone = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        work.cancel()  # no-op once done; else the images leave the queue
        await asyncio.gather(work, gone, return_exceptions=True)
    return work.result() if work in done else None


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


DOCS_HTML = get_swagger_ui_html(
    openapi_url="/openapi.json",
    title="M²CNN grader API",
    swagger_js_url="/docs-static/swagger-ui-bundle.js",
    swagger_css_url="/docs-static/swagger-ui.css",
    swagger_favicon_url="/docs-static/favicon-32x32.png",
).body.decode()


@protected.get("/docs", include_in_schema=False)
async def docs() -> HTMLResponse:
    return HTMLResponse(DOCS_HTML)


# ---------------------------------------------------------------------------------------------
# The application


def create_app(
    grader: Grader, settings: ServeSettings, on_ready: Callable[[], None] | None = None
) -> Guard:
    """The app around a loaded grader, inside its guard (`.app` is the FastAPI app); the
    micro-batcher starts (and warms the model up) with the app's lifespan, so the first request
    does not pay for tracing; then `on_ready()`. The requests share the memory budget less the
    decoding threads' slots (`grader.max_decode_bytes` each)."""
    slots = settings.workers * (grader.max_decode_bytes or 0)
    hosts = settings.hosts or HostRule.for_server("127.0.0.1", (), token=bool(settings.token))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.admission = Admission(settings.max_inflight_bytes - slots, settings.max_queue)
        app.state.limiter = access.FailureLimiter()
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
        log.error("%s %s failed: %s", request.method, request.url.path, describe(err))
        return JSONResponse({"detail": "the server failed (see its log)"}, 500)

    return Guard(app, hosts, docs_csp=csp_with_inline_scripts(DOCS_HTML))
