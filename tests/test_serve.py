"""`motfusion serve`: the JSON API on tiny trained checkpoints (every route gives what the Python API
gives for the same seed; limits, bad bodies and failures are one-line errors; requests run one at a
time), the command line (localhost, the URL printed), and the page in a real headless Chromium: type
a prompt, generate, decode the image; upload a picture and caption it; pick a generated one and edit it.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line, cli
from PIL import Image as PILImage
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.support.ui import WebDriverWait
from test_pipeline import load, quick_run, same_images
from test_speech import tiny_overrides

from motfusion.cli import main
from motfusion.codecs.audio import read_wav, write_wav
from motfusion.serve import AUDIO_RATE, LIMITS, MAX_TEXT_CHARS, make_server

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


# ---- checkpoints and servers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def speech_run(tmp_path_factory) -> Path:
    """A 2-step speech-demo run: text, image and speech towers."""
    root = tmp_path_factory.mktemp("serve-speech")
    speech = ["--out", str(root / "speech"), "--n", "4", "--sources", "fortunes", "--voices", "en-us"]
    assert main(["make-speech-data", *speech, "--val-percent", "50"]) == 0
    assert main(["train-speech-tokenizer", "--data", str(root / "speech"), "--k", "8"]) == 0
    return quick_run(root / "run", *tiny_overrides(root / "speech"), recipe="speech-demo")


@pytest.fixture(scope="module")
def edit_run(tmp_path_factory) -> Path:
    """A 2-step debug run on shapes-edit: text to image, captions, interleaved, editing."""
    return quick_run(tmp_path_factory.mktemp("serve-edit") / "run", "data.dataset=shapes-edit")


@contextlib.contextmanager
def serving(model, name: str = "tiny"):
    """The playground on a free port of 127.0.0.1, in a thread; yields its URL."""
    server = make_server(model, port=0, name=name)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def speech_model(speech_run):
    return load(speech_run)


@pytest.fixture(scope="module")
def edit_model(edit_run):
    return load(edit_run)


@pytest.fixture(scope="module")
def speech_url(speech_model):
    with serving(speech_model) as url:
        yield url


@pytest.fixture(scope="module")
def edit_url(edit_model):
    with serving(edit_model) as url:
        yield url


class Wrapped:
    """A model with some verbs or capabilities replaced; everything else is the real model's."""

    def __init__(self, model, capabilities=None, **verbs):
        self.model, self.verbs = model, verbs
        self.capabilities = model.capabilities if capabilities is None else frozenset(capabilities)

    def __getattr__(self, name):
        return self.verbs.get(name) or getattr(self.model, name)


# ---- HTTP and data URLs -----------------------------------------------------------------------


def request(url: str, route: str, body: dict | bytes | None = None) -> tuple[int, dict | bytes]:
    """GET (no body) or POST; (status, the JSON reply, or the raw bytes of a page)."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + route, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, raw, kind = r.status, r.read(), r.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        status, raw, kind = e.code, e.read(), e.headers["Content-Type"]
    return status, json.loads(raw) if kind == "application/json" else raw


def to_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def from_url(url: str, mime: str) -> bytes:
    prefix = f"data:{mime};base64,"
    assert url.startswith(prefix), url[:40]
    return base64.b64decode(url[len(prefix) :])


def png(pic: PILImage.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    pic.save(buf, format=fmt)
    return buf.getvalue()


def picture(url: str) -> PILImage.Image:
    pic = PILImage.open(io.BytesIO(from_url(url, "image/png")))
    pic.load()
    return pic


def scene(size: int = 48) -> PILImage.Image:
    """A red disc on white: something to caption."""
    yy, xx = np.mgrid[:size, :size]
    pixels = np.full((size, size, 3), 255, np.uint8)
    pixels[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2] = (220, 30, 30)
    return PILImage.fromarray(pixels)


# ---- every route gives what the Python API gives --------------------------------------------------


def test_info_and_page(speech_url, speech_model):
    status, info = request(speech_url, "/api/info")
    assert status == 200 and info["name"] == "tiny"
    assert (
        info["capabilities"]
        == sorted(speech_model.capabilities)
        == [
            "caption",
            "interleaved",
            "speech",
            "text_to_image",
        ]
    )
    assert info["limits"]["n"] == list(LIMITS["n"]) and info["limits"]["text_chars"] == MAX_TEXT_CHARS
    status, page = request(speech_url, "/")
    assert status == 200 and b"<title>motfusion playground</title>" in page


def test_text_to_image_and_caption_equal_the_python_api(speech_url, speech_model):
    body = {"prompt": "a red circle", "n": 3, "steps": 2, "guidance": 2.5, "best_of": 2, "seed": 7}
    status, reply = request(speech_url, "/api/text_to_image", body)
    assert status == 200, reply
    pictures = [picture(u) for u in reply["images"]]
    expected = speech_model.generate_images(["a red circle"], n=3, seed=7, steps=2, guidance=2.5, best_of=2)
    assert same_images(pictures, expected) and pictures[0].size == (16, 16) and pictures[0].mode == "RGB"
    for fmt, mime in [("PNG", "image/png"), ("JPEG", "image/jpeg")]:
        upload = png(scene(), fmt)
        status, reply = request(speech_url, "/api/caption", {"image": to_url(upload, mime), "seed": 1})
        assert status == 200, reply
        assert reply["caption"] == speech_model.caption([PILImage.open(io.BytesIO(upload))], seed=1)[0]


def test_interleaved_equals_the_python_api(speech_url, speech_model):
    status, reply = request(speech_url, "/api/interleaved", {"prompt": "a blue square", "seed": 2})
    assert status == 200, reply
    expected = speech_model.interleaved("a blue square", seed=2)
    assert len(reply["segments"]) == len(expected)
    for got, want in zip(reply["segments"], expected):
        if isinstance(want, str):
            assert got == {"text": want}
        elif isinstance(want, PILImage.Image):
            assert same_images([picture(got["image"])], [want])
        else:
            assert got == {"units": want.modality, "count": len(want.ids)}


def test_speak_and_transcribe_equal_the_python_api(speech_url, speech_model, tmp_path):
    status, reply = request(speech_url, "/api/speak", {"text": "a red circle", "seed": 3})
    assert status == 200, reply
    wav = tmp_path / "spoken.wav"
    wav.write_bytes(from_url(reply["audio"], "audio/wav"))
    wave, rate = speech_model.speak("a red circle", seed=3)
    heard = read_wav(wav, rate)  # 16-bit PCM of the same waveform
    assert rate == AUDIO_RATE and heard.shape == wave.shape and (heard - wave.clamp(-1, 1)).abs().max() < 1e-4
    assert reply["seconds_of_audio"] == round(wave.numel() / rate, 2)

    status, reply = request(speech_url, "/api/transcribe", {"audio": to_url(wav.read_bytes(), "audio/wav")})
    assert status == 200, reply
    assert reply["text"] == speech_model.transcribe([heard], sample_rate=rate)[0]


def test_edit_equals_the_python_api(edit_url, edit_model):
    source = scene(16)
    body = {"image": to_url(png(source), "image/png"), "instruction": "make it blue", "steps": 2, "seed": 5}
    status, reply = request(edit_url, "/api/edit", body)
    assert status == 200, reply
    expected = edit_model.edit([source], ["make it blue"], seed=5, steps=2)
    assert same_images([picture(reply["image"])], expected)


# ---- what a user can get wrong: 400 with one line naming it ----------------------------------------


def gif() -> str:
    return to_url(png(scene(), "GIF"), "image/gif")


BAD_REQUESTS = [  # route, body, the error
    ("text_to_image", {"prompt": "a", "n": 0}, "n must be an integer between 1 and 16"),
    ("text_to_image", {"prompt": "a", "n": 17}, "n must be an integer between 1 and 16"),
    ("text_to_image", {"prompt": "a", "n": 2.5}, "n must be an integer between 1 and 16"),
    ("text_to_image", {"prompt": "a", "n": True}, "n must be an integer between 1 and 16"),
    ("text_to_image", {"prompt": "a", "steps": 201}, "steps must be an integer between 1 and 200"),
    ("text_to_image", {"prompt": "a", "guidance": 0.5}, "guidance must be a number between 1.0 and 20.0"),
    ("text_to_image", {"prompt": "a", "guidance": "3"}, "guidance must be a number between 1.0 and 20.0"),
    ("text_to_image", {"prompt": "a", "best_of": 9}, "best_of must be an integer between 1 and 8"),
    ("text_to_image", {"prompt": "a", "seed": -1}, "seed must be an integer between 0 and 2147483647"),
    ("text_to_image", {"prompt": "a", "seed": 2**31}, "seed must be an integer between 0 and 2147483647"),
    ("text_to_image", {"n": 2}, "missing field 'prompt'"),
    ("text_to_image", {"prompt": "  "}, "prompt must be a non-empty string"),
    ("text_to_image", {"prompt": 3}, "prompt must be a non-empty string"),
    ("text_to_image", {"prompt": "x" * 201}, "prompt is 201 characters; the limit is 200"),
    ("interleaved", {"prompt": "x" * 201}, "prompt is 201 characters; the limit is 200"),
    ("speak", {"text": ""}, "text must be a non-empty string"),
    ("caption", {}, "missing field 'image'"),
    ("caption", {"image": "a.png"}, "image must be a base64 data URL"),
    ("caption", {"image": "data:image/png;base64,@@@@"}, "image is not valid base64"),
    ("caption", {"image": to_url(b"hello", "image/png")}, "image is not an image Pillow can read"),
    ("caption", {"image": gif()}, "image is a GIF image; send a PNG or a JPEG"),
    ("caption", {"image": to_url(png(scene())[:60], "image/png")}, "image is not an image Pillow can read"),
    (
        "caption",
        {"image": to_url(bytes(5 * 2**20 + 3), "image/png")},
        "image is 5,242,883 bytes; the limit is 5 MB",
    ),
    ("transcribe", {"audio": to_url(b"RIFF....WAVE", "audio/wav")}, "audio is not audio libsndfile reads"),
]


@pytest.mark.parametrize("route, body, error", BAD_REQUESTS, ids=[e for _, _, e in BAD_REQUESTS])
def test_a_request_outside_the_limits_is_400_naming_the_field(speech_url, route, body, error):
    status, reply = request(speech_url, f"/api/{route}", body)
    assert status == 400 and reply["error"].startswith(error) and "\n" not in reply["error"], reply


def test_audio_too_long_and_images_too_large_are_400(speech_url, tmp_path):
    for seconds, error in [(31, "audio lasts 31.0 s; the limit is 30 s"), (0, "audio holds no sound")]:
        write_wav(tmp_path / "sound.wav", torch.zeros(seconds * 8000), 8000)
        audio = to_url((tmp_path / "sound.wav").read_bytes(), "audio/wav")
        assert request(speech_url, "/api/transcribe", {"audio": audio}) == (400, {"error": error})
    for size, error in [
        ((5000, 4000), "image is 5000x4000; the limit is 16777216 pixels"),  # a small file
        ((20000, 10000), "image has more than 16777216 pixels, the limit"),  # past Pillow's own limit
    ]:
        image = to_url(png(PILImage.new("1", size)), "image/png")
        assert request(speech_url, "/api/caption", {"image": image}) == (400, {"error": error})


def test_a_task_the_checkpoint_cannot_do_is_400_naming_it(speech_url, edit_url):
    status, reply = request(speech_url, "/api/edit", {"image": gif(), "instruction": "x"})
    assert status == 400
    assert (
        reply["error"]
        == "this checkpoint cannot do edit (it can do: caption, interleaved, speech, text_to_image)"
    )
    status, reply = request(edit_url, "/api/speak", {"text": "hello"})
    assert status == 400 and reply["error"].startswith("this checkpoint cannot do speech")


def test_bodies_routes_and_methods(speech_url):
    for body, error in [
        (b"{not json", "the request body is not JSON"),
        (b"\xff\xfe", "the request body is not JSON"),
        (b"", "the request body is not JSON"),
        (b"[1, 2]", "the request body must be a JSON object"),
    ]:
        assert request(speech_url, "/api/text_to_image", body) == (400, {"error": error})
    assert request(speech_url, "/api/nothing", {})[0] == 404
    assert request(speech_url, "/nothing")[0] == 404
    assert request(speech_url, "/api/caption") == (
        405,
        {"error": "/api/caption takes a POST with a JSON body"},
    )

    host, port = speech_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)  # a body too large is never read
    conn.putrequest("POST", "/api/caption")
    conn.putheader("Content-Length", str(100 * 2**20))
    conn.endheaders()
    reply = conn.getresponse()
    assert reply.status == 400 and json.load(reply)["error"].startswith(
        "the request body is 100.0 MB; the limit is 6.7 MB"
    )
    conn.close()


def test_a_failure_is_500_in_one_line_and_the_server_keeps_serving(speech_model, capfd):
    def broken(*args, **kwargs):
        raise RuntimeError("the sampler broke\nat line two")

    with serving(Wrapped(speech_model, generate_images=broken)) as url:
        status, reply = request(url, "/api/text_to_image", {"prompt": "a red circle"})
        assert status == 500 and reply == {"error": "RuntimeError: the sampler broke"}
        assert "Traceback" in capfd.readouterr().err  # for whoever runs the server
        status, reply = request(url, "/api/caption", {"image": to_url(png(scene()), "image/png")})
        assert status == 200 and isinstance(reply["caption"], str)


def test_requests_run_one_at_a_time(speech_model):
    running, overlaps, lock = [0], [], threading.Lock()

    def slow(*args, **kwargs):
        with lock:
            running[0] += 1
            overlaps.append(running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return speech_model.generate_images(*args, **kwargs)

    with serving(Wrapped(speech_model, generate_images=slow)) as url:
        replies = []
        threads = [
            threading.Thread(
                target=lambda: replies.append(request(url, "/api/text_to_image", {"prompt": "a", "n": 1}))
            )
            for _ in range(4)
        ]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [status for status, _ in replies] == [200] * 4
    assert overlaps == [1, 1, 1, 1] and time.perf_counter() - start >= 0.8  # queued, not refused


# ---- the command line -------------------------------------------------------------------------


@contextlib.contextmanager
def sigint_disposition(handler):
    """SIGINT handled by `handler` in this process for the duration (main thread only)."""
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def start_serving(ckpt: Path) -> subprocess.Popen:
    """`motfusion serve --port 0` in a child that Ctrl-C (SIGINT) stops. A child inherits an
    ignored SIGINT, and Python then never raises KeyboardInterrupt: so it is when pytest runs as a
    background job of a script (`pytest &`). exec resets a caught signal to its default, so the
    child starts while this process catches SIGINT."""
    with sigint_disposition(signal.default_int_handler):
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "motfusion",
                "serve",
                "--ckpt",
                str(ckpt),
                "--port",
                "0",
                "--device",
                "cpu",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"},
        )


# "ignored": how this process starts as a background job of a script; the serve child hung then.
@pytest.mark.parametrize("parent_sigint", ["default", "ignored"])
def test_serve_command_binds_localhost_and_prints_its_url(edit_run, parent_sigint):
    handler = signal.SIG_IGN if parent_sigint == "ignored" else signal.getsignal(signal.SIGINT)
    with sigint_disposition(handler):
        proc = start_serving(edit_run)
    try:
        line = proc.stdout.readline()
        match = re.fullmatch(
            rf"serving {re.escape(str(edit_run))} at (http://127\.0\.0\.1:\d+) \(Ctrl-C stops\)\n", line
        )
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        status, info = request(match[1], "/api/info")
        assert status == 200 and "edit" in info["capabilities"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # it did not stop: say where it hung
            proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack to stderr
            out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out.strip() == "stopped", (proc.returncode, out, err)


def test_serve_command_errors_are_one_line(edit_run, capsys):
    code, _, err = cli(capsys, "serve", "--ckpt", edit_run, "--port", "70000")
    assert code == 2
    assert_one_line(err, "--port=70000: use 0 to 65535")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = cli(capsys, "serve", "--ckpt", edit_run, "--port", port, "--device", "cpu")
    assert code == 2
    assert_one_line(err, f"cannot listen on 127.0.0.1:{port}: Address already in use")


# ---- the page, in headless Chromium -----------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(
            f"needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver (make debs)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 60):
    return WebDriverWait(driver, timeout).until(condition)


def type_into(driver, selector: str, text: str) -> None:
    element = driver.find_element("css selector", selector)
    element.clear()
    element.send_keys(text)


def canvas_picture(driver) -> PILImage.Image:
    canvas = driver.find_element("css selector", "#caption-source canvas")
    return picture(driver.execute_script("return arguments[0].toDataURL()", canvas)).convert("RGB")


def red_pixels(pic: PILImage.Image) -> int:
    rgb = np.asarray(pic).astype(int)  # (H, W, 3)
    return int(((rgb[..., 0] > 180) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)).sum())


def caption_on_page(driver) -> str:
    """Press Caption and wait for the caption (the page's output is emptied first)."""
    driver.execute_script("document.getElementById('caption-out').textContent = ''")
    driver.find_element("css selector", "#caption-form button").click()
    out = wait(driver, lambda d: d.find_element("id", "caption-out").get_attribute("textContent"))
    return "" if out == "(the model wrote nothing)" else out


def test_the_page_generates_captions_and_edits_in_chromium(browser, edit_url, edit_model, tmp_path):
    browser.get(edit_url)
    wait(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "true")
    tabs = [b.text for b in browser.find_elements("css selector", "#tabs button")]
    assert tabs == ["Text to image", "Image to text", "Interleaved", "Editing"]  # no speech tower, no tab

    # Text to image: a prompt, two images, three steps; the same pictures as the Python API.
    type_into(browser, "#t2i-form input[name=prompt]", "a red circle")
    type_into(browser, "#t2i-form input[name=n]", "2")
    type_into(browser, "#t2i-form input[name=steps]", "3")
    browser.find_element("css selector", "#t2i-form button").click()
    images = wait(browser, lambda d: d.find_elements("css selector", "#t2i-results img"))
    pictures = [picture(img.get_attribute("src")) for img in images]
    assert [(p.size, p.mode) for p in pictures] == [((16, 16), "RGB")] * 2
    assert same_images(pictures, edit_model.generate_images(["a red circle"], n=2, steps=3))
    assert browser.find_element("id", "error").text == ""

    # A value outside the limits: the server's message, on the page.
    type_into(browser, "#t2i-form input[name=n]", "99")
    browser.find_element("css selector", "#t2i-form button").click()
    wait(browser, lambda d: d.find_element("id", "error").text == "n must be an integer between 1 and 16")

    # Image to text: upload a PNG; it fills the canvas, whose picture is what gets captioned.
    browser.find_element("css selector", "#tabs button:nth-child(2)").click()
    scene().save(tmp_path / "scene.png")
    upload = browser.find_element("css selector", "#caption-source input[type=file]")
    upload.send_keys(str(tmp_path / "scene.png"))
    assert caption_on_page(browser) == edit_model.caption([canvas_picture(browser)])[0]
    assert red_pixels(canvas_picture(browser)) > 1000  # the disc

    # ... or draw one: a red stroke on the cleared canvas.
    browser.find_element("css selector", "#caption-source button.clear").click()
    canvas = browser.find_element("css selector", "#caption-source canvas")
    ActionChains(browser).move_to_element(canvas).click_and_hold().move_by_offset(60, 30).release().perform()
    assert 100 < red_pixels(canvas_picture(browser)) < 10_000  # a stroke, not the disc
    assert caption_on_page(browser) == edit_model.caption([canvas_picture(browser)])[0]
    assert browser.find_element("id", "error").text == ""

    # Editing: pick the first generated picture, write an instruction, get the edited picture.
    browser.find_element("css selector", "#tabs button:nth-child(1)").click()
    browser.find_element("xpath", "//*[@id='t2i-results']/figure[1]/button[text()='edit it']").click()
    type_into(browser, "#edit-form input[name=instruction]", "make it blue")
    browser.find_element("css selector", "#edit-form button").click()
    edited = wait(browser, lambda d: d.find_elements("css selector", "#edit-out img"))
    assert picture(edited[0].get_attribute("src")).size == (16, 16)
