"""The connection layer, over a real socket to `python -m service`: slow or endless headers, oversize and
malformed requests, stalled uploads. Each answer is problem+json, and none waits for more than it must.

No test here times anything: where an answer must come before a long bound, the client's socket timeout
sits between the short bound under test and the long one (a missing guard shows as a socket timeout)."""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from bench.run import Server
from service.api.handling import STALLED_UPLOAD_S
from service.app import create_app
from tests import service_inputs as make

pytestmark = pytest.mark.slow
HEADER_TIMEOUT_S, UPLOAD_TIMEOUT_S = 1, 4
DRAIN_S = 600  # far longer than any socket timeout below: an answer that waited for it never arrives
CLIENT_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    env = {
        "CERVIGATE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "CERVIGATE_UPLOAD_TIMEOUT_S": str(UPLOAD_TIMEOUT_S),
        "CERVIGATE_REFUSED_BODY_DRAIN_S": str(DRAIN_S),
        "CERVIGATE_MAX_INFLIGHT": "2",
    }
    with Server(
        "cervigate", [sys.executable, "-m", "service"], "/readyz", "/v1/quality", env=env
    ).running() as s:
        yield s


def _connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT_S)


def _answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read until the server closes; the status, headers and body of its one answer."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


def _problem(sock: socket.socket, status: int, code: str) -> dict:
    got, headers, body = _answer(sock)
    assert got == status, body[:300]
    assert headers["content-type"] == "application/problem+json"
    problem = json.loads(body)
    assert problem["code"] == code and problem["status"] == status
    return problem


def _stalled_upload(server: Server) -> socket.socket:
    sock = _connect(server)
    sock.sendall(
        b"POST /v1/quality HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 200000\r\n\r\n"
        + b"\xff\xd8"
        + bytes(98)
    )
    return sock


def test_headers_that_never_end_get_408(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(b"POST /v1/assess HTTP/1.1\r\nHost: x\r\nContent-Ty")  # and nothing more
        problem = _problem(sock, 408, "header_timeout")
    assert f"{HEADER_TIMEOUT_S} s" in problem["detail"]


def test_a_connection_that_sends_nothing_is_closed_with_408(server: Server) -> None:
    with _connect(server) as sock:
        _problem(sock, 408, "header_timeout")


@pytest.mark.parametrize("size", [70_000, 200_000])
def test_oversize_headers_get_431_not_a_reset(server: Server, size: int) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
        _problem(sock, 431, "headers_too_large")


def test_oversize_headers_that_arrive_whole_are_refused_too() -> None:
    """h11 bounds only incomplete headers; headers that came in one read meet the same bound in the app."""
    with TestClient(create_app()) as client:
        response = client.get("/readyz", headers={"X-Big": "a" * 70_000})
    assert response.status_code == 431 and response.json()["code"] == "headers_too_large"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/assess HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n",
    ],
    ids=["garbage", "two content lengths", "NUL in a header"],
)
def test_a_malformed_request_gets_a_problem(server: Server, request_bytes: bytes) -> None:
    with _connect(server) as sock:
        sock.sendall(request_bytes)
        _problem(sock, 400, "malformed_request")


def test_keep_alive_requests_are_not_cut_by_the_header_deadline(server: Server) -> None:
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/readyz").status_code == 200
        time.sleep(HEADER_TIMEOUT_S * 2)  # idle between requests: the keep-alive timeout's business
        assert client.get("/readyz").status_code == 200


def test_a_stalled_upload_gets_its_408_without_waiting_for_the_drain(server: Server) -> None:
    with _stalled_upload(server) as sock:
        problem = _problem(sock, 408, "upload_timeout")
    assert f"{UPLOAD_TIMEOUT_S} s" in problem["detail"]


def test_stalled_uploads_give_their_places_to_photos(server: Server) -> None:
    photo = make.encode(np.random.default_rng(3).integers(0, 255, (240, 320, 3), dtype=np.uint8))
    stalled = [_stalled_upload(server) for _ in range(2)]  # CERVIGATE_MAX_INFLIGHT=2: the service is full
    try:
        time.sleep(STALLED_UPLOAD_S + 0.5)
        response = httpx.post(
            server.url + "/v1/quality", content=photo, headers={"content-type": "image/jpeg"}, timeout=60
        )
        assert response.status_code == 200, response.text
        codes = {_problem(sock, 408, "upload_timeout")["detail"] for sock in stalled}
        assert any("while the service was full" in detail for detail in codes)
    finally:
        for sock in stalled:
            sock.close()


def test_head_answers_where_get_does(server: Server) -> None:
    for path in ("/healthz", "/readyz"):
        response = httpx.head(server.url + path)
        assert response.status_code == 200 and response.content == b""


def test_an_encoded_body_is_refused_unread(server: Server) -> None:
    response = httpx.post(
        server.url + "/v1/quality",
        content=b"\x1f\x8b" + bytes(100),
        headers={"content-type": "image/jpeg", "content-encoding": "gzip"},
    )
    assert response.status_code == 415 and response.json()["code"] == "unsupported_media_type"
    assert "Content-Encoding" in response.json()["detail"]


def test_a_request_framed_two_ways_is_refused_and_the_connection_closed(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(
            b"POST /v1/quality HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        status, headers, body = _answer(sock)  # one answer, then the close: the smuggled GET is never served
    assert status == 400 and headers["connection"] == "close"
    assert json.loads(body)["code"] == "malformed_request"


def test_a_partial_request_pipelined_behind_a_whole_one_gets_the_header_deadline(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHo")
        data = b""
        while chunk := sock.recv(65536):  # the first answer, then the second request's 408 and the close
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in data and b'"header_timeout"' in data
