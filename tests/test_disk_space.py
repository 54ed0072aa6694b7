"""Where a build cannot write. A disk too small for a build or a preset: one line naming the folder and both sizes,
before minutes of work, and nothing half-written; a disk that fills mid-write is named too, with the file. A file
in the way of ``--out`` or of the preset cache, a read-only disk: one line naming the place, exit 2.

The free space is faked here (the CLI sees a small disk, the build is the real one); where this process may mount
a tmpfs (root on Linux), the same cases also run on a real 10 MiB disk.
"""

from __future__ import annotations

import contextlib
import errno
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

import merge.space
from merge.cli import main as cli_main
from merge.contract.folder import file_sha256
from merge.errors import MergeError
from merge.space import format_bytes, naming_a_full_disk, require_free_space

MiB = 2**20


def _checksums(folder: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir())}


def _fake_free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(merge.space, "free_bytes", lambda folder: free)


def test_build_refused_before_writing_when_the_disk_is_too_small(combined, tmp_path, monkeypatch, capsys):
    """``--force`` over a previous build with 10 MiB free: refused with both sizes; the old folder is untouched."""
    out = tmp_path / "combined"
    shutil.copytree(combined("tiny"), out)
    before = _checksums(out)
    data_bytes = (out / "model.onnx.data").stat().st_size
    _fake_free(monkeypatch, 10 * MiB)
    assert cli_main(["build", "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: writing model.onnx.data of ")
    assert str(out) in err and f"that disk has {format_bytes(10 * MiB)} free" in err
    assert "the existing folder stays until the new one is complete" in err
    needed = float(err.split(" needs ")[1].split(" MiB")[0]) * MiB
    assert data_bytes <= needed <= 1.05 * data_bytes + 2 * MiB  # the estimate is the folder's size, unread
    assert _checksums(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["combined"]  # no staging folder, no lock left


def test_build_goes_ahead_when_the_disk_has_room(tmp_path, monkeypatch, capsys):
    """The twin: the same check with the room the estimate asks for lets the build through."""
    _fake_free(monkeypatch, 200 * MiB)
    assert cli_main(["build", "--out", str(tmp_path / "combined")]) == 0
    assert (tmp_path / "combined" / "merge.json").is_file()


def test_disk_filling_mid_write_is_named(tmp_path, monkeypatch, capsys):
    """A write that comes up short (numpy's errno-less OSError) with the disk nearly full: the file is named."""
    import merge.stitch.pipeline as pipeline

    def short_write(model, path, **kwargs):
        (Path(path).parent / "model.onnx.data").write_bytes(b"\0" * 4096)
        raise OSError("2097152 requested and 0 written")

    monkeypatch.setattr(pipeline.ir, "save", short_write)
    monkeypatch.setattr(pipeline, "require_free_space", lambda *args: None)
    _fake_free(monkeypatch, 1 * MiB)
    out = tmp_path / "combined"
    assert cli_main(["build", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: the disk filled while writing {out / 'model.onnx.data'} (1.00 MiB free there now; the "
                   "write failed with: 2097152 requested and 0 written); free some space there or write somewhere else")
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    """The twin: the same short write with plenty of room left, or a permission error, passes through as it is."""
    _fake_free(monkeypatch, 50 * 2**30)
    with pytest.raises(OSError, match="requested and 0 written"), naming_a_full_disk(tmp_path / "x"):
        raise OSError("2097152 requested and 0 written")
    with pytest.raises(PermissionError), naming_a_full_disk(tmp_path / "x"):
        raise PermissionError(errno.EACCES, "Permission denied")
    _fake_free(monkeypatch, 50 * 2**30)
    with pytest.raises(MergeError, match="the disk filled while writing"), naming_a_full_disk(tmp_path / "x"):
        raise OSError(errno.ENOSPC, "No space left on device")  # errno says so, whatever the free space reads


def test_preset_refused_before_drawing_a_weight(tmp_path, monkeypatch, capsys):
    """The 2B preset (4 GiB of bf16) into a cache on a 10 MiB disk: refused at once, nothing left in the cache."""
    monkeypatch.setenv("QWEN3VL_MERGE_CACHE", str(tmp_path / "cache"))
    _fake_free(monkeypatch, 10 * MiB)
    assert cli_main(["build", "--model", "qwen3-vl-2b", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    presets = tmp_path / "cache" / "presets"
    assert err == (f"error: preset qwen3-vl-2b (625 bfloat16 weights) needs 4.00 GiB in {presets}, and that disk "
                   "has 10.00 MiB free; free some space there or write somewhere else (presets are built in the cache "
                   "folder: QWEN3VL_MERGE_CACHE moves it)")
    assert list(presets.iterdir()) == []
    assert not (tmp_path / "out").exists()


def test_free_space_is_read_from_the_nearest_existing_folder(tmp_path):
    """``--out a/b/c`` that does not exist yet is measured on the disk that will hold it."""
    assert merge.space.free_bytes(tmp_path / "a" / "b" / "c") == shutil.disk_usage(tmp_path).free
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(MergeError, match=r"needs .* and that disk has"):
        require_free_space(tmp_path / "new", free, "this write")  # the slack on top of all that is free
    require_free_space(tmp_path / "new", 0, "nothing")


@contextlib.contextmanager
def _tmpfs(where: Path, size: str, *options: str):
    where.mkdir()
    device = f"qwen3vl-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), device, str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); the faked cases stand")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("below", ["x", "y/x"])  # mkdir's FileExistsError and NotADirectoryError
def test_a_file_in_the_way_of_out(below, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    out = blocker / below
    assert cli_main(["build", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"error: cannot create {out}: {blocker} is a file, not a folder"
    assert blocker.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_file_in_the_way_of_the_preset_cache(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    monkeypatch.setenv("QWEN3VL_MERGE_CACHE", str(blocker))
    assert cli_main(["build", "--model", "tiny", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: cannot create {blocker / 'presets' / 'tiny'}: {blocker} is a file, not a folder (presets are built "
        "in the cache folder: QWEN3VL_MERGE_CACHE moves it)")
    assert blocker.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_read_only_disk(tmp_path, monkeypatch, capsys):
    """A read-only disk for ``--out`` and for the preset cache (a real read-only tmpfs)."""
    shutil.which("mount") or pytest.skip("no mount command")
    with _tmpfs(tmp_path / "ro", "1m", "ro") as disk:
        assert cli_main(["build", "--out", str(disk / "out")]) == 2
        assert capsys.readouterr().err.strip() == (f"error: cannot write {disk / 'out'}: Read-only file system "
                                                   f"({disk / '.out.lock'}); choose a folder you can write")
        monkeypatch.setenv("QWEN3VL_MERGE_CACHE", str(disk / "cache"))
        assert cli_main(["build", "--model", "tiny", "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: cannot write {disk / 'cache' / 'presets' / 'tiny'}: Read-only file system")
        assert err.endswith("QWEN3VL_MERGE_CACHE moves it)") and not (tmp_path / "out").exists()


def test_real_small_disk(tmp_path, monkeypatch, capsys):
    """On a real 10 MiB disk: the check refuses the 19 MiB tiny build; without the check, the write fails and
    the full disk is named; either way the disk is left empty."""
    import merge.stitch.pipeline as pipeline

    shutil.which("mount") or pytest.skip("no mount command")
    with _tmpfs(tmp_path / "small", "10m") as disk:
        assert cli_main(["build", "--out", str(disk / "combined")]) == 2
        # free then: 10 MiB less the build's lock and staging marker (a page each)
        assert re.search(r"and that disk has (10\.00|9\.99) MiB free", capsys.readouterr().err)
        assert list(disk.iterdir()) == []
        monkeypatch.setattr(pipeline, "require_free_space", lambda *args: None)
        assert cli_main(["build", "--out", str(disk / "combined")]) == 2
        err = capsys.readouterr().err
        assert f"the disk filled while writing {disk / 'combined' / 'model.onnx.data'}" in err
        assert list(disk.iterdir()) == []
        assert abs(merge.space.free_bytes(disk) - 10 * MiB) < 64 * 1024  # nothing left behind on it


def test_llama_cpp_conversion_refused_before_converting(sources, tmp_path, monkeypatch):
    """The benchmark's llama.cpp conversion (an f16 file the checkpoint's size, then the 4-bit files) on a disk
    too small for it: refused before the converter runs."""
    from benchmarks import llama_cpp

    ran = []
    monkeypatch.setattr(llama_cpp, "ensure_built", lambda root: tmp_path / "bin")
    monkeypatch.setattr(llama_cpp, "ensure_converter", lambda root: (Path("python"), Path("convert.py")))
    monkeypatch.setattr(llama_cpp, "source_dir", lambda root: tmp_path / "llama.cpp")
    monkeypatch.setattr(llama_cpp, "_run", lambda *args, **kwargs: ran.append(args))
    _fake_free(monkeypatch, 1 * MiB)
    with pytest.raises(MergeError, match=r"llama.cpp's Q4_0/Q4_K_M of tiny needs .* and that disk has 1.00 MiB free"):
        llama_cpp.convert(tmp_path, sources("tiny").folder, "tiny", ("Q4_0", "Q4_K_M"))
    assert ran == []
    _fake_free(monkeypatch, 50 * 2**30)  # the twin: room enough, and the conversion goes on to run its steps
    llama_cpp.convert(tmp_path, sources("tiny").folder, "tiny", ("Q4_0", "Q4_K_M"))
    assert len(ran) == 5  # f16, the two projector files, the two 4-bit files
