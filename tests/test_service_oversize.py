"""Every refusal reaches the client: oversize uploads sent by real clients (curl, httpx, urllib) over a
real socket, both framings, raw and multipart, fast and slow senders, and a refusal that comes before the
body is read (a missing API key). The service runs as `python -m service` does."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.run import Server

MB = 1 << 20
LIMIT_MB = 20  # the default CERVIGATE_MAX_UPLOAD_BYTES
KEY = "oversize-test-key"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    env = {"CERVIGATE_API_KEYS": json.dumps([KEY])}
    server = Server("cervigate", [sys.executable, "-m", "service"], "/readyz", "/v1/assess", env=env)
    server.start()
    try:
        yield server.url + "/v1/assess"
    finally:
        server.stop()


def _sparse_file(tmp_path: Path, size_mb: int) -> Path:
    path = tmp_path / f"{size_mb}mb.jpg"  # sparse: no disk space, no memory
    with path.open("wb") as file:
        file.truncate(size_mb * MB)
    return path


def _zeros(size_mb: int, pause_s: float = 0.0) -> Iterator[bytes]:
    block = bytes(MB)
    for _ in range(size_mb):
        if pause_s:
            time.sleep(pause_s)
        yield block


def _assert_too_large(status: int, content_type: str, body: bytes) -> None:
    assert status == 413, (status, body[:200])
    assert content_type.startswith("application/problem+json")
    assert json.loads(body)["code"] == "upload_too_large"


def _curl(args: list[str], url: str, tmp_path: Path, stdin: int | None = None) -> None:
    out = tmp_path / "answer.json"
    command = ["curl", "-sS", "-o", str(out), "-w", "%{http_code} %{content_type}"]
    result = subprocess.run(
        [*command, "-H", f"X-API-Key: {KEY}", *args, url],
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"curl saw no answer: {result.stderr.strip()}"
    status, content_type = result.stdout.split(" ", 1)
    _assert_too_large(int(status), content_type, out.read_bytes())


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@needs_curl
@pytest.mark.parametrize("size_mb", [60, 500])
@pytest.mark.parametrize("expect", ["100-continue", "none"])
def test_curl_content_length(url: str, tmp_path: Path, size_mb: int, expect: str) -> None:
    # With Expect: 100-continue (curl's default for large bodies) the client never sends the body; without
    # it, it sends everything before it reads the answer.
    headers = ["-H", "content-type: image/jpeg"] + (["-H", "Expect:"] if expect == "none" else [])
    _curl(["-X", "POST", "-T", str(_sparse_file(tmp_path, size_mb)), *headers], url, tmp_path)


@needs_curl
@pytest.mark.parametrize("size_mb", [60, 500])
def test_curl_chunked(url: str, tmp_path: Path, size_mb: int) -> None:
    zeros = subprocess.Popen(["head", "-c", str(size_mb * MB), "/dev/zero"], stdout=subprocess.PIPE)
    try:
        headers = ["-H", "content-type: image/jpeg", "-H", "Expect:", "-H", "Transfer-Encoding: chunked"]
        _curl(["-X", "POST", "-T", "-", *headers], url, tmp_path, stdin=zeros.stdout.fileno())  # type: ignore[union-attr]
    finally:
        zeros.kill()
        zeros.wait()


@needs_curl
def test_curl_multipart(url: str, tmp_path: Path) -> None:
    photo = _sparse_file(tmp_path, 60)
    _curl(["-F", f"image=@{photo};type=image/jpeg", "-H", "Expect:"], url, tmp_path)


@pytest.mark.parametrize("size_mb", [60, 500])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_httpx_raw(url: str, size_mb: int, framing: str) -> None:
    headers = {"content-type": "image/jpeg", "x-api-key": KEY}
    if framing == "content-length":
        headers["content-length"] = str(size_mb * MB)
    response = httpx.post(url, content=_zeros(size_mb), headers=headers, timeout=120)
    _assert_too_large(response.status_code, response.headers["content-type"], response.content)


@pytest.mark.parametrize("size_mb", [60, 500])
def test_python_urllib_which_asks_the_server_to_close(url: str, tmp_path: Path, size_mb: int) -> None:
    # urllib sends `Connection: close`: a server that answers before reading then closes at once, resetting
    # the connection under the upload, and urllib reports "connection reset" instead of the 413.
    with _sparse_file(tmp_path, size_mb).open("rb") as photo:
        headers = {"content-type": "image/jpeg", "content-length": str(size_mb * MB), "x-api-key": KEY}
        request = urllib.request.Request(url, data=photo, headers=headers, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=120)
    _assert_too_large(refused.value.code, refused.value.headers["content-type"], refused.value.read())


def test_httpx_multipart(url: str, tmp_path: Path) -> None:
    with _sparse_file(tmp_path, 60).open("rb") as photo:
        files = {"image": ("p.jpg", photo, "image/jpeg")}
        response = httpx.post(url, files=files, headers={"x-api-key": KEY}, timeout=120)
    _assert_too_large(response.status_code, response.headers["content-type"], response.content)


def test_a_slow_sender_gets_the_answer_too(url: str) -> None:
    response = httpx.post(
        url,
        content=_zeros(30, pause_s=0.05),
        headers={"content-type": "image/jpeg", "x-api-key": KEY},
        timeout=120,
    )
    _assert_too_large(response.status_code, response.headers["content-type"], response.content)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_refusal_before_the_body_is_read_reaches_the_client(url: str, framing: str) -> None:
    headers = {"content-type": "image/jpeg", "connection": "close"}  # no API key
    if framing == "content-length":
        headers["content-length"] = str(8 * MB)
    response = httpx.post(url, content=_zeros(8), headers=headers, timeout=120)
    assert response.status_code == 401 and response.json()["code"] == "missing_api_key"


def test_a_body_past_the_hard_bound_is_not_read_and_the_connection_closes(url: str) -> None:
    """A declared 10 GB body is answered at once and the server hangs up rather than read it, so such an
    upload cannot hold the server (a client that keeps sending past the bound without `Expect` may see a
    reset instead of the answer: that is the bound)."""
    address = httpx.URL(url)
    with socket.create_connection((address.host, address.port), timeout=30) as sock:
        head = (
            f"POST {address.path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {10 * 1024 * MB}\r\nExpect: 100-continue\r\nX-API-Key: {KEY}\r\n\r\n"
        )
        sock.sendall(head.encode())
        answer = b""
        while chunk := sock.recv(65536):  # ends when the server closes the connection
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), status_line  # no "100 Continue": the body is refused
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"connection: close" in headers.lower()
    assert json.loads(body)["code"] == "upload_too_large"
