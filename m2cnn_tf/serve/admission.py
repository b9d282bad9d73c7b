"""Who gets in, and with how much: the grader's memory budget and its queue bound. Free of
TensorFlow; everything here runs on the event loop's thread only.

The budget (serve.py's --max-inflight-mb) caps the memory that requests hold at once, on top of
the loaded model (ours: the paper serves nothing). It is split in two:

- each decoding thread has a slot set aside (`decode_slot`): a photograph whose decode would need
  more, by its header (`image_headers.decode_bytes`), is refused with a reason, so the threads
  never hold more than their slots;
- the rest is shared by the requests (`Ticket`): the body as it arrives (from Content-Length up
  front, or chunk by chunk), then each admitted image's model input (and Grad-CAM panel).

Past the budget, or past the queue bound (images admitted and not yet answered), a request is
refused at once with 503 and Retry-After (`Busy`) instead of waiting; a request that could never
fit is refused with 413. Nothing waits for memory, so nothing waits without bound.
"""

from __future__ import annotations

MB = 1024 * 1024
# Ours: a decoding thread's slot is at most what a 50 MP 8-bit RGB photograph needs (decoded,
# plus the reduced copy: 188 MB), and at most half the budget goes to the slots.
MAX_DECODE_SLOT = 256 * MB
# Ours: a request's buffers beyond its body (uvicorn's, h11's and the parser's, up to 64 KB
# each, and the socket reads of 256 KB), counted so that many small requests cannot slip
# through a budget counted in body bytes alone.
REQUEST_OVERHEAD = 512 * 1024


def decode_slot(budget_bytes: int, workers: int) -> int:
    """The memory set aside for each decoding thread: half the budget at most, in all."""
    return min(MAX_DECODE_SLOT, budget_bytes // (2 * max(1, workers)))


class Busy(Exception):
    """The server cannot take this request now (503 with Retry-After); `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TooLarge(Exception):
    """The request could never fit in the server's budget (413)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Admission:
    """The requests' share of the budget (bytes) and the queue bound (images)."""

    def __init__(self, capacity_bytes: int, max_queue: int):
        if capacity_bytes <= REQUEST_OVERHEAD or max_queue < 1:
            raise ValueError(f"a budget of {capacity_bytes} bytes and a queue of {max_queue}")
        self.capacity, self.max_queue = capacity_bytes, max_queue
        self.used = 0  # bytes held by requests now
        self.images = 0  # images admitted and not yet answered
        self.refused = 0  # requests answered 503 so far

    def ticket(self) -> Ticket:
        return Ticket(self)

    def check_queue(self) -> None:
        """Busy when the queue is full: a quick refusal before the body is read."""
        if self.images >= self.max_queue:
            raise Busy(f"the grading queue is full ({self.images} images waiting)")


class Ticket:
    """One request's share; a context manager that gives everything back when it ends."""

    def __init__(self, admission: Admission):
        self.admission = admission
        self.body_bytes = self.image_bytes = self.images = 0

    def hold_body(self, body_bytes: int) -> None:
        """Hold memory for a body of this many bytes (grows only): TooLarge or Busy if not."""
        wanted = REQUEST_OVERHEAD + body_bytes
        if wanted > self.body_bytes:
            self._hold(wanted - self.body_bytes, what="the request")
            self.body_bytes = wanted

    def admit(self, images: int, bytes_each: int) -> None:
        """Admit the request's images into the queue, with memory for their model inputs."""
        a = self.admission
        if a.images and a.images + images > a.max_queue:  # an empty queue takes any request
            raise Busy(f"the grading queue is full ({a.images} images waiting)")
        self._hold(images * bytes_each, what="its images")
        self.image_bytes += images * bytes_each
        a.images += images
        self.images += images

    def _hold(self, more: int, what: str) -> None:
        a = self.admission
        held = self.body_bytes + self.image_bytes
        if held + more > a.capacity:
            raise TooLarge(
                f"{what} would need {(held + more) / MB:.0f} MB, more than the server's "
                f"memory budget for requests ({a.capacity / MB:.0f} MB)"
            )
        if a.used + more > a.capacity:
            raise Busy("the server's memory budget is in use by other requests")
        a.used += more

    def release(self) -> None:
        self.admission.used -= self.body_bytes + self.image_bytes
        self.admission.images -= self.images
        self.body_bytes = self.image_bytes = self.images = 0

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
