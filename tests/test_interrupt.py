"""A long first call can be stopped, and says that it will be long.

* ``merge run`` on a 12 MP photo (the tiny preset: ~45 s of ONNX Runtime): SIGINT stops it with exit 130, SIGTERM
  with 143, each within ~2 s and with one line; the twin, the same code with the call in the main thread, still
  runs seconds after the signal (Python runs signal handlers between bytecodes of the main thread only);
* before the call, one line gives its image tokens and a ``--max-pixels`` that reduces them; on a terminal an
  elapsed-time ticker runs while it computes (erased after), with stderr not a terminal nothing else is written;
* from Python, a KeyboardInterrupt during ``generate`` stops the session's call and the model stays usable;
* ``verify`` writes its report and reference whole or not at all.
"""

from __future__ import annotations

import _thread
import io
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from merge.atomic import atomic_file
from merge.cli import main as cli_main
from merge.commands.run import TerminalWatch
from merge.runtime import CombinedModel
from merge.runtime.interrupt import LONG_CALL_TOKENS, STOP_GRACE, FirstCall, Watch, run_interruptibly, running_calls

ROOT = Path(__file__).resolve().parents[1]
NOTICE = "long first call:"
STOP_WITHIN = 3.0  # seconds from the signal to the exit: STOP_GRACE, then printing and leaving


@pytest.fixture(scope="module")
def combined(combined) -> Path:
    return combined("tiny")


def _photo(path: Path, width: int, height: int) -> Path:
    """A smooth picture (a noise PNG of 12 MP would take seconds to write and read)."""
    y, x = np.mgrid[0:height, 0:width]
    Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(path, quality=80)
    return path


@pytest.fixture(scope="module")
def phone_photo(tmp_path_factory) -> Path:
    """12 MP, 4032x3024: 11,907 image tokens on the tiny preset, a first call of ~45 s on 2 cores."""
    return _photo(tmp_path_factory.mktemp("photo") / "phone.jpg", 4032, 3024)


# -- merge run, in a child process -------------------------------------------------------------------------------

# The twin: the same command with ONNX Runtime's call made in the calling (main) thread, as before this change.
TWIN = """
import sys, threading, types
import merge.runtime.interrupt as interrupt

class InTheCallingThread(threading.Thread):
    def start(self):
        self.run()

twin = types.ModuleType("threading")
twin.__dict__.update(vars(threading), Thread=InTheCallingThread)
interrupt.threading = twin
from merge.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.fixture(autouse=True)
def sigint_as_on_a_terminal():
    """Ctrl-C raises KeyboardInterrupt here, as in a terminal, also when the suite runs as a shell's background job
    (which starts with SIGINT ignored: interrupt_main then does nothing, and a test waiting for it waits forever)."""
    before = signal.getsignal(signal.SIGINT)
    if before == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if before == signal.SIG_IGN:
        signal.signal(signal.SIGINT, before)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(combined: Path, photo: Path, *, twin: bool = False, stderr=subprocess.PIPE) -> subprocess.Popen:
    args = ["run", str(combined), "--image", str(photo), "--prompt", "Describe.", "--max-new-tokens", "2"]
    head = [sys.executable, "-c", TWIN] if twin else [sys.executable, "-m", "merge"]
    # SIGINT as a terminal's child has it: a shell's background job (pytest run with &) inherits it ignored, and
    # Python then installs no KeyboardInterrupt handler at all
    return subprocess.Popen(head + args, stdout=subprocess.PIPE, stderr=stderr, preexec_fn=_default_sigint,
                            env={**os.environ,
                            "PYTHONPATH": str(ROOT)})


def _read_until(fd: int, marker: bytes, seconds: float = 120) -> bytes:
    """What ``fd`` gives until ``marker`` has appeared (the child preprocesses a 12 MP photo first)."""
    seen = b""
    deadline = time.monotonic() + seconds
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{marker!r} never came; got {seen!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"the child closed its stderr before {marker!r}; got {seen!r}"
            seen += chunk
    return seen


def _stop(proc: subprocess.Popen, signum: int) -> tuple[int, float]:
    time.sleep(0.3)  # the notice comes right before the call: now ONNX Runtime computes
    assert proc.poll() is None
    sent = time.monotonic()
    proc.send_signal(signum)
    code = proc.wait(timeout=60)
    return code, time.monotonic() - sent


def test_ctrl_c_stops_a_long_first_call(combined, phone_photo):
    """SIGINT inside ONNX Runtime's call: exit 130 within seconds; stderr (not a terminal) holds the notice and one
    line, no ticker; nothing on stdout."""
    proc = _start(combined, phone_photo)
    try:
        seen = _read_until(proc.stderr.fileno(), NOTICE.encode())
        code, seconds = _stop(proc, signal.SIGINT)
    finally:
        proc.kill()
    err = (seen + proc.stderr.read()).decode()
    assert code == 130 and seconds < STOP_WITHIN, (code, seconds, err)
    notice, last = err.splitlines()
    assert notice.startswith(NOTICE) and " image tokens (1 image)" in notice and "--max-pixels 1048576" in notice
    assert f"\n{notice}\n" in (ROOT / "docs" / "cli.md").read_text(), "docs/cli.md pastes this line"
    assert last == "interrupted"
    assert "\r" not in err and proc.stdout.read() == b""
    print(f"SIGINT -> exit in {seconds:.2f} s")


def test_sigterm_stops_a_long_first_call_and_a_terminal_shows_the_ticker(combined, phone_photo):
    """SIGTERM with stderr on a terminal: the elapsed-time ticker runs, then exit 143 within seconds, the ticker
    erased and one line after it."""
    leader, follower = pty.openpty()
    proc = _start(combined, phone_photo, stderr=follower)
    os.close(follower)
    try:
        seen = _read_until(leader, b" s (Ctrl-C stops it)")  # the ticker's first tick, a second into the call
        code, seconds = _stop(proc, signal.SIGTERM)
        while select.select([leader], [], [], 0.5)[0]:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the child is gone: Linux ends a pty's reads with EIO
                break
            if not chunk:
                break
            seen += chunk
    finally:
        proc.kill()
        os.close(leader)
    err = seen.decode().replace("\r\n", "\n")
    assert code == 143 and seconds < STOP_WITHIN, (code, seconds, err)
    assert err.startswith(NOTICE) and err.count("\n") == 2
    ticker = err.split("\n")[1]
    assert ticker.startswith("\rfirst call: ") and ticker.endswith("\rterminated"), repr(ticker)
    print(f"SIGTERM -> exit in {seconds:.2f} s")


def test_twin_the_call_in_the_main_thread_ignores_the_signal(combined, phone_photo):
    """The catch the tests above rely on: with ONNX Runtime's call made in the main thread, SIGINT (and SIGTERM)
    waits for the call to end; the process is still running 3 s after."""
    proc = _start(combined, phone_photo, twin=True)
    try:
        _read_until(proc.stderr.fileno(), NOTICE.encode())
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGTERM)
        time.sleep(STOP_WITHIN)
        assert proc.poll() is None, "the twin stopped: the interrupt tests cannot tell the fix from its absence"
    finally:
        proc.kill()
        proc.wait()


def test_a_short_call_says_nothing(combined, tmp_path, capsys):
    """A picture of a few hundred tokens: no notice, no ticker; stderr stays empty."""
    photo = _photo(tmp_path / "small.jpg", 320, 240)
    assert cli_main(["run", str(combined), "--image", str(photo), "--prompt", "Describe.", "--max-new-tokens", "2"]) \
        == 0
    assert capsys.readouterr().err == ""


# -- the notice and the ticker ----------------------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _call(image_tokens: int, video_tokens: int = 0, num_images: int = 1, num_videos: int = 0) -> FirstCall:
    return FirstCall(prompt_tokens=image_tokens + video_tokens + 20, image_tokens=image_tokens,
                     video_tokens=video_tokens, num_images=num_images, num_videos=num_videos, pixels_per_token=1024)


def test_long_means_the_documented_number_of_vision_tokens():
    assert not _call(LONG_CALL_TOKENS - 1).long
    assert _call(LONG_CALL_TOKENS).long
    assert _call(LONG_CALL_TOKENS // 2, LONG_CALL_TOKENS // 2, num_videos=1).long
    assert f"{LONG_CALL_TOKENS:,}" in (ROOT / "docs" / "cli.md").read_text()


@pytest.mark.parametrize("terminal", [False, True])
def test_the_notice_names_the_tokens_and_how_to_have_fewer(terminal):
    stream = Terminal() if terminal else io.StringIO()
    watch = TerminalWatch(stream)
    watch.start(_call(11907))
    notice = stream.getvalue()
    assert notice == ("long first call: 11907 image tokens (1 image) before the first word; it can take minutes on a "
                      "CPU. --max-pixels 1048576 gives at most 1024 tokens per image. Ctrl-C stops it.\n")
    stream = io.StringIO()
    TerminalWatch(stream).start(_call(100, 3000, num_videos=2))
    assert "100 image tokens (1 image), 3000 video tokens (2 videos)" in stream.getvalue()
    assert "fewer frames: --max-frames N or a lower --fps" in stream.getvalue()
    stream = io.StringIO()
    TerminalWatch(stream).start(_call(LONG_CALL_TOKENS - 1))
    assert stream.getvalue() == ""


def test_the_ticker_runs_on_a_terminal_only_and_is_erased():
    tty, pipe = Terminal(), io.StringIO()
    for stream in (tty, pipe):
        watch = TerminalWatch(stream)
        watch.start(_call(10))
        for seconds in (0.1, 0.5, 0.9, 1.0, 1.4, 2.05, 2.5, 61.2):
            watch.tick(seconds)
        watch.stop()
    assert pipe.getvalue() == ""
    shown = tty.getvalue().split("\r")
    assert shown == ["", "first call: 1 s (Ctrl-C stops it)", "first call: 2 s (Ctrl-C stops it)",
                     "first call: 1 min 1 s (Ctrl-C stops it)", " " * 40, ""]


# -- run_interruptibly and the Python API -----------------------------------------------------------------------

def _interrupt_in(seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, _thread.interrupt_main)  # as Ctrl-C: KeyboardInterrupt in the main thread
    timer.start()
    return timer


def test_run_interruptibly_returns_and_raises_what_the_call_does():
    assert run_interruptibly(lambda options: (type(options).__name__, options.terminate)) == ("RunOptions", False)

    def fails(options):
        raise ValueError("from the call")

    with pytest.raises(ValueError, match="from the call"):
        run_interruptibly(fails)
    assert not running_calls()


def test_an_interrupt_sets_terminate_and_the_call_ends():
    seen: list[ort.RunOptions] = []

    def until_terminated(options):  # what ONNX Runtime does between nodes
        seen.append(options)
        while not options.terminate:
            time.sleep(0.01)
        raise RuntimeError("Exiting due to terminate flag being set to true.")

    _interrupt_in(0.3)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_interruptibly(until_terminated)
    assert time.monotonic() - start < 1 and seen[0].terminate and not running_calls()


def test_a_node_that_runs_on_is_left_behind_after_the_grace():
    """One node is not stopped inside (a vision attention over a whole 12 MP image: seconds): the caller gets its
    exception after STOP_GRACE, and the call, told to terminate, ends on its own at the node's end."""
    release = threading.Event()
    _interrupt_in(0.2)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_interruptibly(lambda options: release.wait(30))
    assert STOP_GRACE <= time.monotonic() - start < STOP_GRACE + 1
    [left] = running_calls()
    release.set()
    left.join(5)
    assert not running_calls()


def test_a_non_interrupt_error_in_the_waiting_thread_also_terminates():
    class Breaks(Watch):
        def tick(self, seconds: float) -> None:
            raise BrokenPipeError("stderr went away")

    seen = []

    def until_terminated(options):
        seen.append(options)
        while not options.terminate:
            time.sleep(0.01)

    with pytest.raises(BrokenPipeError):
        run_interruptibly(until_terminated, watch=Breaks())
    assert seen[0].terminate and not running_calls()


def test_keyboard_interrupt_during_generate_stops_the_session_run(combined):
    """From Python (a notebook's interrupt): generate raises KeyboardInterrupt within the grace, ONNX Runtime's
    call ends, and the same model answers the next call, also with the in-place cache."""
    model = CombinedModel(combined)
    photo = Image.fromarray(np.full((1536, 2048, 3), 128, np.uint8))  # 3 MP: nodes short enough to end quickly
    inputs = model.preprocessor.build_inputs("Describe.", [photo])

    class InterruptInside(Watch):
        sent = 0.0

        def tick(self, seconds: float) -> None:
            if seconds >= 0.2 and not self.sent:  # inside the call however fast the machine: as Ctrl-C would
                self.sent = time.monotonic()
                _thread.interrupt_main()

    watch = model.watch = InterruptInside()
    assert model.cache_in_place
    with pytest.raises(KeyboardInterrupt):
        model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"],
                       max_new_tokens=2)
    assert time.monotonic() - watch.sent < STOP_GRACE + 0.5
    deadline = time.monotonic() + 10
    while running_calls() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running_calls(), "ONNX Runtime's call went on computing"
    model.watch = None
    small = model.preprocessor.build_inputs("Describe.", [photo.resize((64, 48))])
    again = model.generate(small["input_ids"], small["attention_mask"], small["pixel_values"], small["image_grid_thw"],
                           max_new_tokens=3)
    plain = model.generate(small["input_ids"], small["attention_mask"], small["pixel_values"], small["image_grid_thw"],
                           max_new_tokens=3, in_place=False)
    assert np.array_equal(again.tokens, plain.tokens)


# -- nothing half-written ---------------------------------------------------------------------------------------

def test_atomic_file_is_whole_or_absent(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("the previous report\n")
    with pytest.raises(KeyboardInterrupt), atomic_file(path) as f:
        f.write(b"half of a new rep")
        raise KeyboardInterrupt
    assert path.read_text() == "the previous report\n" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    with atomic_file(path) as f:
        f.write(b"the new report\n")
    assert path.read_text() == "the new report\n" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_interrupted_save_reference_leaves_no_file(tmp_path, monkeypatch):
    from merge.tools import verify

    def interrupted(f, **arrays):
        f.write(b"PK\x03\x04 the first bytes of a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(verify.np, "savez_compressed", interrupted)
    target = tmp_path / "refs" / "reference.npz"
    with pytest.raises(KeyboardInterrupt):
        verify.save_reference(target, {"input_ids": np.zeros((1, 2), np.int64)}, {}, "fp32")
    assert list(tmp_path.rglob("*")) == [tmp_path / "refs"]
