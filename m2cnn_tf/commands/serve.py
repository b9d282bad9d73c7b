"""Serve a trained stage as a web page and HTTP API that grade fundus photographs.

    python serve.py --model-dir DIR --stage N [--host 127.0.0.1] [--port 8000] [--max-batch 8]
        [--max-wait-ms 20] [--max-upload-mb 30] [--max-files 200] [--token TOKEN]
        [--max-inflight-mb 1024] [--max-queue 64] [--header-timeout 10] [--body-timeout 30]
        [--idle-timeout 5] [--allowed-hosts NAME,...]

Open http://127.0.0.1:8000/ for the page; the API is POST /v1/grade (multipart parts named
`files`, ?gradcam=1 for Grad-CAM), GET /v1/model, GET /healthz, docs at /docs. Grades equal
predict.py's for the same files. The model loads once; requests that arrive together are
graded in one model call of --max-batch images (padded, so a result never depends on the
load). Binds 127.0.0.1 unless told otherwise; elsewhere, pass --token (or set
M2CNN_SERVE_TOKEN; 16 characters at least): the page then asks for it once (kept in a cookie),
API clients send `Authorization: Bearer TOKEN`. Without a token, only requests for a loopback
name or the bound address are answered (--allowed-hosts adds names). Requests share a memory
budget (--max-inflight-mb) and a queue (--max-queue); past either they get 503 with Retry-After.
--port 0 picks a free port; the start-up line "serve.py: serving stage N on URL/ (Ctrl-C stops)"
says which. Plain HTTP: put a TLS proxy in front beyond a trusted network. Research use only, not
a medical device.
Exit codes: 0 stopped, 1 failed to start, 2 usage (bad flag, no checkpoint, port taken),
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import copy
import ipaddress
import os
import socket
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags

from m2cnn_tf import cli, common
from m2cnn_tf.commands import model_flags
from m2cnn_tf.errors import RunFailed, UsageError

TOKEN_ENV = "M2CNN_SERVE_TOKEN"
PROG = "serve.py"
_GRACEFUL_SECONDS = 30  # Ctrl-C: requests in progress get this long to finish
MIN_TOKEN_CHARS = 16  # ours: with 64 URL-safe characters, 96 bits

FLAGS = flags.FlagValues()
model_flags.define_stage(FLAGS, "Stage whose best checkpoint to serve (1, 2 or 3).")
model_flags.define_backend(FLAGS)
flags.DEFINE_string(
    "host",
    "127.0.0.1",
    "Address to listen on; anything but loopback exposes the grader to the network.",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "port",
    8000,
    "Port to listen on (0: any free port).",
    lower_bound=0,
    upper_bound=65535,
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "max-batch",
    8,
    "Images per model call: requests that arrive together share it; padded to this size, so a "
    "lone photograph costs a full call (lower it for a single user).",
    lower_bound=1,
    flag_values=FLAGS,
)
flags.DEFINE_float(
    "max-wait-ms",
    20.0,
    "How long the first image of a batch waits for others to join it.",
    lower_bound=0.0,
    flag_values=FLAGS,
)
flags.DEFINE_float(
    "max-upload-mb",
    30.0,
    "Largest file accepted (MB); larger ones get HTTP 413.",
    lower_bound=0.001,
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "max-files",
    200,
    "Most files in one request; more get HTTP 413.",
    lower_bound=1,
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "token",
    None,
    f"Require this bearer token for the page and the API (default: ${TOKEN_ENV}); at least "
    f"{MIN_TOKEN_CHARS} characters, e.g. from `python -c 'import secrets; "
    "print(secrets.token_urlsafe())'`.",
    flag_values=FLAGS,
)
flags.DEFINE_float(
    "max-inflight-mb",
    1024.0,
    "Memory budget (MB) for the requests in progress, on top of the model: their bodies, "
    "images and decoding; past it, HTTP 503 with Retry-After.",
    lower_bound=1.0,
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "max-queue",
    64,
    "Most images admitted and not yet answered (a request bigger than this is taken when "
    "nothing waits); past it, HTTP 503 with Retry-After.",
    lower_bound=1,
    flag_values=FLAGS,
)
flags.DEFINE_float(
    "header-timeout",
    10.0,
    "Seconds a client has to send a request's headers (HTTP 408, then the connection closes).",
    lower_bound=0.001,
    flag_values=FLAGS,
)
flags.DEFINE_float(
    "body-timeout",
    30.0,
    "Seconds of grace for a request's body, plus one for every 32 KB received (HTTP 408 for "
    "a slower one).",
    lower_bound=0.001,
    flag_values=FLAGS,
)
flags.DEFINE_float(
    "idle-timeout",
    5.0,
    "Seconds an idle keep-alive connection stays open.",
    lower_bound=0.001,
    flag_values=FLAGS,
)
flags.DEFINE_list(
    "allowed-hosts",
    [],
    "Host names (or addresses) the server answers for besides loopback and --host, e.g. the "
    "public name behind a reverse proxy; their pages may also post. Without a token only these "
    "are answered (anything else: HTTP 400); '*' answers any Host.",
    flag_values=FLAGS,
)
model_flags.define_grading(FLAGS)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    """A bound socket: the port is known (and printed) before the server starts, even for 0."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        raise UsageError(
            f"cannot listen on {host}:{port}: {err.strerror or err}", setting="port"
        ) from None
    return sock


def _body(rest: list[str]) -> int | None:
    if FLAGS["model-dir"].value is None:
        raise UsageError("pass the folder of the trained stages", setting="model_dir")
    if FLAGS.stage is None:
        raise UsageError("pass the stage to serve (1, 2 or 3)", setting="stage")
    cutpoints = model_flags.cutpoints(FLAGS)
    token = FLAGS.token or os.environ.get(TOKEN_ENV) or None
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise UsageError(
            f"must be at least {MIN_TOKEN_CHARS} characters (got {len(token)}; ${TOKEN_ENV} "
            "too), e.g. from python -c 'import secrets; print(secrets.token_urlsafe())'",
            setting="token",
        )
    if not _is_loopback(FLAGS.host):
        print(
            f"{PROG}: warning: listening on {FLAGS.host}, reachable from the network over plain "
            "HTTP; " + ("the token is required, but it and the photographs cross the network "
                        "unencrypted" if token else
                        "there is NO authentication: anyone who can reach this port can use the "
                        "grader (pass --token)"),
            file=sys.stderr,
        )  # fmt: skip
    with _listen(FLAGS.host, FLAGS.port) as sock:
        _serve(sock, token, cutpoints)


# Ours: glibc gives a thread that first allocates its own malloc arena, up to 8 per core, and an
# arena keeps what it once held. The model's activations, allocated by whichever TensorFlow
# thread runs each op, then spread over arenas and the resident size creeps up call by call,
# past --max-inflight-mb's accounting. Measured with tests/serve's 64 near-limit uploads (AMD EPYC,
# TensorFlow's Eigen kernels): the peak grew by 29-38 MB with two arenas, 45-70 MB without.
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process (threads that allocate later share them);
    False where the C library is not glibc (no mallopt to call)."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def limit_decoders() -> None:
    """The decoders' own pixel limit, the grader's (50 MP), for this process. OpenCV reads
    OPENCV_IO_MAX_IMAGE_PIXELS once, when cv2 is first imported, so this runs before anything
    imports it; `m2cnn_tf.decoding.pixel_limit` reads the same variable (named here, since
    importing decoding loads cv2) to hold Pillow to it, and Pillow's own bomb check gets it too.
    serve.py's process only: it decodes bytes from the network, where predict.py and data_prep
    decode the user's own files at OpenCV's default. Where cv2 is loaded already (serve run from
    a test's process) nothing is set, so that the decoders never disagree on the limit."""
    from m2cnn_tf.serve.image_headers import MAX_PIXELS  # pure Python: loads no decoder

    if "cv2" in sys.modules:
        print(f"{PROG}: warning: OpenCV was loaded first: the decoders keep their own default "
              "pixel limit (the header check still applies)", file=sys.stderr)  # fmt: skip
        return
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(MAX_PIXELS)
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def _serve(sock: socket.socket, token: str | None, cutpoints: list[float] | None) -> None:
    """Load the model once, then serve on `sock` until Ctrl-C or SIGTERM."""
    limit_malloc_arenas()
    limit_decoders()
    import uvicorn

    from m2cnn_tf.serve.admission import decode_slot
    from m2cnn_tf.serve.app import ServeSettings, create_app
    from m2cnn_tf.serve.connections import ConnectionLimits, GuardedH11Protocol
    from m2cnn_tf.serve.grader import Grader
    from m2cnn_tf.serve.guard import MAX_HEAD_BYTES, HostRule
    from m2cnn_tf.serve.uploads import MB, Limits

    workers = FLAGS.workers or min(4, os.cpu_count() or 1)
    budget = round(FLAGS["max-inflight-mb"].value * MB)
    limits = Limits(round(FLAGS["max-upload-mb"].value * MB), FLAGS["max-files"].value)
    slot = decode_slot(budget, workers)
    if budget - workers * slot < limits.max_file_bytes + 4 * MB:
        raise UsageError(
            f"leaves no room for one upload of the largest size: needs at least "
            f"{2 * (limits.max_file_bytes / MB + 4):g} MB",
            setting="max_inflight_mb",
        )
    max_batch = FLAGS["max-batch"].value
    with common.importing():  # the model and the imports live as long as the server
        grader = Grader.load(
            FLAGS["model-dir"].value, FLAGS.stage, backend=FLAGS.backend, data_dir=FLAGS.data,
            cutpoints=cutpoints, max_batch=max_batch, max_decode_bytes=slot,
            **model_flags.backend_options(FLAGS),
        )  # fmt: skip
    print(f"{PROG}: preprocessing parameters from {grader.params_source}", file=sys.stderr)
    host, port = sock.getsockname()[:2]
    settings = ServeSettings(
        limits=limits,
        max_wait_ms=FLAGS["max-wait-ms"].value,
        token=token,
        workers=workers,
        max_inflight_bytes=budget,
        max_queue=FLAGS["max-queue"].value,
        hosts=HostRule.for_server(host, FLAGS["allowed-hosts"].value, token=bool(token)),
    )
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def ready() -> None:
        print(f"{PROG}: serving stage {FLAGS.stage} on {url}/ (Ctrl-C stops)", flush=True)

    connection = ConnectionLimits(
        header_timeout=FLAGS["header-timeout"].value, body_timeout=FLAGS["body-timeout"].value
    )
    app = create_app(grader, settings, on_ready=ready)
    config = uvicorn.Config(
        app,
        http=GuardedH11Protocol.with_limits(connection),
        timeout_keep_alive=FLAGS["idle-timeout"].value,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        timeout_graceful_shutdown=_GRACEFUL_SECONDS,
        log_config=_log_config(),
        access_log=False,  # ours, guard.Guard: no query strings (tokens), control chars escaped
        server_header=False,
    )
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if not server.started:
        raise RunFailed("the server did not start (see the log above)")


def _log_config() -> dict:
    """uvicorn's logging, our logger added, and every line through guard's filter, which
    escapes control characters."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"escape": {"()": "m2cnn_tf.serve.guard.EscapeControlCharacters"}}
    for handler in config["handlers"].values():
        handler["filters"] = ["escape"]
    config["loggers"]["m2cnn_tf.serve"] = {
        "handlers": ["default"], "level": "INFO", "propagate": False,
    }  # fmt: skip
    return config


def run(argv: list[str] | None = None) -> int:
    return cli.run(PROG, __doc__, FLAGS, _body, argv)


def main() -> None:
    sys.exit(run())
