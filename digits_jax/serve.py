"""`digits-jax serve`: a local web page where a person draws a digit and sees the model's prediction as they draw.

  GET /          the drawing page (digits_jax/static/draw.html, self-contained)
  POST /predict  body: the drawing as a PNG file, raw bytes (Content-Type image/png), at most 2 MB and
                 4096 pixels a side; answer: 200 {"digit": 0-9, "probabilities": [10 floats summing to 1]}.
The drawing goes through `predict.preprocess` and `Predictor.predict`, exactly as a file given to
`digits-jax predict`. Errors are JSON {"error": message}: 400 a missing, malformed or undecodable body,
408 a body that stops arriving before its Content-Length, 413 a body or image too large, 422 a drawing
without ink (the page then shows "draw a digit"), 404 any other path, 405 another method (501 one HTTP does
not define, 400 a malformed request). Up to DECODERS drawings are decoded at once; the others wait.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image, UnidentifiedImageError

from digits_jax.predict import Predictor, preprocess, to_array

MAX_BODY_BYTES = 2 * 1024 * 1024
MAX_SIDE = 4096  # pixels; a small PNG can decode to an image far too large to hold in memory
DECODERS = 4  # drawings decoded at once: a 4096 x 4096 RGBA one takes about 200 MB while it is
ROUTES = {"/": "GET", "/predict": "POST"}


class RequestError(Exception):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class DrawServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that serves the drawing page and answers predictions with `predictor`."""

    request_queue_size = 128  # socketserver's 5 reset connections when a few dozen arrived at once

    def __init__(self, address: tuple[str, int], predictor: Predictor) -> None:
        self.predictor = predictor
        self.decoding = threading.BoundedSemaphore(DECODERS)
        self.page = resources.files("digits_jax").joinpath("static/draw.html").read_bytes()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://{host}:{port}/"


def make_server(predictor: Predictor, host: str = "127.0.0.1", port: int = 8000) -> DrawServer:
    """A bound, not yet running server (`port=0` picks a free port; see `.url`); run it with `serve_forever()`."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is not between 0 and 65535; choose another --port")
    try:
        return DrawServer((host, port), predictor)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") from e


def serve(predictor: Predictor, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serves the drawing page until Ctrl-C (SIGINT) or SIGTERM, printing its URL first; main thread only."""
    server = make_server(predictor, host, port)
    # Compile now, so that the first stroke is answered at once.
    predictor.predict(np.zeros((1, 28, 28, 1), np.uint8))

    stoppers: list[threading.Thread] = []

    def stop(signum: int, frame: object) -> None:
        # Ask the loop to end rather than raise KeyboardInterrupt wherever the main thread happens to be (one CI
        # run hung after Ctrl-C; an interrupt inside socketserver's thread start-up is the suspect). shutdown()
        # waits for the loop, so it must run on another thread.
        stoppers.append(threading.Thread(target=server.shutdown, daemon=True))
        stoppers[-1].start()

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    print(f"drawing page at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
        print("stopped")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        server.server_close()
        # A daemon thread still running when the interpreter exits is ended by pthread_exit; under load this one
        # sometimes was, and the process aborted ("FATAL: exception not rethrown", 2 of 20 Ctrl-Cs). Wait for it.
        for thread in stoppers:
            thread.join()


def predict_png(predictor: Predictor, body: bytes) -> dict[str, Any]:
    """PNG bytes -> {"digit": int, "probabilities": [10 floats]}; raises RequestError for what is not a drawing."""
    try:
        with Image.open(io.BytesIO(body)) as image:
            if max(image.size) > MAX_SIDE:
                raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the image is {image.width}x{image.height} "
                                   f"pixels; send at most {MAX_SIDE} pixels a side")
            pixels = to_array(image)  # as `digits-jax predict` decodes a file
    except RequestError:
        raise
    except Image.DecompressionBombError as e:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{e}; send a smaller image") from e
    except Exception as e:  # OSError mostly, but damaged files also make Pillow raise TypeError, ValueError...
        reason = "not a format Pillow knows" if isinstance(e, UnidentifiedImageError) else str(e)
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not a readable image ({reason}); POST the "
                           "drawing's PNG bytes as the whole body (Content-Type: image/png; a multipart form, as "
                           "curl -F sends, is not read: use curl --data-binary @FILE)") from e
    try:
        digit = preprocess(pixels)
    except ValueError as e:
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, str(e)) from e
    probabilities = predictor.predict(digit[None])[0]
    return {"digit": int(np.argmax(probabilities)), "probabilities": [float(p) for p in probabilities]}


class _Handler(BaseHTTPRequestHandler):
    server: DrawServer
    timeout = 10  # seconds; a client that stops sending mid-request must not hold a thread forever

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_TRACE = do_CONNECT = do_GET

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """As JSON, like every other error: http.server's own (a malformed request, an unknown method) were HTML."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        self._send_json(HTTPStatus(code), {"error": message or HTTPStatus(code).phrase})

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        allowed = ROUTES.get(path)
        if allowed is None or self.command != allowed:
            self._drain()
            if allowed is None:
                self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page {path}; the drawing page is at /"})
            else:
                self._send_json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{path} accepts {allowed} only"},
                                Allow=allowed)
            return
        if path == "/":
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", self.server.page)
            return
        try:
            body = self._read_body()
            with self.server.decoding:
                answer = predict_png(self.server.predictor, body)
            self._send_json(HTTPStatus.OK, answer)
        except RequestError as e:
            self._send_json(e.status, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 -- answer the page, keep serving, and leave the trace for the operator
            traceback.print_exc(file=sys.stderr)
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"the model failed on this drawing ({e}); "
                                                               "see the server's terminal"})

    def _read_body(self) -> bytes:
        text = self.headers.get("Content-Length")
        if text is None:
            raise RequestError(HTTPStatus.BAD_REQUEST, "no body: POST the drawing's PNG bytes as the whole body, with "
                               "Content-Length (a chunked upload is not read)")
        if not (text.isascii() and text.isdigit()):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"Content-Length {text!r} is not a number of bytes")
        length = int(text)
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the body stays unread
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is {length} bytes; send at most "
                               f"{MAX_BODY_BYTES} bytes (a PNG of the drawing is a few kB)")
        if length == 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, "empty body: POST the drawing as a PNG file")
        try:
            body = self.rfile.read(length)
        except OSError as e:  # TimeoutError: the client sent less than it announced, then nothing for `timeout` s
            self.close_connection = True  # the rest of the body may still come, and would be read as a request
            raise RequestError(HTTPStatus.REQUEST_TIMEOUT, f"the body stopped before its {length} bytes ({e}); "
                               f"send all of it within {self.timeout} s") from e
        if len(body) < length:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the body ended after {len(body)} of {length} bytes")
        return body

    def _drain(self) -> None:
        # A body left unread makes the kernel reset the connection on close, which can lose our answer.
        text = self.headers.get("Content-Length", "")
        if text.isascii() and text.isdigit() and int(text) <= MAX_BODY_BYTES:
            try:
                self.rfile.read(int(text))
            except OSError:  # the body stopped coming: answer anyway, then close
                self.close_connection = True

    def _send_json(self, status: HTTPStatus, payload: dict[str, Any], **headers: str) -> None:
        self._send(status, "application/json", json.dumps(payload).encode(), **headers)

    def _send(self, status: HTTPStatus, content_type: str, body: bytes, **headers: str) -> None:
        # The client may be gone before the answer (a page closed, a reset connection): nothing to tell it then.
        with contextlib.suppress(ConnectionError):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Silent: the page posts the drawing several times a second; errors are still logged."""
