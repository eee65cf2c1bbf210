"""The drawing page of `digits-jax serve`: HTTP answers, and a stroke drawn in headless Chromium gets a prediction."""

from __future__ import annotations

import http.client
import io
import json
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image, ImageDraw
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.actions import interaction
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.actions.pointer_input import PointerInput
from selenium.webdriver.support.ui import WebDriverWait

from digits_jax import serve, train
from digits_jax.predict import Predictor, load_image, preprocess
from tests.conftest import REPO
from tests.test_predict import damaged_tiff


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_config, tiny_data):
    workdir = tmp_path_factory.mktemp("serve")
    train.train_and_evaluate(tiny_config, workdir, datasets=tiny_data)
    return workdir


@pytest.fixture(scope="module")
def predictor(tiny_run):
    return Predictor.from_checkpoint(tiny_run)


@pytest.fixture(scope="module")
def server(predictor):
    server = serve.make_server(predictor, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def drawing(strokes=(((90, 60), (190, 60), (120, 220)),), size=280, mode="RGBA") -> bytes:
    """A PNG like the page sends: white strokes 22 px wide on opaque black (default: a 7)."""
    image = Image.new(mode, (size, size), "black")
    draw = ImageDraw.Draw(image)
    for stroke in strokes:
        draw.line(stroke, fill=65535 if mode == "I;16" else "white", width=22, joint="curve")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def request(server, path, body=None, method=None, headers=None):
    """(status, headers, body bytes) of one request; 4xx and 5xx answers are returned, not raised."""
    req = urllib.request.Request(server.url.rstrip("/") + path, data=body, method=method,
                                 headers={"Content-Type": "image/png"} | (headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_get_serves_the_drawing_page(server):
    status, headers, body = request(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    assert '<canvas id="pad"' in page and 'fetch("predict"' in page and "pointermove" in page


@pytest.mark.parametrize("mode", ["RGBA", "RGB", "L", "LA", "P", "1", "I;16"])
def test_predict_equals_the_predictor_on_the_same_image_as_a_file(server, predictor, mode, tmp_path):
    png = drawing(mode=mode)
    status, headers, body = request(server, "/predict", png)
    assert status == 200 and headers["Content-Type"] == "application/json"
    answer = json.loads(body)
    (tmp_path / "digit.png").write_bytes(png)
    expected = predictor.predict(preprocess(load_image(tmp_path / "digit.png"))[None])[0]
    assert len(answer["probabilities"]) == 10
    assert sum(answer["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(answer["probabilities"], expected, rtol=0, atol=1e-6)
    assert answer["digit"] == int(np.argmax(expected))


def test_empty_drawing_is_422_with_a_message(server):
    status, _, body = request(server, "/predict", drawing(strokes=()))
    assert status == 422 and "no ink" in json.loads(body)["error"]


@pytest.mark.parametrize("body,message", [
    (b"not an image at all", "not a readable image"),
    (drawing()[:200], "not a readable image"),  # a PNG cut short
    (b"", "empty body"),
    (damaged_tiff(), "not a readable image"),  # Pillow raises TypeError on it: still the body's fault, not the model's
    # What `curl -F file=@x.png` sends: said to be unread, with the command that works (it said only "not readable").
    (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n" + drawing() + b"\r\n--b--\r\n",
     "a multipart form, as curl -F sends, is not read: use curl --data-binary @FILE"),
])
def test_malformed_bodies_are_400(server, body, message, capsys):
    status, headers, answer = request(server, "/predict", body, method="POST")
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert message in json.loads(answer)["error"]
    assert "Traceback" not in capsys.readouterr().err


def raw_post(server, headers):
    """Sends only the headers of a POST /predict: what a client does before a body the server may refuse."""
    connection = http.client.HTTPConnection(*server.socket.getsockname()[:2], timeout=30)
    try:
        connection.putrequest("POST", "/predict")
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())["error"]
    finally:
        connection.close()


def test_oversized_body_is_413_before_it_is_read(server):
    status, error = raw_post(server, {"Content-Type": "image/png", "Content-Length": str(3 * 1024 * 1024)})
    assert status == 413 and "at most 2097152 bytes" in error


@pytest.mark.parametrize("headers,message", [
    ({"Content-Length": "lots"}, "'lots' is not a number of bytes"),
    ({"Content-Length": "-5"}, "'-5' is not a number of bytes"),
    ({"Content-Length": "\u00b2"}, "'\u00b2' is not a number of bytes"),  # a digit to str.isdigit(), not to int()
    ({}, "no body: POST the drawing's PNG bytes as the whole body, with Content-Length (a chunked upload is not"),
])
def test_missing_or_bad_content_length_is_400(server, headers, message):
    status, error = raw_post(server, {"Content-Type": "image/png"} | headers)
    assert status == 400 and message in error


def test_a_body_that_stops_short_is_408_after_the_timeout_without_a_traceback(server, monkeypatch, capsys):
    monkeypatch.setattr(serve._Handler, "timeout", 0.5)  # seconds; read by each new connection
    with socket.create_connection(server.socket.getsockname()[:2], timeout=30) as client:
        client.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
                       b"Content-Length: 1000\r\n\r\n\x89PNG")
        response = client.makefile("rb").read()  # to the end: the server closes the connection
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split()[1] == b"408"
    assert "stopped before its 1000 bytes" in json.loads(body)["error"]
    assert capsys.readouterr().err == ""


def test_a_client_that_resets_mid_body_leaves_no_traceback(server, capsys):
    with socket.create_connection(server.socket.getsockname()[:2], timeout=30) as client:
        client.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\n\x89PNG")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends a reset
    time.sleep(1)  # the server reads the reset, then answers 408 to nobody
    assert capsys.readouterr().err == ""


def test_a_stalled_body_on_an_unknown_path_still_gets_its_404(server, monkeypatch, capsys):
    monkeypatch.setattr(serve._Handler, "timeout", 0.5)
    with socket.create_connection(server.socket.getsockname()[:2], timeout=30) as client:
        client.sendall(b"POST /nothing-here HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\nabc")
        response = client.makefile("rb").read()
    assert response.split()[1] == b"404"
    assert capsys.readouterr().err == ""


def test_image_too_large_to_decode_is_413(server):
    png = drawing(strokes=(), size=5000, mode="1")  # a few kB of PNG, 25 megapixels
    status, _, body = request(server, "/predict", png)
    assert len(png) < 100_000 and status == 413 and "5000x5000" in json.loads(body)["error"]


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/nothing-here", 404),
    ("POST", "/nothing-here", 404),
    ("GET", "/predict", 405),
    ("POST", "/", 405),
    ("PUT", "/predict", 405),
    ("DELETE", "/", 405),
    ("OPTIONS", "/", 405),
])
def test_unknown_paths_are_404_and_wrong_methods_405(server, method, path, status):
    got, headers, body = request(server, path, b"x" if method in ("POST", "PUT") else None, method=method)
    assert got == status and "error" in json.loads(body)
    if status == 405:
        assert headers["Allow"] == serve.ROUTES[path]


@pytest.mark.parametrize("request_line,status", [(b"FOO / HTTP/1.1", 501), (b"GET / HTTP/9", 400),
                                                 (b"GET", 400)])
def test_http_servers_own_errors_are_json_too(server, request_line, status, capsys):
    """An unknown method or a malformed request got http.server's HTML page."""
    with socket.create_connection(server.socket.getsockname()[:2], timeout=30) as connection:
        connection.sendall(request_line + b"\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    if status == 501:
        head, _, answer = answer.partition(b"\r\n\r\n")
        assert head.split()[1] == b"501" and b"application/json" in head
    # Else its version is unknown, so http.server answers as HTTP/0.9 does: the body alone.
    assert json.loads(answer)["error"]
    assert f"code {status}, message" in capsys.readouterr().err  # logged for the operator, as before


def test_at_most_decoders_drawings_are_decoded_at_once(server, monkeypatch):
    """Each decode of a large drawing takes about 200 MB: dozens at once ran the server out of memory."""
    inside, most, release = [], [], threading.Event()
    lock = threading.Lock()

    def slow_predict_png(predictor, body):
        with lock:
            inside.append(1)
            most.append(len(inside))
        release.wait(30)
        with lock:
            inside.pop()
        return {"digit": 0, "probabilities": [0.1] * 10}

    monkeypatch.setattr(serve, "predict_png", slow_predict_png)
    clients = [threading.Thread(target=request, args=(server, "/predict", b"x")) for _ in range(serve.DECODERS + 2)]
    for client in clients:
        client.start()
    deadline = time.monotonic() + 30
    while len(most) < serve.DECODERS and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the other two would be inside by now without the limit
    assert max(most) == serve.DECODERS
    release.set()
    for client in clients:
        client.join(30)
    assert len(most) == serve.DECODERS + 2 and server.request_queue_size >= 64


def test_make_server_refuses_a_port_in_use_with_a_hint(predictor, server):
    with pytest.raises(OSError, match="cannot listen on 127.0.0.1:.*choose another --port"):
        serve.make_server(predictor, "127.0.0.1", server.socket.getsockname()[1])


def test_the_command_prints_its_url_serves_and_stops_cleanly_on_ctrl_c(tiny_run):
    process = subprocess.Popen([sys.executable, "-m", "digits_jax", "serve", "--checkpoint", str(tiny_run),
                                "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = process.stdout.readline()
        assert line.startswith("drawing page at http://127.0.0.1:"), process.stderr.read()
        with urllib.request.urlopen(line.split()[3], timeout=30) as response:
            assert response.status == 200
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0 and out == "stopped\n" and err == ""


# The browser test: Debian's chromium and chromium-driver packages, driven by Selenium.
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no chromium and chromedriver on PATH: install the Debian packages chromium and chromium-driver "
                    "(.ci/run does where it runs as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=900,700"):
        options.add_argument(flag)
    # An explicit driver path keeps Selenium Manager from trying to download one (these machines are offline).
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def shown_prediction(driver):
    """(digit, ten percentages) as the page shows them, or None while it shows no prediction."""
    # One script reads them all: the page may update between separate reads while the stroke goes on.
    digit, percents = driver.execute_script("return [document.getElementById('digit').textContent, "
                                            "[...document.querySelectorAll('#bars .pct')].map(e => e.textContent)]")
    percents = [p.rstrip("%") for p in percents]
    if not digit.isdigit() or len(percents) != 10 or not all(percents):
        return None
    return int(digit), [float(p) for p in percents]


def stroke(driver, canvas, points, pointer="mouse"):
    """Drags a mouse or a finger through `points` (offsets from the canvas centre, CSS pixels)."""
    kind = interaction.POINTER_TOUCH if pointer == "touch" else interaction.POINTER_MOUSE
    actions = ActionBuilder(driver, mouse=PointerInput(kind, pointer), duration=60)  # ms per move: pointermoves
    (x, y), *rest = points
    actions.pointer_action.move_to(canvas, x, y).pointer_down()
    for x, y in rest:
        actions.pointer_action.move_to(canvas, x, y)
    actions.pointer_action.pointer_up()
    actions.perform()


@pytest.mark.parametrize("pointer", ["mouse", "touch"])
def test_drawing_in_chromium_shows_a_prediction_and_ten_probabilities(server, browser, pointer):
    browser.get(server.url)
    canvas = browser.find_element("id", "pad")
    assert shown_prediction(browser) is None and browser.find_element("id", "status").text == "draw a digit"
    stroke(browser, canvas, [(-60, -80), (0, -80), (60, -80), (30, -10), (0, 60), (-15, 110)], pointer)  # a 7
    digit, percents = WebDriverWait(browser, 10, poll_frequency=0.1).until(shown_prediction)
    assert sum(percents) == pytest.approx(100, abs=0.5)
    assert percents[digit] == max(percents)
    browser.find_element("id", "clear").click()
    WebDriverWait(browser, 5, poll_frequency=0.1).until(lambda d: shown_prediction(d) is None)
