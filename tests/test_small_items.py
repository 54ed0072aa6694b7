"""Smaller hostile and careless inputs (issue 18, item 9), each with its twin, the valid case, passing.

In the catalogue's style (tests/test_hostile.py): a refusal is exit 2 and one line on stderr. The tiny folder is
built once (the ``combined`` fixture) and copied per case that changes it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from merge.cli import main as cli_main
from merge.errors import MergeError

pytestmark = pytest.mark.slow  # builds the tiny folder and runs PyTorch once for a reference


def _one_line(rc: int, err: str, expected: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture()
def folder(combined, tmp_path) -> Path:
    """A copy of the tiny folder, to change."""
    out = tmp_path / "combined"
    shutil.copytree(combined("tiny"), out)
    return out


@pytest.fixture(scope="module")
def reference(combined, tmp_path_factory) -> Path:
    """A saved reference of the tiny folder: one verify against PyTorch with the right --model (the twin of the
    wrong-model and --max-new-tokens refusals)."""
    path = tmp_path_factory.mktemp("reference") / "ref.npz"
    rc = cli_main(["verify", str(combined("tiny")), "--model", "tiny", "--max-new-tokens", "1", "--prompt", "Hi.",
                   "--save-reference", str(path)])
    assert rc == 0 and path.is_file()
    return path


# -- verify: the wrong --model, --max-new-tokens 0 ----------------------------------------------------------------

def test_verify_right_model_and_one_token_pass(reference):
    assert reference.stat().st_size > 0  # the fixture ran verify --model tiny --max-new-tokens 1: exit 0


def test_verify_wrong_preset_is_refused_before_it_is_built(combined, preset_cache, capsys, monkeypatch):
    import merge.presets.cache

    def never(*args, **kwargs):
        raise AssertionError("the preset was built before its shape was compared")

    monkeypatch.setattr(merge.presets.cache, "ensure_preset", never)
    rc = cli_main(["verify", str(combined("tiny")), "--model", "tiny-merge1", "--max-new-tokens", "1"])
    line = _one_line(rc, capsys.readouterr().err, "--model tiny-merge1 is not the model")
    assert "vs" in line and "config.json" in line


def test_verify_wrong_model_folder_is_refused(combined, sources, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(sources("tiny").folder, model)
    config = json.loads((model / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] += 1
    (model / "config.json").write_text(json.dumps(config))
    rc = cli_main(["verify", str(combined("tiny")), "--model", str(model), "--max-new-tokens", "1"])
    _one_line(rc, capsys.readouterr().err, "text num_layers")


def test_verify_same_model_folder_passes_the_check(combined, sources):
    from merge.contract.folder import CombinedFolder
    from merge.tools.verify import check_same_model, known_config

    folder = CombinedFolder.open(combined("tiny"))
    for spec in ("tiny", str(sources("tiny").folder)):
        check_same_model(folder, known_config(spec), spec)  # no error


@pytest.mark.parametrize("tokens", ["0", "-3"])
def test_verify_max_new_tokens_below_one(tokens, combined, capsys):
    rc = cli_main(["verify", str(combined("tiny")), "--model", "tiny", "--max-new-tokens", tokens])
    _one_line(rc, capsys.readouterr().err, f"--max-new-tokens must be at least 1, got {tokens}")


# -- a lone surrogate in a prompt ---------------------------------------------------------------------------------

def test_lone_surrogate_from_python(combined):
    from merge.runtime import CombinedModel

    model = CombinedModel(combined("tiny"))
    for prompt in ("\ud800", ["fine", "caf\udce9"]):
        with pytest.raises(MergeError, match="lone surrogate"):
            model.chat(prompt, max_new_tokens=1)
    texts = model.chat("café ☕ 𝄞", max_new_tokens=1)  # the twin: any valid Unicode
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_surrogateescape_argument_to_verify(combined, capsys):
    """What Python makes of the bytes ``caf\\xe9`` on a UTF-8 command line."""
    rc = cli_main(["verify", str(combined("tiny")), "--model", "tiny", "--prompt", os.fsdecode(b"caf\xe9"),
                   "--max-new-tokens", "1"])
    _one_line(rc, capsys.readouterr().err, "lone surrogate")


# -- a tokenizer without a pad token ------------------------------------------------------------------------------

def _drop_pad_token(folder: Path) -> None:
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    assert config.pop("pad_token", None) is not None
    path.write_text(json.dumps(config))


def test_no_pad_token_one_prompt_runs(folder, capsys):
    _drop_pad_token(folder)
    assert cli_main(["run", str(folder), "--prompt", "Hi.", "--max-new-tokens", "2"]) == 0, capsys.readouterr().err


def test_no_pad_token_batch_is_one_line(folder, capsys):
    _drop_pad_token(folder)
    rc = cli_main(["run", str(folder), "--prompt", "Hi.", "--prompt", "Hello there.", "--max-new-tokens", "2"])
    _one_line(rc, capsys.readouterr().err, "the tokenizer has no pad token (set pad_token in tokenizer_config.json")


def test_pad_token_batch_runs(combined, capsys):
    argv = ["run", str(combined("tiny")), "--prompt", "Hi.", "--prompt", "Hello there.", "--max-new-tokens", "2"]
    assert cli_main(argv) == 0, capsys.readouterr().err


# -- hub snapshots and hard links ---------------------------------------------------------------------------------

def _snapshot(combined_folder: Path, root: Path) -> Path:
    """``combined_folder`` laid out as huggingface_hub lays out its cache: every file a link to ../../blobs/."""
    from merge.contract.folder import file_sha256

    repo = root / "hub" / "models--someone--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for path in sorted(combined_folder.iterdir()):
        blob = file_sha256(path)
        shutil.copyfile(path, repo / "blobs" / blob)
        (snapshot / path.name).symlink_to(f"../../blobs/{blob}")
    return snapshot


@pytest.mark.parametrize("command", ["run", "inspect"])
def test_hub_snapshot_is_accepted(command, combined, tmp_path, capsys):
    snapshot = _snapshot(combined("tiny"), tmp_path)
    argv = ["run", str(snapshot), "--prompt", "Hi.", "--max-new-tokens", "2"] if command == "run" else [
        "inspect", str(snapshot), "--check-checksums"]
    assert cli_main(argv) == 0, capsys.readouterr().err


def _link(snapshot: Path, name: str, target: str) -> None:
    (snapshot / name).unlink()
    (snapshot / name).symlink_to(target)


def _blob_of(snapshot: Path, name: str) -> Path:
    return snapshot.parent.parent / "blobs" / os.readlink(snapshot / name).rsplit("/", 1)[1]


ESCAPES = {
    # a link out of the repository, to a file that would load
    "out_of_the_cache": lambda s, r: _link(s, "model.onnx.data", "../../../../decoy.data"),
    "absolute": lambda s, r: _link(s, "model.onnx.data", str(r / "decoy.data")),
    # another repository's blobs
    "other_repo": lambda s, r: _link(s, "model.onnx.data", "../../../models--other--x/blobs/decoy"),
    "through_a_subfolder": lambda s, r: ((s / "sub").mkdir(), _link(s, "model.onnx.data", "sub/../../../blobs/x")),
    # the blob itself a link out, or a pipe
    "blob_is_a_link": lambda s, r: (_blob_of(s, "model.onnx.data").unlink(),
                                    _blob_of(s, "model.onnx.data").symlink_to(r / "decoy.data")),
    "blob_is_a_pipe": lambda s, r: (_blob_of(s, "tokenizer.json").unlink(), os.mkfifo(_blob_of(s, "tokenizer.json"))),
    # the blobs folder a link elsewhere
    "blobs_is_a_link": lambda s, r: (shutil.move(s.parent.parent / "blobs", r / "moved"),
                                     (s.parent.parent / "blobs").symlink_to(r / "moved")),
}


@pytest.mark.parametrize("case", list(ESCAPES))
def test_hub_snapshot_links_that_escape_are_refused(case, combined, tmp_path, capsys):
    snapshot = _snapshot(combined("tiny"), tmp_path)
    (tmp_path / "decoy.data").write_bytes((combined("tiny") / "model.onnx.data").read_bytes())
    (tmp_path / "hub" / "models--other--x" / "blobs").mkdir(parents=True)
    (tmp_path / "hub" / "models--other--x" / "blobs" / "decoy").write_bytes((tmp_path / "decoy.data").read_bytes())
    ESCAPES[case](snapshot, tmp_path)
    rc = cli_main(["inspect", str(snapshot)])
    _one_line(rc, capsys.readouterr().err, "is a symbolic link" if case != "blob_is_a_pipe" else "not a regular file")


def test_blobs_link_outside_a_snapshot_is_refused(combined, tmp_path, capsys):
    """The ../../blobs/ form alone is not enough: the folder must be a snapshot (<repo>/snapshots/<rev>/)."""
    snapshot = _snapshot(combined("tiny"), tmp_path)
    os.rename(snapshot.parent, snapshot.parent.parent / "elsewhere")
    rc = cli_main(["inspect", str(snapshot.parent.parent / "elsewhere" / snapshot.name)])
    _one_line(rc, capsys.readouterr().err, "is a symbolic link")


def test_hard_linked_backup_is_accepted(combined, tmp_path, capsys):
    """``cp -al``: every file of the backup is a second name of the original's."""
    backup = tmp_path / "backup"
    backup.mkdir()
    for path in combined("tiny").iterdir():
        os.link(path, backup / path.name)
    try:
        assert (backup / "model.onnx.data").stat().st_nlink == 2
        assert cli_main(["run", str(backup), "--prompt", "Hi.", "--max-new-tokens", "2"]) == 0, capsys.readouterr().err
    finally:
        shutil.rmtree(backup)  # the built folder's files back to one link


# -- inspect prints no escape sequence from the folder ------------------------------------------------------------

def _set_manifest(folder: Path, **changes) -> None:
    path = folder / "merge.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_inspect_escapes_control_characters(folder, capsys):
    _set_manifest(folder, source_model="evil\x1b]0;owned\x07\x1b[2J", tool_version="1\x9b31m\u202e")
    assert cli_main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\x9b\u202e"), out
    assert "evil\\x1b]0;owned\\x07\\x1b[2J" in out and "1\\x9b31m\\u202e" in out


def test_inspect_error_line_escapes_control_characters(folder, capsys):
    _set_manifest(folder, preprocessing_files=["\x1b[31mred"])
    line = _one_line(cli_main(["inspect", str(folder)]), capsys.readouterr().err, "which the folder does not hold")
    assert "\x1b" not in line and "\\x1b[31mred" in line


def test_inspect_keeps_printable_text(folder, capsys):
    _set_manifest(folder, source_model="modèle/ünïcode 模型")
    assert cli_main(["inspect", str(folder)]) == 0
    assert "modèle/ünïcode 模型" in capsys.readouterr().out


# -- a reference whose headers lie ---------------------------------------------------------------------------------

def _npy(shape: tuple, dtype: str, payload: bytes) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + payload


def _reference_with(path: Path, reference: Path, name: str, member: bytes) -> None:
    """The valid reference with its member ``name`` replaced by ``member``."""
    with zipfile.ZipFile(reference) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, member if info.filename == name else src.read(info))


@pytest.mark.parametrize(("shape", "dtype", "expected"), [
    ((10**10,), "<i8", "header claims shape (10000000000,)"),
    ((2, 10**9, 10**9), "<f4", "header claims shape"),
    ((1,), "|O", "holds object"),
])
def test_reference_header_claims_more_than_it_holds(shape, dtype, expected, reference, folder, tmp_path, capsys):
    path = tmp_path / "lying.npz"
    _reference_with(path, reference, "input/input_ids.npy", _npy(shape, dtype, b"\0" * 8))
    rc = cli_main(["verify", str(folder), "--reference", str(path)])
    line = _one_line(rc, capsys.readouterr().err, expected)
    assert line.startswith(f"error: --reference {path}: not a verify reference file")


def test_reference_unpacking_past_the_bound(reference, folder, capsys, monkeypatch):
    import merge.tools.verify

    monkeypatch.setattr(merge.tools.verify, "MAX_REFERENCE_ARRAY_BYTES", 1000)
    rc = cli_main(["verify", str(folder), "--reference", str(reference)])
    _one_line(rc, capsys.readouterr().err, "more than the 1000 a reference may hold")


def test_reference_valid_passes(reference, folder, capsys):
    assert cli_main(["verify", str(folder), "--reference", str(reference)]) == 0, capsys.readouterr().err


def test_reference_with_more_tokens_than_decode_steps(reference, folder, tmp_path, capsys):
    """Three tokens but no decode step's logits (saved for one token): refused in one line, not an IndexError
    halfway through the comparison."""
    with np.load(reference) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["ref/tokens"] = np.repeat(arrays["ref/tokens"], 3, axis=1)
    path = tmp_path / "more.npz"
    np.savez(path, **arrays)
    rc = cli_main(["verify", str(folder), "--reference", str(path)])
    _one_line(rc, capsys.readouterr().err, "step_logits has the wrong shape or type")
