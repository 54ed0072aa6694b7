"""A combined folder is untrusted input, and a careless command line is a normal one: the catalogue.

Each hostile or careless input, with the command, the exit status and a fragment of the one line it must print.
Every folder case runs on a copy of a built folder placed next to a decoy: a named pipe, which blocks whoever opens
it (so a test that would read outside the folder hangs and fails on its timeout instead of passing), and a regular
file whose bytes would pass for weights. Afterwards nothing outside the folder has changed or gone.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from merge.cli import main as cli_main
from merge.contract.folder import file_sha256

pytestmark = pytest.mark.slow  # the catalogue: a copy of a built folder per case

ROOT = Path(__file__).resolve().parents[1]
PROMPT = ["--prompt", "Describe.", "--max-new-tokens", "2"]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture()
def sandbox(combined, tmp_path):
    """``(folder, decoys)``: a copy of the tiny folder beside a FIFO and a regular decoy file."""
    folder = tmp_path / "combined"
    shutil.copytree(combined("tiny"), folder)
    os.mkfifo(tmp_path / "decoy.fifo")
    decoy = tmp_path / "decoy.data"
    decoy.write_bytes((folder / "model.onnx.data").read_bytes())  # would load, if anything followed a link to it
    before = _snapshot(tmp_path)
    yield folder, tmp_path
    after = _snapshot(tmp_path)
    outside = {k: v for k, v in before.items() if not k.startswith("combined")}
    assert {k: after.get(k) for k in outside} == outside, "something outside the folder changed or went away"


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "merge.json").read_text())


def _write_manifest(folder: Path, data: dict) -> None:
    (folder / "merge.json").write_text(json.dumps(data))


def _rerecord(folder: Path, *names: str) -> None:
    """The manifest's sizes (and checksums) brought in line with files changed on purpose."""
    data = _manifest(folder)
    for name in names:
        data["sizes"][name] = (folder / name).stat().st_size
        data["checksums"][name] = file_sha256(folder / name)
    _write_manifest(folder, data)


def _rewrite_external(folder: Path, change) -> None:
    """model.onnx with ``change(tensor_proto)`` applied to its first external initializer."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    change(tensor)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    _rerecord(folder, "model.onnx")


def _set_entry(tensor, key: str, value: str) -> None:
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            return
    tensor.external_data.add(key=key, value=value)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    out = bytearray()
    for value in (number << 3 | 2, len(payload)):
        while value >= 0x80:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out) + payload


def _append_constant(folder: Path, *tensors: bytes) -> None:
    """model.onnx with one more Constant whose value is ``tensors`` (serialized), one field each, appended: protobuf
    merges what is appended into the model's graph, and the occurrences of the singular value into one tensor."""
    import onnx

    attribute = onnx.AttributeProto(name="value", type=onnx.AttributeProto.TENSOR).SerializeToString()
    attribute += b"".join(_field(5, t) for t in tensors)
    node = onnx.NodeProto(op_type="Constant", output=["appended"]).SerializeToString() + _field(5, attribute)
    with open(folder / "model.onnx", "ab") as f:
        f.write(_field(7, _field(1, node)))
    _rerecord(folder, "model.onnx")


def _external_tensor(location: str | None, **fields):
    """A 4-byte FLOAT tensor whose external data entries name ``location`` (none if None), offset 0, length 4."""
    import onnx

    tensor = onnx.TensorProto(name="appended", data_type=onnx.TensorProto.FLOAT, dims=[1], **fields)
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        if value is not None:
            tensor.external_data.add(key=key, value=value)
    return tensor


def _split_tensor(folder: Path, root: Path) -> None:
    """The value given twice: an external tensor inside the data file, then a location outside. ONNX Runtime sees
    one tensor with the second location (and refuses two locations itself); the checker must see it too."""
    import onnx

    inside = _external_tensor("model.onnx.data", data_location=onnx.TensorProto.EXTERNAL)
    outside = onnx.TensorProto()
    outside.external_data.add(key="location", value="../decoy.data")
    _append_constant(folder, inside.SerializeToString(), outside.SerializeToString())


def _location_past_the_enum(folder: Path, root: Path) -> None:
    """data_location 2**32 + 1: an int32 enum, so EXTERNAL to protobuf; a reader that took the varint as it stands
    saw no external tensor, and never checked its location outside the folder."""
    tensor = _external_tensor("../decoy.data").SerializeToString() + bytes([14 << 3]) + bytes([0x81, 0x80, 0x80,
                                                                                               0x80, 0x10])
    _append_constant(folder, tensor)


FOLDER_CASES = {
    "no_manifest": (lambda f, r: (f / "merge.json").unlink(), "no merge.json"),
    "manifest_not_json": (lambda f, r: (f / "merge.json").write_text("{not json"), "merge.json: not valid JSON"),
    "manifest_wrong_type": (lambda f, r: _write_manifest(f, {**_manifest(f), "precision": 5}),
                            "precision = 5 is not a str"),
    "manifest_unknown_field": (lambda f, r: _write_manifest(f, {**_manifest(f), "evil": 1}),
                               "unknown field(s) ['evil']"),
    "manifest_newer_format": (lambda f, r: _write_manifest(f, {**_manifest(f), "format_version": 10**6}),
                              "format_version 1000000 is newer than the format"),
    "manifest_format_not_a_count": (lambda f, r: _write_manifest(f, {**_manifest(f), "format_version": "1"}),
                                    "format_version = '1' is not a non-negative integer"),
    "manifest_path_traversal": (lambda f, r: _write_manifest(f, {**_manifest(f), "preprocessing_files": [
        "../../../etc/passwd"]}), "'../../../etc/passwd', which is not a plain file name"),
    "data_symlink_out": (lambda f, r: ((f / "model.onnx.data").unlink(),
                                       (f / "model.onnx.data").symlink_to(r / "decoy.data")), "is a symbolic link"),
    "data_symlink_fifo": (lambda f, r: ((f / "model.onnx.data").unlink(),
                                        (f / "model.onnx.data").symlink_to(r / "decoy.fifo")), "is a symbolic link"),
    "tokenizer_symlink": (lambda f, r: ((f / "tokenizer.json").unlink(),
                                        (f / "tokenizer.json").symlink_to(r / "decoy.fifo")), "is a symbolic link"),
    "external_outside": (lambda f, r: _rewrite_external(f, lambda t: _set_entry(t, "location", "../decoy.data")),
                         "has its data in '../decoy.data'; only model.onnx.data"),
    "external_absolute": (lambda f, r: _rewrite_external(f, lambda t: _set_entry(t, "location",
                                                                                 str(r / "decoy.fifo"))),
                          "only model.onnx.data, inside the folder, is allowed"),
    "external_offset_past_end": (lambda f, r: _rewrite_external(f, lambda t: _set_entry(t, "offset", "99999999999")),
                                 "of model.onnx.data, which has"),
    "external_length_wrong": (lambda f, r: _rewrite_external(f, lambda t: _set_entry(t, "length", "4")),
                              "need"),
    "external_split_in_two": (_split_tensor, "has its data in '../decoy.data'; only model.onnx.data"),
    "external_location_past_the_enum": (_location_past_the_enum, "has its data in '../decoy.data'"),
    "data_truncated": (lambda f, r: os.truncate(f / "model.onnx.data", 1000), "bytes but merge.json says"),
    "model_garbage": (lambda f, r: ((f / "model.onnx").write_bytes(np.random.default_rng(0).bytes(5000)),
                                    _rerecord(f, "model.onnx")), "is not a readable ONNX model"),
    "model_empty": (lambda f, r: ((f / "model.onnx").write_bytes(b""), _rerecord(f, "model.onnx")),
                    "is not a readable ONNX model"),
    "config_absurd_patch": (lambda f, r: (f / "config.json").write_text(json.dumps({
        **json.loads((f / "config.json").read_text()),
        "vision_config": {**json.loads((f / "config.json").read_text())["vision_config"], "patch_size": 10**9}})),
        "patch_size = 1000000000 must be between 1 and 256"),
    "config_token_outside_vocab": (lambda f, r: (f / "config.json").write_text(json.dumps({
        **json.loads((f / "config.json").read_text()), "image_token_id": 10**6})),
        "image_token_id = 1000000 must be between 0 and 1023"),
    "generation_absurd_eos": (lambda f, r: (f / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [10**9]})), "eos_token_id 1000000000 is not a token id of this model"),
    "extra_file_unlisted": (lambda f, r: (f / "notes.onnx").write_bytes(b"x"), None),
}


@pytest.mark.parametrize("command", ["run", "inspect", "verify"])
@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_hostile_folder_is_one_line(case, command, sandbox, capsys):
    folder, root = sandbox
    change, expected = FOLDER_CASES[case]
    change(folder, root)
    argv = {"run": ["run", str(folder), *PROMPT], "inspect": ["inspect", str(folder)],
            "verify": ["verify", str(folder), "--reference", str(root / "none.npz")]}[command]
    rc = cli_main(argv)
    captured = capsys.readouterr()
    if case == "generation_absurd_eos" and command != "run":
        return  # only generating reads the stop tokens
    if expected is None:  # harmless without --check-checksums: the loader checks nothing it did not list
        assert rc in (0, 2), captured.err
        return
    lines = captured.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("command", ["run", "inspect"])
@pytest.mark.parametrize(("case", "expected", "rc"), [
    ("flipped_byte", "does not match merge.json", {"run": 2, "inspect": 1}),
    ("unlisted_file", "not listed in merge.json", {"run": 2, "inspect": 1}),
    ("intact", None, {"run": 0, "inspect": 0}),  # the twin: an untouched folder passes
])
def test_check_checksums(case, expected, rc, command, sandbox, capsys):
    folder, _ = sandbox
    if case == "flipped_byte":
        with open(folder / "model.onnx.data", "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0xFF]))
    elif case == "unlisted_file":
        (folder / "extra.onnx").write_bytes(b"x")
    argv = ["run", str(folder), *PROMPT] if command == "run" else ["inspect", str(folder)]
    assert cli_main([*argv, "--check-checksums"]) == rc[command]
    captured = capsys.readouterr()
    text = captured.err + captured.out
    if expected:
        assert expected in text or (command == "inspect" and ("MISMATCH" in text or "not in the manifest" in text))
    assert "Traceback" not in text


# -- outputs never replace what they should not ----------------------------------------------------------------

def test_stitch_view_never_written_into_the_folder(sandbox, capsys):
    folder, _ = sandbox
    before = _snapshot(folder)
    for target in (folder / "model.onnx", folder / "view.onnx"):
        assert cli_main(["inspect", str(folder), "--stitch", str(target)]) == 2
        assert "will not write into the combined folder" in capsys.readouterr().err
    assert _snapshot(folder) == before


@pytest.mark.parametrize("option", ["--json", "--save-reference"])
def test_verify_outputs_checked_before_the_long_work(option, sandbox, capsys):
    folder, root = sandbox
    for target, message in ((folder / "x.json", "will not write into the combined folder"),
                            (root / "sub" / "x", None), (root, "is a folder")):
        if message is None:  # a path whose folder is a file cannot be written
            (root / "sub").write_text("a file, not a folder")
            message = "cannot be written"
        start = time.perf_counter()
        assert cli_main(["verify", str(folder), option, str(target), "--model", "tiny"]) == 2
        assert message in capsys.readouterr().err
        assert time.perf_counter() - start < 30  # refused before PyTorch ran (a bound on nothing but the order)
        (root / "sub").unlink(missing_ok=True)


@pytest.mark.parametrize("kind", ["not_zip", "pickled", "wrong_keys"])
def test_bad_reference_is_one_line(kind, sandbox, capsys):
    folder, root = sandbox
    path = root / "ref.npz"
    if kind == "not_zip":
        path.write_bytes(b"garbage")
    elif kind == "pickled":
        np.save(path.with_suffix(".npy"), np.array([{"a": 1}], dtype=object), allow_pickle=True)
        os.replace(path.with_suffix(".npy"), path)
    else:
        np.savez(path, something=np.zeros(3))
    assert cli_main(["verify", str(folder), "--reference", str(path)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: --reference") and "not a verify reference file" in line


# -- build: never destroy, one build at a time, no leftovers ---------------------------------------------------

@pytest.mark.parametrize("where", ["root", "home", "cwd", "cwd_parent"])
def test_build_never_replaces_protected_folders(where, tmp_path, monkeypatch, capsys):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    target = {"root": Path("/"), "home": Path.home(), "cwd": Path("."), "cwd_parent": Path("..")}[where]
    assert cli_main(["build", "--out", str(target), "--force"]) == 2
    assert "a build never replaces it" in capsys.readouterr().err


def test_build_waits_for_nobody_and_cleans_leftovers(tmp_path, capsys):
    from merge.atomic import make_staging
    from merge.stitch.outdir import LOCK_TEXT

    out = tmp_path / "out"
    leftover = make_staging(out, "partial")  # what a killed build leaves: its staging folder, marked
    (leftover / ".work").mkdir()
    with open(tmp_path / ".out.lock", "w") as lock:  # another build holds the folder
        lock.write(LOCK_TEXT)
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert cli_main(["build", "--out", str(out)]) == 2
        assert "another build is writing" in capsys.readouterr().err
        assert leftover.is_dir()  # not ours to clean while the other build runs
    assert cli_main(["build", "--out", str(out)]) == 0
    assert not leftover.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _running(pid: int) -> bool:
    """Still a process, and not a zombie: an orphan that died waits in /proc until PID 1 reaps it, which a
    container's PID 1 may do late or never."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_terminated_build_leaves_nothing(tmp_path):
    """SIGTERM while the build's child (the session check) runs: the staging folder goes and the child dies with
    the build."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "merge", "build", "--out", str(out)], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    children: list[int] = []
    while time.monotonic() < deadline and not children:
        time.sleep(0.05)
        if list(tmp_path.glob(".out.partial-*")):  # the session check's child (not a short-lived helper's)
            children = [c for c in _children_of(proc.pid) if b"merge.stitch.check" in _cmdline(c)]
    assert children, "the build never started its child"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "terminated", err
    time.sleep(0.5)
    assert not [c for c in children if _running(c)], "the build's child outlived the build"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- the command line's own inputs -------------------------------------------------------------------------------

def _run(args: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "merge", *args], capture_output=True, env={
        **os.environ, "PYTHONPATH": str(ROOT)}, timeout=300, **kw)


def test_non_utf8_prompt_is_one_line(combined):
    proc = _run(["run", str(combined("tiny")), "--prompt", b"caf\xe9 au lait", "--max-new-tokens", "2"])
    err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "is not valid UTF-8 text" in err[0], proc.stderr


def test_broken_pipe_is_silent():
    proc = subprocess.run(f"{sys.executable} -m merge presets | head -c 10 > /dev/null", shell=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert b"Traceback" not in proc.stderr and b"BrokenPipe" not in proc.stderr, proc.stderr


def test_netron_port_in_use_is_one_line(combined, monkeypatch, capsys):
    import types

    fake = types.ModuleType("netron")
    fake.start = lambda *a, **k: (_ for _ in ()).throw(OSError(98, "Address already in use"))
    fake.wait = lambda: None
    monkeypatch.setitem(sys.modules, "netron", fake)
    assert cli_main(["inspect", str(combined("tiny")), "--netron", "--port", "8123"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: --port 8123") and "Address already in use" in line


@pytest.mark.parametrize(("command", "prompt", "expected"), [
    ("run", "look: <|image_pad|>", "contains <|image_pad|>"),
    ("verify", "and a video <|video_pad|>", "contains <|video_pad|>"),
])
def test_vision_tokens_typed_into_a_prompt(command, prompt, expected, combined, capsys):
    argv = [command, str(combined("tiny")), "--prompt", prompt, "--max-new-tokens", "2"]
    if command == "verify":
        argv += ["--model", "tiny"]
    assert cli_main(argv) == 2
    assert expected in capsys.readouterr().err


def test_position_beyond_the_model_is_one_line(sandbox, capsys):
    folder, _ = sandbox
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 40
    (folder / "config.json").write_text(json.dumps(config))
    assert cli_main(["run", str(folder), "--prompt", "Describe.", "--max-new-tokens", "50"]) == 2
    assert "go past the model's max_position_embeddings 40" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["truncated_shard", "missing_shard", "bad_header"])
def test_broken_checkpoint_is_one_line(case, sources, tmp_path, capsys):
    folder = tmp_path / "hf"
    shutil.copytree(sources("tiny").folder, folder)
    weights = folder / "model.safetensors"
    if case == "truncated_shard":
        os.truncate(weights, weights.stat().st_size // 2)
        expected = "past the end of the file"
    elif case == "missing_shard":
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "other.safetensors"}}))
        expected = "names the shard 'other.safetensors', which is not a file"
    else:
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
        expected = "header is not valid JSON"
    assert cli_main(["build", "--model", str(folder), "--out", str(tmp_path / "out")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert expected in line and not (tmp_path / "out").exists()


def test_verify_defaults_to_the_folders_own_model(combined, capsys):
    """No --model: the reference is the model the folder was built from (tiny-merge1 here, not the tiny default)."""
    assert cli_main(["verify", str(combined("tiny-merge1")), "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("PASSED")


def test_tensors_too_large_for_memory_loading_are_read_from_the_folder(combined, tmp_path, monkeypatch):
    """ONNX Runtime refuses in-memory external data for a tensor over 2 GiB (an 8B model's fp32 token table): such a
    folder's data is read from the folder instead, with the same outputs, whatever the current directory. Here
    the limit is lowered so that the tiny folder takes that route."""
    import merge.contract.folder as folder_module
    from merge.contract.folder import CombinedFolder
    from merge.runtime import CombinedModel

    ids = np.array([[5, 6, 7, 8]], np.int64)
    expected = CombinedModel(combined("tiny")).generate(ids, max_new_tokens=3)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(folder_module, "MAX_IN_MEMORY_TENSOR", 1024)
    assert CombinedFolder.open(combined("tiny")).largest_external > 1024
    got = CombinedModel(combined("tiny")).generate(ids, max_new_tokens=3)
    assert np.array_equal(got.tokens, expected.tokens)
    assert np.array_equal(got.prefill_logits, expected.prefill_logits)
