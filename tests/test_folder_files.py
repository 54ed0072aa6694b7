"""The files a folder holds, and the paths a command line names, are read only as regular files and parsed within
bounds: the catalogue.

- a FIFO, socket or device in place of a file the tool reads is one line naming it and what it is (a FIFO would
  block whoever opens it: those cases run the command in a child process with a timeout, so a regression fails
  instead of hanging the suite);
- malformed JSON (nested 100,000 deep, NaN, a number with thousands of digits) is one line, never a RecursionError;
- a hostile chat template (its own raise_exception, an include, a sandbox refusal, a string of 10^11 characters,
  loops that never end, output without end) is one line naming the file, within a couple of seconds and a few GB;
- a config.json that disagrees with the model it came with (KV heads, layers, vision token ids) is one line.

Every case runs on a copy of the built tiny folder; the command exits 2 and prints one line starting "error: ".
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from merge.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
PROMPT = ["--prompt", "Describe.", "--max-new-tokens", "2"]
MEMORY_LIMIT = 8 << 30  # address space of a child: a template that allocates 10^11 bytes fails instead of swapping
CHILD_TIMEOUT = 60  # seconds: far past any case here (each takes about one), short enough that a hang fails


@pytest.fixture()
def folder(combined, tmp_path) -> Path:
    """A copy of the tiny folder, changed by the test."""
    out = tmp_path / "combined"
    shutil.copytree(combined("tiny"), out)
    return out


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _child(argv: list[str]) -> tuple[int, str, float]:
    """``python -m merge ARGV`` in a child process with a timeout and a memory limit: (exit status, stderr, seconds).
    A child that hangs (a FIFO opened for reading, a template loop) is killed and the test fails."""
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "merge", *map(str, argv)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=CHILD_TIMEOUT,
                              preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`merge {' '.join(map(str, argv))}` still ran after {CHILD_TIMEOUT} s (it hangs)")
    return proc.returncode, proc.stderr, time.perf_counter() - start


def _one_line(rc: int, err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err[-3000:])
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _in_process(argv: list[str], capsys) -> tuple[int, str]:
    rc = cli_main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


# -- not a regular file -------------------------------------------------------------------------------------------

def _replace_with_fifo(folder: Path, name: str) -> Path:
    (folder / name).unlink()
    os.mkfifo(folder / name)
    return folder / name


@pytest.mark.parametrize(("name", "command"), [
    ("tokenizer.json", "run"),
    ("merge.json", "inspect"),
    ("model.onnx.data", "verify"),
    ("model.onnx", "run"),
    ("config.json", "inspect"),
    ("chat_template.jinja", "run"),
])
def test_fifo_in_the_folder_is_one_line(name, command, folder, tmp_path):
    path = _replace_with_fifo(folder, name)
    argv = {"run": ["run", folder, *PROMPT], "inspect": ["inspect", folder],
            "verify": ["verify", folder, "--reference", tmp_path / "none.npz"]}[command]
    rc, err, _ = _child(argv)
    _one_line(rc, err, f"{path} is a named pipe (FIFO), not a regular file")


@pytest.mark.parametrize(("name", "command"), [("generation_config.json", "verify"), ("special.json", "build")])
def test_fifo_in_the_model_folder_is_one_line(name, command, sources, combined, tmp_path):
    """``--model FOLDER``: libraries that open the folder themselves (transformers reads a generation config
    when it finds one) never meet a FIFO: the folder is refused first, naming the entry."""
    model = tmp_path / "model"
    shutil.copytree(sources("tiny").folder, model)
    (model / name).unlink(missing_ok=True)
    os.mkfifo(model / name)
    argv = {"verify": ["verify", combined("tiny"), "--model", model, "--max-new-tokens", "1"],
            "build": ["build", "--model", model, "--out", tmp_path / "out"]}[command]
    rc, err, _ = _child(argv)
    _one_line(rc, err, f"--model {model}: {name} is a named pipe (FIFO), not a regular file")
    assert not (tmp_path / "out").exists()


def test_socket_in_the_folder_is_one_line(folder):
    path = folder / "tokenizer_config.json"
    path.unlink()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        rc, err, _ = _child(["run", folder, *PROMPT])
    _one_line(rc, err, f"{path} is a socket, not a regular file")


@pytest.mark.parametrize("option", ["--image", "--video"])
def test_fifo_as_an_image_or_video_is_one_line(option, combined, tmp_path):
    os.mkfifo(tmp_path / "input.fifo")
    rc, err, _ = _child(["run", combined("tiny"), *PROMPT, option, tmp_path / "input.fifo"])
    _one_line(rc, err, f"{tmp_path / 'input.fifo'} is a named pipe (FIFO), not a regular file")


def test_device_as_an_image_is_one_line(combined):
    rc, err, _ = _child(["run", combined("tiny"), *PROMPT, "--image", "/dev/zero"])
    _one_line(rc, err, "/dev/zero is a character device, not a regular file")


def test_fifo_as_the_reference_is_one_line(combined, tmp_path):
    os.mkfifo(tmp_path / "ref.npz")
    rc, err, _ = _child(["verify", combined("tiny"), "--reference", tmp_path / "ref.npz"])
    _one_line(rc, err, f"--reference {tmp_path / 'ref.npz'} is a named pipe (FIFO), not a regular file")


@pytest.mark.parametrize("in_folder", [True, False])
def test_swapped_after_the_check_still_never_blocks(in_folder, tmp_path, monkeypatch):
    """A FIFO put in place between the type check and the open: the open does not block (O_NONBLOCK) and the
    descriptor is refused (fstat). The check is made to see a regular file, as if the swap came right after it."""
    import merge.contract.reading as reading

    fifo = tmp_path / "swapped.json"
    os.mkfifo(fifo)
    regular = os.stat(__file__)
    real_stat = os.stat
    monkeypatch.setattr(reading.os, "stat", lambda path, *a, **k: regular if str(path).endswith("swapped.json")
                        else real_stat(path, *a, **k))
    outcome: list[BaseException | int] = []

    def attempt() -> None:
        try:
            if in_folder:
                dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    outcome.append(reading.open_regular("swapped.json", str(fifo), dir_fd=dir_fd))
                finally:
                    os.close(dir_fd)
            else:
                outcome.append(reading.open_regular(fifo, str(fifo)))
        except BaseException as exc:  # the test reports what came out
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # blocked in open(): a writer releases it, then the test fails
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail("opening a FIFO blocked")
    from merge.errors import MergeError

    assert isinstance(outcome[0], MergeError), outcome
    assert "is a named pipe (FIFO), not a regular file" in str(outcome[0])


# -- JSON within bounds -----------------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(("name", "command"), [
    ("config.json", "inspect"),
    ("merge.json", "run"),
    ("tokenizer_config.json", "run"),
    ("generation_config.json", "run"),
])
def test_deeply_nested_json_is_one_line(name, command, folder, tmp_path, capsys):
    (folder / name).write_text('{"a": ' + DEEP + "}")
    argv = ["run", folder, *PROMPT] if command == "run" else ["inspect", folder]
    _one_line(*_in_process(argv, capsys), f"{folder / name}", "nested more than 64 levels deep")


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("config.json", None, "NaN is not a JSON number"),
    ("generation_config.json", '{"eos_token_id": Infinity}', "Infinity is not a JSON number"),
    ("generation_config.json", '{"eos_token_id": 1e999}', "1e999 is not a finite number"),
    ("generation_config.json", '{"eos_token_id": ' + "9" * 5000 + "}", "a number of 5000 digits"),
])
def test_json_numbers_outside_json_are_one_line(name, text, expected, folder, capsys):
    if text is None:  # NaN where nothing reads it: still not JSON
        text = (folder / name).read_text().replace('"initializer_range": 0.02', '"initializer_range": NaN', 1)
        assert "NaN" in text
    (folder / name).write_text(text)
    _one_line(*_in_process(["run", folder, *PROMPT], capsys), f"{folder / name}", expected)


@pytest.mark.parametrize(("change", "expected"), [
    (lambda t: t.update(rope_parameters="default"), "rope_parameters is str, not an object"),
    (lambda t: t.update(rope_parameters=[1, 2]), "rope_parameters is list, not an object"),
    (lambda t: t["rope_parameters"].update(mrope_section=24), "mrope_section 24 is not a list"),
    (lambda t: t["rope_parameters"].update(mrope_section={"t": 8}), "is not a list of non-negative integers"),
    (lambda t: t["rope_parameters"].update(mrope_section=["2", "3", "3"]), "is not a list of non-negative integers"),
])
def test_rope_parameters_of_the_wrong_type_are_one_line(change, expected, folder, capsys):
    _config(folder, lambda c: change(c["text_config"]))
    _one_line(*_in_process(["run", folder, *PROMPT], capsys), expected)


# -- the chat template ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ('{"eos_token": 5}', "eos_token = 5 is not a string"),
    ('{"additional_special_tokens": 7}', "additional_special_tokens = 7 is not a list"),
    ('{"chat_template": 12}', "chat_template = 12 is not a string"),
])
def test_tokenizer_config_of_the_wrong_type_is_one_line(text, expected, folder, capsys):
    (folder / "tokenizer_config.json").write_text(text)
    (folder / "chat_template.jinja").unlink()  # so that tokenizer_config.json's chat_template is the one read
    _write_manifest_without(folder, "chat_template.jinja")
    _one_line(*_in_process(["run", folder, *PROMPT], capsys), str(folder / "tokenizer_config.json"), expected)


def _write_manifest_without(folder: Path, name: str) -> None:
    manifest = json.loads((folder / "merge.json").read_text())
    manifest["preprocessing_files"] = [n for n in manifest["preprocessing_files"] if n != name]
    manifest["checksums"].pop(name, None)  # the build records every file it copies
    (folder / "merge.json").write_text(json.dumps(manifest))


TEMPLATE_SECONDS = 15  # the bound is 2 s of rendering; this leaves room for the child's start on a loaded machine

TEMPLATE_CASES = {
    "raise_exception": ("{{ raise_exception('only user and assistant roles') }}",
                        "the chat template refused the conversation: only user and assistant roles"),
    "include": ("{% include 'other.jinja' %}", "includes 'other.jinja'; a chat template is one file"),
    "import": ("{% from 'macros.jinja' import m %}{{ m() }}", "includes 'macros.jinja'"),
    "sandbox": ("{{ messages.__class__.__mro__ }}", "the sandbox refuses"),
    "undefined": ("{{ tools_in_use.names }}", "'tools_in_use' is undefined"),
    "syntax": ("{% for %}", "does not compile"),
    "string_1e11": ("{{ 'a' * 100000000000 }}", "100,000,000,000 characters"),
    "list_1e11": ("{{ ([1] * 100000000000) | length }}", "100,000,000,000 items"),
    "center_1e11": ("{{ 'a' | center(100000000000) }}", "100,000,000,000 characters"),
    "method_1e11": ("{{ 'a'.ljust(100000000000) }}", "100,000,000,000 characters"),
    "format_1e11": ("{{ '%100000000000d' | format(1) }}", "a width or precision of 100,000,000,000"),
    "power": ("{{ 2 ** 10000000000 }}", "a number of 10,000,000,000 bits"),
    "nested_ranges": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                      "took more than 2 s"),
    "nested_lists": ("{% set r = range(100000) | list %}{% for i in r %}{% for j in r %}{% for k in r %}"
                     "{% endfor %}{% endfor %}{% endfor %}", "took more than 2 s"),
    "endless_output": ("{% for i in range(100000) %}{% for j in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"
                       "{% endfor %}", "output passes 16,777,216 characters"),
    "doubling": ("{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                 "{{ ns.s | length }}", "characters"),
    "printed_list": ("{% set s = 'x' * 10000000 %}{{ [s, s, s, s] }}", "builds text of 40,000,0"),
    "tojson_indent": ("{{ messages | tojson(indent=100000000000) }}", "an indent of 100,000,000,000"),
    "huge_source": ("{# a comment #}" + "x" * (1 << 18), "a chat template of 262,159 characters"),
    "recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recurses too deeply"),
}


@pytest.mark.parametrize("case", list(TEMPLATE_CASES))
def test_hostile_chat_template_is_one_line(case, folder):
    source, expected = TEMPLATE_CASES[case]
    (folder / "chat_template.jinja").write_text(source)
    rc, err, seconds = _child(["run", folder, *PROMPT])
    _one_line(rc, err, f"{folder / 'chat_template.jinja'}", expected)
    assert seconds < TEMPLATE_SECONDS, f"{seconds:.1f} s"


def test_template_from_tokenizer_config_is_named(folder, capsys):
    (folder / "chat_template.jinja").unlink()
    _write_manifest_without(folder, "chat_template.jinja")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('no') }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    _one_line(*_in_process(["run", folder, *PROMPT], capsys), f"{folder / 'tokenizer_config.json'}",
              "refused the conversation: no")


def test_the_folders_own_template_renders_as_before(combined):
    """The bounds cost the real template nothing it does: same text, and far below the time bound."""
    from merge.runtime.files import Files
    from merge.runtime.text import TextTokenizer

    tokenizer = TextTokenizer(Files(combined("tiny")))
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it? " * 2000}]},
                {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "And now?"}]
    start = time.perf_counter()
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert time.perf_counter() - start < 0.5
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert text.endswith("<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n")


# -- the folder's files agree with its model --------------------------------------------------------------------

@pytest.mark.parametrize(("change", "expected"), [
    (lambda c: c["text_config"].update(num_key_value_heads=1),
     "num_key_value_heads 1, but the model's past_key_values.0.key has 2 heads"),
    (lambda c: c["text_config"].update(num_key_value_heads=4),
     "num_key_value_heads 4, but the model's past_key_values.0.key has 2 heads"),
    (lambda c: c["text_config"].update(num_hidden_layers=3), "num_hidden_layers 3, but the model has 4 layers"),
    (lambda c: c["text_config"].update(head_dim=18, rope_parameters={**c["text_config"]["rope_parameters"],
                                                                      "mrope_section": [3, 3, 3]}),
     "head_dim 18, but the model's past_key_values.0.key has heads of 16"),
    (lambda c: c["text_config"].update(vocab_size=2048), "vocab_size 2048, but the model's logits have 1024"),
    (lambda c: c["vision_config"].update(patch_size=14),
     "patches of 1176 values, but the model's pixel_values takes 1536"),
    (lambda c: c.update(image_token_id=1003), "image_token_id 1003, but the model was built with 1004"),
    (lambda c: c.update(video_token_id=1003), "video_token_id 1003, but the model was built with 1005"),
])
@pytest.mark.parametrize("command", ["run", "inspect", "verify"])
def test_config_that_disagrees_with_the_model_is_one_line(command, change, expected, folder, tmp_path, capsys):
    """Refused when the folder is opened: before PyTorch (verify), before a session (run), and in inspect's report."""
    _config(folder, change)
    argv = {"run": ["run", folder, *PROMPT], "inspect": ["inspect", folder],
            "verify": ["verify", folder, "--reference", tmp_path / "none.npz"]}[command]
    _one_line(*_in_process(argv, capsys), f"{folder / 'config.json'}", expected)


def test_combined_model_refuses_a_config_that_disagrees(folder):
    from merge.errors import MergeError
    from merge.runtime import CombinedModel

    _config(folder, lambda c: c["text_config"].update(num_key_value_heads=1))
    with pytest.raises(MergeError, match="num_key_value_heads 1, but the model's"):
        CombinedModel(folder)
