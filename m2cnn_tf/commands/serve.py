"""Serve a trained stage as a web page and HTTP API that grade fundus photographs.

    python serve.py --model-dir DIR --stage N [--host 127.0.0.1] [--port 8000] [--max-batch 8]
        [--max-wait-ms 20] [--max-upload-mb 30] [--max-files 200] [--token TOKEN]

Open http://127.0.0.1:8000/ for the page; the API is POST /v1/grade (multipart parts named
`files`, ?gradcam=1 for Grad-CAM), GET /v1/model, GET /healthz, docs at /docs. Grades equal
predict.py's for the same files. The model loads once; requests that arrive together are
graded in one model call of --max-batch images (padded, so a result never depends on the
load). Binds 127.0.0.1 unless told otherwise; elsewhere, pass --token (or set
M2CNN_SERVE_TOKEN): the page then opens once as /?token=TOKEN (kept in a cookie), API clients
send `Authorization: Bearer TOKEN`. --port 0 picks a free port; the line "serving on URL" says
which. Research use only, not a medical device.
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

from m2cnn_tf import cli
from m2cnn_tf.commands import model_flags
from m2cnn_tf.errors import RunFailed, UsageError

TOKEN_ENV = "M2CNN_SERVE_TOKEN"
PROG = "serve.py"

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
    f"Require this bearer token for the page and the API (default: ${TOKEN_ENV}).",
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


def _serve(sock: socket.socket, token: str | None, cutpoints: list[float] | None) -> None:
    """Load the model once, then serve on `sock` until Ctrl-C or SIGTERM."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from m2cnn_tf.serve.app import ServeSettings, create_app
    from m2cnn_tf.serve.grader import Grader
    from m2cnn_tf.serve.uploads import MB, Limits

    max_batch = FLAGS["max-batch"].value
    grader = Grader.load(
        FLAGS["model-dir"].value, FLAGS.stage, backend=FLAGS.backend, data_dir=FLAGS.data,
        cutpoints=cutpoints, max_batch=max_batch, **model_flags.backend_options(FLAGS),
    )  # fmt: skip
    print(f"{PROG}: preprocessing parameters from {grader.params_source}", file=sys.stderr)
    settings = ServeSettings(
        limits=Limits(round(FLAGS["max-upload-mb"].value * MB), FLAGS["max-files"].value),
        max_wait_ms=FLAGS["max-wait-ms"].value,
        token=token,
        workers=FLAGS.workers or min(4, os.cpu_count() or 1),
    )
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def ready() -> None:
        print(f"{PROG}: serving stage {FLAGS.stage} on {url}/ (Ctrl-C stops)", flush=True)

    log_config = copy.deepcopy(LOGGING_CONFIG)  # our access log: no query strings (tokens)
    log_config["loggers"]["m2cnn_tf.serve"] = {
        "handlers": ["default"], "level": "INFO", "propagate": False,
    }  # fmt: skip
    app = create_app(grader, settings, on_ready=ready)
    server = uvicorn.Server(uvicorn.Config(app, log_config=log_config, access_log=False))
    server.run(sockets=[sock])
    if not server.started:
        raise RunFailed("the server did not start (see the log above)")


def run(argv: list[str] | None = None) -> int:
    return cli.run(PROG, __doc__, FLAGS, _body, argv)


def main() -> None:
    sys.exit(run())
