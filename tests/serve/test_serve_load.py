"""serve.py under load on loopback: 200 requests from 16 concurrent clients, bounded in count and
time; none fails, none is lost, and each result equals the same file's result when it was sent
alone (micro-batching never changes a photograph's numbers: not a bit under oneDNN, at most
their last bits under TensorFlow's Eigen kernels, `PLACE_ROUNDING`)."""

from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
from _served import MAX_BATCH, assert_same_result, upload

REQUESTS = 200
CLIENTS = 16


@pytest.mark.slow
def test_200_requests_from_16_clients_all_answered_and_equal_to_single_requests(server, photos):
    roles = ["good_jpeg", "good_png", "good_jpeg_2", "good_png_2", "grayscale", "truncated"]
    alone = {}
    with server.client() as client:
        for role in roles:
            response = client.post("/v1/grade", files=upload([photos[role]]))
            assert response.status_code == 200
            alone[role] = response.json()["results"][0]

        before = client.get("/v1/model").json()["serving"]
    plan = list(itertools.islice(itertools.cycle(roles), REQUESTS))
    clients = [server.client() for _ in range(CLIENTS)]

    def send(i: int):
        role = plan[i]
        try:
            response = clients[i % CLIENTS].post("/v1/grade", files=upload([photos[role]]))
        except Exception as err:  # a reset or timeout counts as lost, and is reported
            return role, None, repr(err)
        return role, response.status_code, response.json()

    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(send, range(REQUESTS), timeout=600))
    finally:
        for client in clients:
            client.close()

    lost = [(role, body) for role, status, body in answers if status is None]
    server_errors = [(role, status) for role, status, _ in answers if status and status >= 500]
    assert not lost and not server_errors
    assert all(status == 200 for _, status, _ in answers)
    for role, _, body in answers:
        assert len(body["results"]) == 1
        assert_same_result(body["results"][0], alone[role])
    with server.client() as client:
        after = client.get("/v1/model").json()["serving"]
    images = after["images_graded"] - before["images_graded"]
    calls = after["model_calls"] - before["model_calls"]
    assert images == sum(alone[role]["error"] is None for role in plan)  # each once
    # Whatever the arrival times: no call held more than --max-batch images, none was empty.
    # (That photographs of different requests share a call: test_serve_overload.py, on a
    # server whose batches close only when full.)
    assert math.ceil(images / MAX_BATCH) <= calls <= images
