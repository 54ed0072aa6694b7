"""``merge serve`` through the official ``openai`` client on loopback: answers equal ``CombinedModel.chat`` alone.

* text, a conversation, images (PNG, and a JPEG turned by its EXIF orientation), a video (a file as a data: URL, a
  folder of frames under --allow-local-media), streamed and not, with usage;
* media sources: file:// only under the allowed folder (symbolic links out of it refused), http(s) only when allowed
  (a local http.server), within the byte and time limits;
* every error class as OpenAI's JSON with its status (400 naming the field, 404, 405, 413, 429, 500, 503), never a
  traceback, the server serving on after each;
* a client that disconnects has its request cancelled (streamed or not); a reader that stalls holds up no one;
* the command line (a subprocess: start, answer, SIGTERM) and the runtime's lightness (no web package imported).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from merge.runtime import CombinedModel, Sampling
from merge.serve.app import background_server as running_server
from merge.serve.media import MediaPolicy
from merge.serve.service import ServeOptions, Service
from merge.tools.verify import default_images
from tests.videos import write_clip, write_frames

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 12


@pytest.fixture(scope="module")
def folder(combined) -> Path:
    return combined("tiny")


@pytest.fixture(scope="module")
def model(folder) -> CombinedModel:
    return CombinedModel(folder)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def server(folder, media_dir):
    """The main server: local media under ``media_dir``, remote media allowed (short timeout, 1 MiB)."""
    policy = MediaPolicy(max_bytes=1 << 20, local_root=media_dir, remote=True, timeout=1.0)
    service = Service(folder, ServeOptions(max_batch=4, max_queue=64, max_tokens=256, media=policy,
                                           model_name="tiny"))
    with running_server(service) as url:
        yield url, service


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _data_url(image: Image.Image, kind: str = "PNG", **save) -> str:
    buffer = io.BytesIO()
    image.save(buffer, kind, **save)
    return f"data:image/{kind.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def _user(text: str, *urls: str, kind: str = "image_url") -> list[dict]:
    parts = [{"type": kind, kind: {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _post(url: str, body, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


# -- answers -------------------------------------------------------------------------------------------------------


def test_models_and_health(server, client):
    url, _ = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["model"] == "tiny" and health["running"] == 0


def test_text_whole_and_streamed_equal_chat_alone(client, model):
    completion = model.complete("Hello there.", max_new_tokens=TOKENS)
    answer = client.chat.completions.create(model="tiny", messages=_user("Hello there."), max_tokens=TOKENS)
    assert answer.choices[0].message.content == completion.texts[0]
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == completion.finish_reasons[0]
    assert answer.usage.prompt_tokens == completion.prompt_tokens
    assert answer.usage.completion_tokens == completion.generation.tokens.shape[1]
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    stream = client.chat.completions.create(model="tiny", messages=_user("Hello there."), max_tokens=TOKENS,
                                            stream=True, stream_options={"include_usage": True})
    text, chunks = _stream_text(stream)
    assert text == completion.texts[0]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == completion.finish_reasons[0]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    assert len(chunks) > 3  # the text came in pieces


def test_string_content_sampling_and_stop(client, model):
    """A plain string content is one user turn; seeded sampling and stop strings as chat() gives them."""
    sampling = Sampling(temperature=1.3, top_p=0.9, top_k=40, seed=11)
    want = model.chat("Tell me a story.", max_new_tokens=30, sampling=sampling, stop=["ab"])[0]
    options = dict(model="tiny", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=30,
                   temperature=1.3, top_p=0.9, seed=11, stop=["ab"], extra_body={"top_k": 40})
    assert client.chat.completions.create(**options).choices[0].message.content == want
    assert _stream_text(client.chat.completions.create(**options, stream=True))[0] == want


def test_conversation_uses_the_chat_template(client, model):
    """system (and developer, its new name), user, assistant, user: the folder's template renders all of them."""
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
                {"role": "user", "content": [{"type": "text", "text": "And now?"}]}]
    template = [{"role": "system", "content": "Be brief."}, *messages[1:]]
    inputs = model.preprocessor.build_message_inputs(template)
    text = model.preprocessor.tokenizer.decode(inputs["input_ids"][0].tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    tokens = model.generate(inputs["input_ids"], max_new_tokens=TOKENS).tokens[0].tolist()
    eos = model.preprocessor.eos_token_ids
    tokens = tokens[:next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]
    answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=TOKENS)
    assert answer.choices[0].message.content == model.preprocessor.decode(tokens)
    assert answer.usage.prompt_tokens == inputs["input_ids"].shape[1]


def test_one_turn_messages_encode_as_build_inputs(model):
    images = default_images(2)
    one_turn = model.preprocessor.build_inputs("Compare.", images)
    parts = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]
    messages = [{"role": "user", "content": parts}]
    as_messages = model.preprocessor.build_message_inputs(messages, images)
    for key in one_turn:
        np.testing.assert_array_equal(one_turn[key], as_messages[key])


def test_images_whole_and_streamed(client, model):
    images = default_images(2)
    want = model.chat("Compare these.", images, max_new_tokens=TOKENS)[0]
    messages = _user("Compare these.", *(_data_url(i) for i in images))
    assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=TOKENS
                                          ).choices[0].message.content == want
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=TOKENS, stream=True)
    assert _stream_text(stream)[0] == want


def test_exif_rotated_jpeg_answers_as_the_upright_image(client, model):
    """A phone JPEG: pixels stored sideways (96 wide, 64 high) with EXIF orientation 6 (turn 90 degrees clockwise to
    show). The server turns it upright (64 wide, 96 high); the raw pixels, a twin, give another answer."""
    upright = default_images(1)[0].resize((64, 96))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=95, exif=exif)
    decoded = Image.open(io.BytesIO(buffer.getvalue()))
    decoded.load()
    shown = decoded.transpose(Image.Transpose.ROTATE_270)  # orientation 6 undone by hand, not by load_image
    assert shown.size == (64, 96)
    url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    answer = client.chat.completions.create(model="tiny", messages=_user("Describe.", url), max_tokens=TOKENS)
    assert answer.choices[0].message.content == model.chat("Describe.", [shown], max_new_tokens=TOKENS)[0]
    assert answer.choices[0].message.content != model.chat("Describe.", [decoded], max_new_tokens=TOKENS)[0]


def test_video_as_data_url_and_as_local_frames(client, model, media_dir, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", 9, 6, 64, 48)
    want = model.chat("What happens?", videos=[clip], max_new_tokens=TOKENS)[0]
    url = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    messages = _user("What happens?", url, kind="video_url")
    answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=TOKENS)
    assert answer.choices[0].message.content == want
    assert answer.usage.prompt_tokens == model.complete("What happens?", videos=[clip], max_new_tokens=1).prompt_tokens
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=TOKENS, stream=True)
    assert _stream_text(stream)[0] == want

    frames = write_frames(media_dir / "frames", 4, 64, 48)
    want = model.chat("And this?", videos=[frames], max_new_tokens=TOKENS)[0]
    messages = _user("And this?", frames.as_uri(), kind="video_url")
    assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=TOKENS
                                          ).choices[0].message.content == want


# -- where media may come from -------------------------------------------------------------------------------------


def _bad(client, messages, status: int = 400, **options) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=options.pop("model", "tiny"), messages=messages,
                                       max_tokens=options.pop("max_tokens", 4), **options)
    assert caught.value.status_code == status, caught.value.body
    assert "Traceback" not in str(caught.value.body)
    return caught.value


def test_local_files_only_under_the_allowed_folder(client, model, media_dir, tmp_path):
    picture = media_dir / "picture.png"
    default_images(1)[0].save(picture)
    want = model.chat("Describe.", [picture], max_new_tokens=TOKENS)[0]
    answer = client.chat.completions.create(model="tiny", messages=_user("Describe.", picture.as_uri()),
                                            max_tokens=TOKENS)
    assert answer.choices[0].message.content == want

    outside = tmp_path / "outside.png"
    default_images(1)[0].save(outside)
    link = media_dir / "link.png"
    link.symlink_to(outside)
    for path in (outside, link, media_dir / ".." / outside.name, media_dir / "missing.png"):
        error = _bad(client, _user("Describe.", "file://" + str(path)))
        assert error.body["param"] == "messages[0].content[0].image_url.url"
    (media_dir / "not-an-image.png").write_text("hello")
    error = _bad(client, _user("Describe.", (media_dir / "not-an-image.png").as_uri()))
    assert "not an image" in error.body["message"]


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/slow"):
            time.sleep(2.5)
        super().do_GET()


@pytest.fixture(scope="module")
def http_files(tmp_path_factory):
    """A plain http.server on loopback over a folder: picture.png, big.bin (2 MiB), and /slow/... answering late."""
    root = tmp_path_factory.mktemp("http")
    default_images(1)[0].save(root / "picture.png")
    (root / "slow").mkdir()
    default_images(1)[0].save(root / "slow" / "picture.png")
    (root / "big.bin").write_bytes(os.urandom(2 << 20))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Files, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def test_remote_media_within_limits(client, model, http_files):
    base, root = http_files
    want = model.chat("Describe.", [root / "picture.png"], max_new_tokens=TOKENS)[0]
    answer = client.chat.completions.create(model="tiny", messages=_user("Describe.", base + "/picture.png"),
                                            max_tokens=TOKENS)
    assert answer.choices[0].message.content == want
    error = _bad(client, _user("Describe.", base + "/big.bin"), status=413)
    assert error.body["code"] == "media_too_large" and error.body["param"].endswith("image_url.url")
    start = time.monotonic()
    error = _bad(client, _user("Describe.", base + "/slow/picture.png"))
    assert "longer than 1 s" in error.body["message"] and time.monotonic() - start < 2.4
    error = _bad(client, _user("Describe.", base + "/missing.png"))
    assert "HTTP status 404" in error.body["message"]


# -- errors, each with its status ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(folder):
    """A server with the defaults for media (data: URLs only) and small limits; its engine can be held (``gate``)."""
    service = Service(folder, ServeOptions(max_batch=1, max_queue=1, max_tokens=64, max_prompt_tokens=200,
                                           max_request_bytes=64 << 10, media=MediaPolicy(max_bytes=8 << 10)))
    gate = threading.Event()
    gate.set()
    turn = service.engine._turn

    def held(admitted):
        gate.wait(30)
        turn(admitted)

    service.engine._turn = held
    with running_server(service) as url:
        yield url, service, gate, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


BAD_REQUESTS = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 65}, "max_tokens"),
    ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"model": None}, "model"),
    ({"model": 3}, "model"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].image_url"),
    ({"messages": _user("x", "data:image/png;base64,%%%")}, "messages[0].content[0].image_url.url"),
    ({"messages": _user("x", "data:image/png;base64,aGVsbG8=")}, "messages[0].content[0].image_url.url"),
    ({"messages": _user("x", "file:///etc/passwd")}, "messages[0].content[0].image_url.url"),
    ({"messages": _user("x", "http://127.0.0.1:9/picture.png")}, "messages[0].content[0].image_url.url"),
    ({"messages": _user("x", "ftp://example.com/a.png")}, "messages[0].content[0].image_url.url"),
    ({"messages": _user("x", "data:video/mp4;base64,aGVsbG8=", kind="video_url")},
     "messages[0].content[0].video_url.url"),
    ({"messages": _user("an <|image_pad|> typed")}, "messages"),
    ({"messages": _user("long " * 300)}, "messages"),
]


@pytest.mark.parametrize(("change", "param"), BAD_REQUESTS, ids=[p for _, p in BAD_REQUESTS])
def test_bad_requests_are_400_naming_the_field(plain, change, param):
    url, *_ = plain
    body = {"model": plain[1].name, "messages": _user("Hello."), "max_tokens": 4, **change}
    status, answer = _post(url + "/v1/chat/completions", body)
    assert status == 400, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == param, answer
    assert "Traceback" not in answer["error"]["message"] and "\n" not in answer["error"]["message"]


def test_status_for_each_error_class_and_serving_after(plain):
    url, service, gate, client = plain
    name = service.name
    # 400: not JSON, not an object; 404: another model, an unknown route; 405: a wrong method
    for raw, status in ((b"{not json", 400), (b"[1, 2]", 400), (b'{"a": ' * 100 + b"1" + b"}" * 100, 400)):
        code, answer = _post(url + "/v1/chat/completions", None, raw)
        assert code == status and answer["error"]["type"] == "invalid_request_error", answer
    error = _bad(client, _user("Hello."), status=404, model="gpt-4o")
    assert error.body["code"] == "model_not_found" and error.body["param"] == "model"
    code, answer = _post(url + "/v1/nothing", {})
    assert code == 404 and answer["error"]["code"] == "not_found"
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(url + "/v1/chat/completions", timeout=10)  # GET
    assert caught.value.code == 405 and json.loads(caught.value.read())["error"]["code"] == "method_not_allowed"
    # 413: a body past --max-request-bytes, an image past --max-media-bytes
    code, answer = _post(url + "/v1/chat/completions", {"model": name, "messages": _user("x" * (70 << 10))})
    assert code == 413 and answer["error"]["code"] == "request_too_large"
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8))
    error = _bad(client, _user("x", _data_url(noise)), status=413, model=name)
    assert error.body["code"] == "media_too_large"
    # 429: the engine held, one request running, one waiting: the next is refused
    gate.clear()
    answers: list = []
    threads = [threading.Thread(target=lambda: answers.append(client.chat.completions.create(
        model=name, messages=_user("Hello."), max_tokens=3))) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while service.engine.stats()["waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    error = _bad(client, _user("Hello."), status=429, model=name)
    assert error.body["type"] == "rate_limit_error" and error.body["code"] == "queue_full"
    assert error.response.headers["retry-after"] == "1"
    gate.set()
    for thread in threads:
        thread.join(30)
    assert len(answers) == 2
    # 500: a failure of ours, in one line; the server goes on
    def broken(*args, **kwargs):
        raise RuntimeError("a bug\nwith a second line")

    service.engine.model.new_cache = broken
    try:
        error = _bad(client, _user("Hello."), status=500, model=name)
    finally:
        del service.engine.model.new_cache
    assert error.body["type"] == "server_error" and error.body["message"].startswith("the model failed")
    assert "second line" not in error.body["message"]
    answer = client.chat.completions.create(model=name, messages=_user("Hello."), max_tokens=3)
    assert answer.choices[0].finish_reason == "length"


def test_a_stopped_engine_is_503(folder):
    service = Service(folder, ServeOptions(max_batch=1))
    with running_server(service) as url:
        service.engine.close()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        error = _bad(client, _user("Hello."), status=503, model=service.name)
        assert error.body["type"] == "service_unavailable"
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(url + "/health", timeout=10)
        assert caught.value.code == 503


# -- clients that go away or stall ---------------------------------------------------------------------------------


def _raw_request(url: str, body: dict) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@contextlib.contextmanager
def _slow_steps(service, seconds: float):
    step = service.engine._step

    def slow() -> None:
        time.sleep(seconds)
        step()

    service.engine._step = slow
    try:
        yield
    finally:
        service.engine._step = step


def _wait_for(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_is_cancelled(server, stream):
    url, service = server
    before = service.engine.stats()
    with _slow_steps(service, 0.01):  # 256 tokens: 2.5 s at least
        sock = _raw_request(url, {"model": "tiny", "messages": _user("Tell me everything."), "max_tokens": 256,
                                  "stream": stream})
        received = b""
        while stream and b"data: " not in received:
            received += sock.recv(4096)
        _wait_for(lambda: service.engine.stats()["running"] == 1)
        sock.close()
        start = time.monotonic()
        _wait_for(lambda: service.engine.stats().get("cancelled", 0) == before.get("cancelled", 0) + 1)
        assert time.monotonic() - start < 2
        assert service.engine.stats()["running"] == 0
        assert service.engine.stats().get("finished", 0) == before.get("finished", 0)


def test_a_stalled_reader_holds_up_no_one(server, client, model):
    url, service = server
    stalled = _raw_request(url, {"model": "tiny", "messages": _user("Tell me everything."), "max_tokens": 256,
                                 "stream": True})  # never read
    try:
        _wait_for(lambda: service.engine.stats()["running"] >= 1)
        start = time.monotonic()
        answer = client.chat.completions.create(model="tiny", messages=_user("Hi"), max_tokens=TOKENS)
        assert answer.choices[0].message.content == model.chat("Hi", max_new_tokens=TOKENS)[0]
        assert time.monotonic() - start < 10
    finally:
        stalled.close()


# -- the command line and the runtime's lightness ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_command_line_serves_and_stops_on_sigterm(folder, model):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "merge", "serve", str(folder), "--port", str(port),
                             "--max-batch", "2", "--model-name", "tiny"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.2)
        answer = client.chat.completions.create(model="tiny", messages=_user("Hello there."), max_tokens=TOKENS)
        assert answer.choices[0].message.content == model.chat("Hello there.", max_new_tokens=TOKENS)[0]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # a graceful stop (requests finished, the engine closed), then the command's usual exit for SIGTERM
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "serving" in err and err.strip().splitlines()[-1] == "terminated"


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--port", "70000"], "--port must be from 0 to 65535"),
    (["--allow-local-media", "/nonexistent-folder"], "is not a folder"),
    (["--media-timeout", "0"], "--media-timeout must be above 0"),
])
def test_command_line_bad_options_are_one_line(folder, argv, message, capsys):
    from merge.cli import main

    assert main(["serve", str(folder), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_command_line_without_the_serve_extra_says_so(folder, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["fastapi"] = None
        from merge.cli import main
        sys.exit(main(["serve", {str(folder)!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pip install 'qwen3vl-merge[serve]'" in proc.stderr, proc.stderr


WEB_PACKAGES = ("fastapi", "starlette", "uvicorn", "anyio", "pydantic", "httpx", "h11", "openai", "ray")


def test_the_runtime_and_its_engine_import_no_web_package(folder):
    script = textwrap.dedent(f"""
        import sys
        from merge.runtime import CombinedModel
        from merge.runtime.engine import Engine
        model = CombinedModel({str(folder)!r})
        with Engine(model) as engine:
            assert engine.submit(model.preprocessor.build_inputs("Hi", []), max_tokens=3).result(30).text is not None
        loaded = {{m.split(".")[0] for m, module in sys.modules.items() if module is not None}}
        assert not loaded & set({WEB_PACKAGES!r}), sorted(loaded & set({WEB_PACKAGES!r}))
        print("LIGHT OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "LIGHT OK" in proc.stdout, proc.stdout + proc.stderr
