"""serve.py overloaded, as real processes: past its queue bound or its memory budget a request is
answered 503 with Retry-After at once, never left waiting; a client that disconnects has its
queued images dropped before any model call; and 64 concurrent near-limit uploads keep the
server's memory within its budget while every request it accepted is answered in full.

Batches are held open on purpose (conftest's `queue_server`: a long --max-wait-ms and a
--max-batch larger than what is sent), so that what is queued stays queued until the test fills
the batch: the checks wait for counters, never for time.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from _attacks import connect
from _served import (
    assert_same_result,
    memory_kb,
    reset_peak,
    serving,
    start_server,
    stop_server,
    upload,
    upload_bytes,
    wait_for,
)
from _subprocess import run_json_script

from m2cnn_tf.commands import serve as serve_command

BUSY = ("the grading queue is full", "the server's memory budget is in use by other requests")
BUDGET_MB = 64
UPLOADS = 64


def _post(served, files):
    with served.client(token=None) as client:
        return client.post("/v1/grade", files=files)


def _graded(reply, count: int) -> list[dict]:
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert len(results) == count and all(r["error"] is None for r in results)
    return results


@pytest.mark.slow
def test_past_the_queue_bound_a_request_gets_503_with_retry_after(queue_server, photos):
    before = serving(queue_server, token=None)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_post, queue_server, upload([photos["good_jpeg"]] * 3))
        wait_for(lambda: serving(queue_server, token=None)["images_queued"] == 3, "3 queued")
        refused = _post(queue_server, upload([photos["good_png"]] * 2))
        assert refused.status_code == 503
        assert refused.json() == {"detail": "the grading queue is full (3 images waiting)"}
        assert int(refused.headers["retry-after"]) >= 1
        _graded(_post(queue_server, upload([photos["good_png"]])), 1)  # fills the batch
        _graded(waiting.result(timeout=600), 3)
    after = serving(queue_server, token=None)
    assert after["images_graded"] - before["images_graded"] == 4
    assert after["model_calls"] - before["model_calls"] == 1
    assert after["refused_busy"] - before["refused_busy"] == 1


@pytest.mark.slow
def test_a_disconnected_clients_queued_images_never_reach_the_model(queue_server, photos):
    before = serving(queue_server, token=None)
    boundary = "b0undary"
    photo = photos["good_jpeg"].read_bytes()
    disposition = 'form-data; name="files"; filename="a.jpeg"'
    part = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
    part += photo + b"\r\n"
    body = part * 3 + f"--{boundary}--\r\n".encode()
    sock = connect(queue_server.url)
    try:
        sock.sendall(
            f"POST /v1/grade HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode()
            + body
        )
        wait_for(lambda: serving(queue_server, token=None)["images_queued"] == 3, "3 queued")
    finally:
        sock.close()  # the client goes away

    def dropped() -> bool:
        now = serving(queue_server, token=None)
        return now["images_queued"] == 0 and now["images_admitted"] == 0

    wait_for(dropped, "the gone client's images to leave the queue")
    _graded(_post(queue_server, upload([photos["good_jpeg"]] * 4)), 4)  # one full batch
    after = serving(queue_server, token=None)
    assert after["images_graded"] - before["images_graded"] == 4  # not 7
    assert after["model_calls"] - before["model_calls"] == 1


@pytest.mark.slow
def test_64_near_limit_uploads_stay_within_the_memory_budget(model_dir, photos, tmp_path):
    """--max-upload-mb 1 and --max-inflight-mb 64: 64 clients send a 1 MB photograph at once
    (a JPEG with a camera's trailer of zeros) while the first batch is held open. The server's
    peak resident memory grows by at most the budget over its idle size (the model loaded and
    warm); the excess is answered 503; every accepted request gets its full, correct result."""
    near_limit = photos["good_jpeg"].read_bytes()
    near_limit += bytes(1024 * 1024 - 1024 - len(near_limit))
    process, served = start_server(
        model_dir, tmp_path / "server.log", "--max-upload-mb", "1",
        "--max-inflight-mb", str(BUDGET_MB), "--max-batch", "32", "--max-wait-ms", "3000",
        "--workers", "2", token=None,
    )  # fmt: skip
    try:
        (alone,) = _graded(_post(served, upload_bytes(("big.jpeg", near_limit))), 1)
        before = serving(served, token=None)
        reset_peak(process.pid)
        idle_kb = memory_kb(process.pid)["VmRSS"]
        start = threading.Barrier(UPLOADS)

        def send(_):
            with served.client(token=None) as client:
                start.wait()
                return client.post("/v1/grade", files=upload_bytes(("big.jpeg", near_limit)))

        with ThreadPoolExecutor(UPLOADS) as pool:
            replies = list(pool.map(send, range(UPLOADS)))
        peak_kb = memory_kb(process.pid)["VmHWM"]
        statuses = [r.status_code for r in replies]
        accepted = [r for r in replies if r.status_code == 200]
        refused = [r for r in replies if r.status_code == 503]
        assert len(accepted) + len(refused) == UPLOADS, statuses
        assert accepted and refused, statuses
        for reply in accepted:
            (result,) = reply.json()["results"]
            assert_same_result(result, alone)
        for reply in refused:
            assert reply.json()["detail"].startswith(BUSY)
            assert int(reply.headers["retry-after"]) >= 1
        assert peak_kb - idle_kb <= BUDGET_MB * 1024, (idle_kb, peak_kb)
        after = serving(served, token=None)
        assert after["images_graded"] - before["images_graded"] == len(accepted)
        assert after["refused_busy"] - before["refused_busy"] == len(refused)
        assert after["inflight_mb"] == 0 and after["images_admitted"] == 0
        growth = (peak_kb - idle_kb) / 1024
        print(f"\n{len(accepted)} accepted, {len(refused)} refused; RSS +{growth:.1f} MB at peak")
        _graded(_post(served, upload([photos["good_jpeg"]])), 1)
    finally:
        stop_server(process)


# Eight threads each allocate (50 KB: under the mmap threshold, so from an arena) and stay alive
# until all have (an exiting thread's arena is handed to the next), then glibc's own malloc_info
# counts the arenas; with and without serve.py's cap, in fresh processes.
ARENAS_SCRIPT = """
import ctypes, json, os, tempfile, threading
from m2cnn_tf.commands import serve
capped = CAP and serve.limit_malloc_arenas()
hold, together = [], threading.Barrier(8)
def allocate():
    hold.append(bytearray(50_000))
    together.wait()
threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
path = os.path.join(tempfile.mkdtemp(), "malloc_info.xml")
f = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(f)); libc.fclose(ctypes.c_void_p(f))
print(json.dumps({"capped": capped, "arenas": open(path).read().count("<heap nr=")}))
"""


def test_the_server_caps_glibcs_malloc_arenas_that_threads_would_multiply():
    capped = run_json_script(f"CAP = True\n{ARENAS_SCRIPT}", timeout=120)
    free = run_json_script(f"CAP = False\n{ARENAS_SCRIPT}", timeout=120)
    assert capped == {"capped": True, "arenas": serve_command.MALLOC_ARENAS}
    assert free["arenas"] > serve_command.MALLOC_ARENAS  # what the cap prevents
