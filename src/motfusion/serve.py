"""`motfusion serve`: a web playground over one trained model.

The standard library's ThreadingHTTPServer serves one page (serve_page.html: HTML, CSS and plain JS)
and a small JSON API over the `MotFusion` verbs (pipeline.py):

    GET  /                   the page
    GET  /api/info           the checkpoint's name, capabilities, limits and sampling defaults
    POST /api/text_to_image  {prompt, n, steps, guidance, best_of, seed} -> {images: [PNG data URL]}
    POST /api/caption        {image: PNG/JPEG data URL, seed}       -> {caption}
    POST /api/interleaved    {prompt, seed}                         -> {segments: [{text | image | units}]}
    POST /api/speak          {text, seed}                           -> {audio: WAV data URL, seconds_of_audio}
    POST /api/transcribe     {audio: WAV data URL, seed}            -> {text}
    POST /api/edit           {image, instruction, steps, guidance, seed} -> {image}

A route the checkpoint cannot do (its `capabilities`), a value outside LIMITS, a missing field or a
body that is not a JSON object is HTTP 400 with {"error": one line naming what to fix}; anything else
that fails is 500 with one line, and the server keeps serving. One lock around the model: requests
queue and run one at a time. The server listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import socket
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from PIL import Image as PILImage

from motfusion.codecs.audio import read_wav, write_wav
from motfusion.errors import ConfigError, DataError
from motfusion.pipeline import MotFusion
from motfusion.sequence import Units

LIMITS = {  # field -> (lowest, highest): what every request is checked against
    "n": (1, 16),
    "steps": (1, 200),
    "guidance": (1.0, 20.0),
    "best_of": (1, 8),
    "seed": (0, 2**31 - 1),
}
DEFAULT_N = 4  # images per prompt when a request names none
MAX_TEXT_CHARS = 200  # prompt, text to speak, edit instruction
MAX_UPLOAD_BYTES = 5 * 2**20  # one uploaded image or WAV file, decoded
MAX_BODY_BYTES = MAX_UPLOAD_BYTES * 4 // 3 + 2**16  # its base64 and the other fields
MAX_IMAGE_PIXELS = 4096 * 4096  # checked on the header, before an upload is decoded
MAX_AUDIO_SECONDS = 30
AUDIO_RATE = 16_000  # uploads are read at this rate; `transcribe` resamples to the codec's own
IMAGE_FORMATS = {"PNG", "JPEG"}
PAGE = resources.files("motfusion").joinpath("serve_page.html").read_bytes()


class RequestError(ValueError):
    """A request the user can fix: HTTP 400 with this one-line message."""


# ---- reading a request's fields ---------------------------------------------------------------


def field(body: dict, key: str) -> Any:
    if key not in body:
        raise RequestError(f"missing field {key!r}")
    return body[key]


def text_field(body: dict, key: str) -> str:
    text = field(body, key)
    if not isinstance(text, str) or not text.strip():
        raise RequestError(f"{key} must be a non-empty string")
    if len(text) > MAX_TEXT_CHARS:
        raise RequestError(f"{key} is {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    return text


def number_field(body: dict, key: str, default: float | None) -> int | float | None:
    """An integer (guidance: any number) within LIMITS[key]; `default` when the field is absent."""
    value = body.get(key, default)
    if value is None:
        return None
    lo, hi = LIMITS[key]
    whole = isinstance(lo, int)
    typed = isinstance(value, int if whole else (int, float)) and not isinstance(value, bool)
    if not (typed and lo <= value <= hi):  # nan fails the range too
        raise RequestError(f"{key} must be {'an integer' if whole else 'a number'} between {lo} and {hi}")
    return value if whole else float(value)


def upload_field(body: dict, key: str) -> bytes:
    """The bytes of a `data:MIME;base64,...` URL, at most MAX_UPLOAD_BYTES."""
    url = field(body, key)
    head, sep, payload = url.partition(",") if isinstance(url, str) else ("", "", "")
    if not (sep and head.startswith("data:") and head.endswith(";base64")):
        raise RequestError(f"{key} must be a base64 data URL (data:...;base64,...)")
    try:
        data = base64.b64decode(payload, validate=True)  # bounded by MAX_BODY_BYTES
    except binascii.Error:
        raise RequestError(f"{key} is not valid base64") from None
    if len(data) > MAX_UPLOAD_BYTES:
        raise RequestError(f"{key} is {len(data):,} bytes; the limit is {MAX_UPLOAD_BYTES >> 20} MB")
    return data


def image_field(body: dict, key: str = "image") -> PILImage.Image:
    """An uploaded PNG or JPEG, decoded once its header has passed the format and size checks."""
    data = upload_field(body, key)
    unreadable = RequestError(f"{key} is not an image Pillow can read: send a PNG or a JPEG")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)  # MAX_IMAGE_PIXELS below
            pic = PILImage.open(io.BytesIO(data))  # the header only
    except PILImage.DecompressionBombError:  # Pillow's own limit, far above ours
        raise RequestError(f"{key} has more than {MAX_IMAGE_PIXELS} pixels, the limit") from None
    except OSError:
        raise unreadable from None
    if pic.format not in IMAGE_FORMATS:
        raise RequestError(f"{key} is a {pic.format} image; send a PNG or a JPEG")
    if pic.width * pic.height > MAX_IMAGE_PIXELS:
        raise RequestError(f"{key} is {pic.width}x{pic.height}; the limit is {MAX_IMAGE_PIXELS} pixels")
    try:
        pic.load()
    except OSError:  # truncated or corrupt after a valid header
        raise unreadable from None
    return pic


def audio_field(body: dict, key: str = "audio") -> torch.Tensor:
    """An uploaded WAV (or any file libsndfile reads) -> waveform (S,) at AUDIO_RATE."""
    data = upload_field(body, key)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "upload.wav"
        path.write_bytes(data)
        try:
            wave = read_wav(path, AUDIO_RATE)  # (S,)
        except DataError:
            raise RequestError(f"{key} is not audio libsndfile reads: send a WAV file") from None
    if wave.numel() == 0:
        raise RequestError(f"{key} holds no sound")
    if wave.numel() > MAX_AUDIO_SECONDS * AUDIO_RATE:
        raise RequestError(
            f"{key} lasts {wave.numel() / AUDIO_RATE:.1f} s; the limit is {MAX_AUDIO_SECONDS} s"
        )
    return wave


# ---- writing a reply's fields -----------------------------------------------------------------


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def png_url(pic: PILImage.Image) -> str:
    buf = io.BytesIO()
    pic.save(buf, format="PNG")
    return data_url("image/png", buf.getvalue())


def wav_url(wave: torch.Tensor, rate: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        write_wav(path, wave, rate)
        return data_url("audio/wav", path.read_bytes())


def segment(seg: str | PILImage.Image | Units) -> dict:
    """One piece of interleaved output as JSON: text, an image, or the units of another span."""
    if isinstance(seg, PILImage.Image):
        return {"image": png_url(seg)}
    if isinstance(seg, Units):
        return {"units": seg.modality, "count": len(seg.ids)}
    return {"text": seg}


# ---- the routes -------------------------------------------------------------------------------


class Playground:
    """One model behind a lock; each route method takes a request's JSON object and returns the reply's."""

    def __init__(self, model: MotFusion, name: str = ""):
        self.model, self.name = model, name
        self.capabilities = model.capabilities
        self.lock = threading.Lock()

    def handle(self, path: str, body: dict) -> dict:
        capability, route = ROUTES[path]
        if capability not in self.capabilities:
            can = ", ".join(sorted(self.capabilities)) or "nothing"
            raise RequestError(f"this checkpoint cannot do {capability} (it can do: {can})")
        return route(self, body)

    def info(self) -> dict:
        """What the page needs to build itself: which tabs, the limits of the controls, their defaults."""
        sample = self.model.generator.cfg
        return {
            "name": self.name,
            "capabilities": sorted(self.capabilities),
            "image_size": self.model.cfg.data.image_size,
            "limits": {**LIMITS, "text_chars": MAX_TEXT_CHARS, "upload_bytes": MAX_UPLOAD_BYTES},
            "defaults": {
                "n": DEFAULT_N,
                "steps": sample.steps,
                "guidance": sample.guidance,
                "best_of": sample.best_of,
                "seed": 0,
            },
        }

    def text_to_image(self, body: dict) -> dict:
        prompt = text_field(body, "prompt")
        n, seed = number_field(body, "n", DEFAULT_N), number_field(body, "seed", 0)
        steps, guidance = number_field(body, "steps", None), number_field(body, "guidance", None)
        best_of = number_field(body, "best_of", None)
        with self.lock:
            pics = self.model.generate_images(
                [prompt], n=n, seed=seed, steps=steps, guidance=guidance, best_of=best_of
            )
        return {"images": [png_url(p) for p in pics]}

    def caption(self, body: dict) -> dict:
        pic, seed = image_field(body), number_field(body, "seed", 0)
        with self.lock:
            return {"caption": self.model.caption([pic], seed=seed)[0]}

    def interleaved(self, body: dict) -> dict:
        prompt, seed = text_field(body, "prompt"), number_field(body, "seed", 0)
        with self.lock:
            segments = self.model.interleaved(prompt, seed=seed)
        return {"segments": [segment(s) for s in segments]}

    def speak(self, body: dict) -> dict:
        text, seed = text_field(body, "text"), number_field(body, "seed", 0)
        with self.lock:
            wave, rate = self.model.speak(text, seed=seed)  # (T,)
        return {"audio": wav_url(wave, rate), "seconds_of_audio": round(wave.numel() / rate, 2)}

    def transcribe(self, body: dict) -> dict:
        wave, seed = audio_field(body), number_field(body, "seed", 0)
        with self.lock:
            return {"text": self.model.transcribe([wave], seed=seed, sample_rate=AUDIO_RATE)[0]}

    def edit(self, body: dict) -> dict:
        pic, instruction = image_field(body), text_field(body, "instruction")
        seed = number_field(body, "seed", 0)
        steps, guidance = number_field(body, "steps", None), number_field(body, "guidance", None)
        with self.lock:
            edited = self.model.edit([pic], [instruction], seed=seed, steps=steps, guidance=guidance)
        return {"image": png_url(edited[0])}


Route = Callable[[Playground, dict], dict]
ROUTES: dict[str, tuple[str, Route]] = {  # path -> (the capability it needs, its method)
    "/api/text_to_image": ("text_to_image", Playground.text_to_image),
    "/api/caption": ("caption", Playground.caption),
    "/api/interleaved": ("interleaved", Playground.interleaved),
    "/api/speak": ("speech", Playground.speak),
    "/api/transcribe": ("speech", Playground.transcribe),
    "/api/edit": ("edit", Playground.edit),
}


# ---- HTTP -------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    server: PlaygroundServer

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self.reply(HTTPStatus.OK, PAGE, "text/html; charset=utf-8")
        elif path == "/api/info":
            self.reply_json(HTTPStatus.OK, self.server.playground.info())
        elif path in ROUTES:
            self.reply_json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{path} takes a POST with a JSON body"})
        else:
            self.reply_json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path not in ROUTES:
            self.close_connection = True  # its body stays unread
            self.reply_json(HTTPStatus.NOT_FOUND, {"error": f"no such route: {path}"})
            return
        start = time.perf_counter()
        try:
            reply = self.server.playground.handle(path, self.read_json())
        except (RequestError, ConfigError, DataError) as e:
            self.reply_json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except Exception as e:  # the server keeps serving; the traceback goes to its log
            traceback.print_exc()
            first_line = (str(e).strip().splitlines() or [""])[0]
            self.reply_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {first_line}"})
        else:
            self.reply_json(HTTPStatus.OK, {**reply, "seconds": round(time.perf_counter() - start, 2)})

    def read_json(self) -> dict:
        """The request's body as a JSON object, at most MAX_BODY_BYTES."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True  # the body is not read
            if length < 0:
                raise RequestError("the request has no Content-Length: send a JSON body")
            raise RequestError(
                f"the request body is {length / 2**20:.1f} MB; the limit is {MAX_BODY_BYTES / 2**20:.1f} MB "
                f"(an upload of {MAX_UPLOAD_BYTES >> 20} MB and the other fields)"
            )
        try:
            body = json.loads(self.rfile.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RequestError("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    def reply_json(self, status: HTTPStatus, obj: dict) -> None:
        self.reply(status, json.dumps(obj).encode(), "application/json")

    def reply(self, status: HTTPStatus, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)


class PlaygroundServer(ThreadingHTTPServer):
    daemon_threads = True  # a request still running does not hold up Ctrl-C

    def __init__(self, playground: Playground, host: str, port: int):
        self.playground = playground
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_server(
    model: MotFusion, host: str = "127.0.0.1", port: int = 7860, name: str = ""
) -> PlaygroundServer:
    """A server bound to host:port (port 0: a free one, see `.url`), not yet serving."""
    try:
        return PlaygroundServer(Playground(model, name), host, port)
    except OSError as e:  # the port is taken, or the host is not an address of this machine
        raise ConfigError(
            f"cannot listen on {host}:{port}: {e.strerror or e} (try another --port, or --port 0 for a free one)"
        ) from None


def run(model: MotFusion, host: str = "127.0.0.1", port: int = 7860, name: str = "") -> None:
    """Serve the playground until Ctrl-C."""
    with make_server(model, host, port, name) as server:
        print(f"serving {name or 'the model'} at {server.url} (Ctrl-C stops)", flush=True)
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(f"note: listening on {host}: anyone who can reach it can use the model", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped", flush=True)
