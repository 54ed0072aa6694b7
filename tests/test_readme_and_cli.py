"""The README's commands and docs/cli.md's real outputs are tests; the CLI refuses bad input with one clear line
and a non-zero exit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CLI_DOC = DOCS / "cli.md"


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)


def _quick_start() -> tuple[str, str]:
    build_cmd, test_cmd = (block.strip() for block in _bash_blocks()[:2])
    return build_cmd, test_cmd


def _run(cmd: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, f"{cmd!r} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_ci_runs_exactly_the_readme_test_command():
    _, test_cmd = _quick_start()
    assert test_cmd.startswith("pip install") and "pytest" in test_cmd
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines


README_MAX_BYTES = 10 * 1024


def test_readme_is_short_and_keeps_the_quick_start():
    """The README reads at a glance (under 10 KiB; the rest lives in docs/), starts with the build, and holds the
    test command exactly as CI runs it."""
    size = README.stat().st_size
    assert size < README_MAX_BYTES, f"README.md is {size:,} bytes; move detail to docs/ (limit {README_MAX_BYTES:,})"
    build_cmd, test_cmd = _quick_start()
    assert "python -m merge build" in build_cmd
    assert "pip install -e '.[test]' && python -m pytest -q" in README.read_text().splitlines()
    assert test_cmd == "pip install -e '.[test]' && python -m pytest -q"


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), flags=re.M):
        slug = _slug(heading)
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _broken_links(page: Path, root: Path = ROOT) -> tuple[int, list[str]]:
    """(local links, those that do not resolve) of a Markdown page: a file or folder that exists, and for a link into
    a Markdown page with ``#anchor``, a heading of that page. Links inside code blocks are not links."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]
    broken = []
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists() or root not in (target, *target.parents):
            broken.append(f"{page.relative_to(root)}: {link} (no such file in the project)")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{page.relative_to(root)}: {link} (no such heading)")
    return len(links), broken


def test_every_local_link_in_the_readme_and_docs_resolves(tmp_path):
    pages = [README, *sorted(DOCS.glob("*.md"))]
    assert len(pages) >= 7  # the README and the docs/ pages it links to
    results = [_broken_links(page) for page in pages]
    broken = [b for _, found in results for b in found]
    assert not broken, "\n".join(broken)
    readme_links = set(re.findall(r"\]\((docs/[\w.]+\.md)\)", README.read_text()))
    assert {f"docs/{p.name}" for p in DOCS.glob("*.md") if p.name != "README.md"} <= readme_links, \
        "the README links every docs/ page"
    assert results[0][0] >= 10
    # the checker finds what it is for: a missing file, a missing heading, a file outside the project
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# x\n")
    (tmp_path / "docs" / "cli.md").write_text("## `build`\n\n```\n## not-a-heading\n```\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text("[a](cli.md#build) [b](nothing.md) [c](cli.md#not-a-heading) [d](../README.md#x) [e](../../)\n"
                    "```\n[f](in-a-code-block.md)\n```\n")
    assert _broken_links(page, tmp_path) == (5, ["docs/page.md: nothing.md (no such file in the project)",
                                                 "docs/page.md: cli.md#not-a-heading (no such heading)",
                                                 "docs/page.md: ../../ (no such file in the project)"])


def test_readme_build_command(tmp_path):
    build_cmd, _ = _quick_start()
    assert build_cmd.startswith("pip install") and "python -m merge build --out combined/" in build_cmd
    command = build_cmd.split("&&", 1)[1].strip()  # the install already happened for this test run
    proc = _run(command.replace("python ", f"{sys.executable} ", 1), tmp_path)
    out = tmp_path / "combined"
    assert (out / "model.onnx").is_file() and (out / "model.onnx.data").is_file()
    pasted = re.search(r"Real output \(stdout; progress and log lines go to stderr\):\n\n```\n(.*?)```",
                       CLI_DOC.read_text(), flags=re.S).group(1)

    def shape_of(text: str) -> list[str]:  # paths and figures differ from machine to machine
        return [re.sub(r"\(.*?\)|[\d.]+ (s|GiB)", "#", line) for line in text.strip().splitlines()]

    assert shape_of(proc.stdout) == shape_of(pasted)
    manifest = json.loads((out / "merge.json").read_text())
    assert manifest["parts"] == {"model": "model.onnx", "data": "model.onnx.data"}
    # every file the build wrote but merge.json itself: the model files and the preprocessing files it copied
    assert set(manifest["checksums"]) == {"model.onnx", "model.onnx.data", *manifest["preprocessing_files"]}
    assert {"tokenizer.json", "chat_template.jinja", "config.json"} <= set(manifest["checksums"])
    assert manifest["inputs"][0]["name"] == "input_ids" and manifest["outputs"][-1]["name"] == "rope_deltas_out"
    for name in ("tokenizer.json", "preprocessor_config.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    # No staging folders are left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["combined"]

    # The README's Python example runs against the folder just built.
    (python_block,) = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    script = tmp_path / "example.py"
    script.write_text(python_block)
    proc = _run(f"{sys.executable} {script}", tmp_path)
    assert proc.stdout.strip().startswith("[[")


def test_build_refuses_existing_folder_and_force_replaces_only_a_build(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = _run(f"{sys.executable} -m merge build --out {out}", tmp_path, check=False)
    assert proc.returncode != 0
    assert "already exists" in proc.stderr and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr
    # --force does not replace a folder merge build did not write: nothing is lost
    proc = _run(f"{sys.executable} -m merge build --out {out} --force", tmp_path, check=False)
    assert proc.returncode == 2 and "replaces only an empty folder or one merge build wrote" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty folder, then a previous build, are replaced
    _run(f"{sys.executable} -m merge build --out {out} --force", tmp_path)
    _run(f"{sys.executable} -m merge build --out {out} --force", tmp_path)
    assert (out / "model.onnx").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_build_leaves_existing_folder_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # a previous build's folder (keep.txt one of its files)
    (out / "merge.json").write_text(json.dumps({"tool": "qwen3vl-merge", "preprocessing_files": ["keep.txt"]}))
    bad = tmp_path / "bad_model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", "vision_config": {}, "text_config": {}}))
    proc = _run(f"{sys.executable} -m merge build --model {bad} --out {out} --force", tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_model", "out"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}, "model_type is 'llava'"),
        ({"model_type": "qwen2_5_vl"}, "model_type is 'qwen2_5_vl'"),
        ({"model_type": "qwen3_vl", "text_config": {}}, "vision_config is missing"),
    ],
)
def test_non_qwen3vl_config_is_named(tmp_path, config, message):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    proc = _run(f"{sys.executable} -m merge build --model {folder} --out {tmp_path / 'o'}", tmp_path, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "config.json" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_model_spec(tmp_path):
    proc = _run(f"{sys.executable} -m merge build --model nosuchthing --out o", tmp_path, check=False)
    assert proc.returncode == 2 and "neither a preset" in proc.stderr


def _doc_command(text: str, pattern: str, folder: Path) -> str:
    """A command pasted in docs/cli.md, to run here: this Python, the folder the test built."""
    command = re.search(r"```\n(" + pattern + r".*?)\n```", text).group(1)
    return command.replace("python ", f"{sys.executable} ", 1).replace("combined/", str(folder))


def test_cli_doc_inspect_and_run_output_match(tmp_path, combined):
    """docs/cli.md's inspect and run commands print its pasted inspect table and run answer and timing line now."""
    out = combined("tiny")
    doc = CLI_DOC.read_text()
    command = re.search(r"Part of its real output \(`(python -m merge inspect combined/)`\):", doc).group(1)
    pasted = re.search(r"Part of its real output.*?:\n\n```\n(.*?)```", doc, flags=re.S).group(1).strip()
    proc = _run(command.replace("python ", f"{sys.executable} ", 1).replace("combined/", str(out)), tmp_path)
    assert pasted in proc.stdout

    from merge.tools.verify import default_images

    default_images(1)[0].save(tmp_path / "picture.png")
    proc = _run(_doc_command(doc, r"python -m merge run combined/ --image picture\.png ", out), tmp_path)
    timing = proc.stdout.strip().splitlines()[-1]
    pasted_run = re.search(r"Real output on the tiny preset.*?```\n(.*?)```", doc, flags=re.S).group(1)
    pasted_lines = pasted_run.strip().splitlines()
    assert proc.stdout.strip().splitlines()[0] == pasted_lines[0]  # same tokens (seeded preset)
    assert re.sub(r"[\d.]+ ms|[\d.]+ tokens/s|[\d.]+ ms/token", "#", timing) == re.sub(
        r"[\d.]+ ms|[\d.]+ tokens/s|[\d.]+ ms/token", "#", pasted_lines[-1])


def test_cli_doc_video_command_and_output_match(tmp_path, combined):
    """docs/cli.md's ``run --video`` command on the clip it describes: the same text, the same timing line's shape."""
    from tests.videos import write_clip

    doc = CLI_DOC.read_text()
    write_clip(tmp_path / "clip.mp4", 25, 10, 96, 64)
    proc = _run(_doc_command(doc, r"python -m merge run combined/ --video clip\.mp4 ", combined("tiny")), tmp_path)
    pasted = re.search(r"Real output on a clip.*?```\n(.*?)```", doc, flags=re.S).group(1).rstrip("\n")
    got, want = proc.stdout.rstrip("\n").splitlines(), pasted.splitlines()
    assert got[:-1] == want[:-1]  # same tokens (seeded preset, same clip)
    number = r"[\d.]+ ms|[\d.]+ tokens/s|[\d.]+ ms/token"
    assert re.sub(number, "#", got[-1]) == re.sub(number, "#", want[-1])


def _cli_sections() -> dict[str, str]:
    """docs/cli.md's command sections (``## `build` ``...), by command."""
    parts = re.split(r"^## `(\w+)`\n", CLI_DOC.read_text(), flags=re.M)
    return {name: body.split("\n## ", 1)[0] for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def test_cli_doc_synopses_name_every_option():
    """Every command has a section in docs/cli.md whose synopsis (its first block) names each of the command's
    options, and no option the command lacks."""
    from merge.cli import make_parser

    commands = make_parser()._subparsers._group_actions[0].choices
    sections = _cli_sections()
    assert set(sections) == set(commands), "docs/cli.md has one '## `command`' section per command"
    for name, parser in commands.items():
        synopsis = re.search(r"```\n(python -m merge " + name + r"\b.*?)```", sections[name], flags=re.S).group(1)
        options = {o for action in parser._actions for o in action.option_strings if o.startswith("--")}
        options -= {"--help", "--debug"}  # every command's, said once at the top of the page
        named = set(re.findall(r"--[a-z][a-z0-9-]*", synopsis))
        assert named == options, f"{name}: synopsis lacks {sorted(options - named)}, names {sorted(named - options)}"


def test_cli_doc_presets_output_matches(tmp_path):
    pasted = re.search(r"```\n(python -m merge presets)\n```.*?Real output:\n\n```\n(.*?)```",
                       _cli_sections()["presets"], flags=re.S)
    proc = _run(pasted.group(1).replace("python ", f"{sys.executable} ", 1), tmp_path)
    assert proc.stdout == pasted.group(2)


def _doc_table(text: str, first_header: str) -> list[tuple[str, str]]:
    """(first cell, second cell) of each row of the Markdown table whose header starts ``| first_header |``."""
    table = re.search(r"^\| " + first_header + r" \|.*\n\|[-|]+\|\n((?:\|.*\n)+)", text, flags=re.M).group(1)
    return [tuple(cell.strip() for cell in row.split("|")[1:3]) for row in table.splitlines()]


def test_contract_doc_names_every_input_and_output(combined):
    """docs/contract.md's input and output tables are the built model's inputs and outputs: the same names in the
    same order, each of the rank its shape column shows."""
    manifest = json.loads((combined("tiny") / "merge.json").read_text())
    text = (DOCS / "contract.md").read_text()
    layers = sum(1 for o in manifest["outputs"] if o["name"].endswith(".key"))

    def expand(rows: list[tuple[str, str]]) -> list[tuple[str, int]]:
        out = []
        for cell, shape in rows:
            (name,) = re.findall(r"`([^`]+)`", cell)
            rank = 0 if shape.startswith("[]") else shape.count(",") + 1
            if name.endswith("{i}.key/.value"):
                stem = name[:-len("{i}.key/.value")]
                out += [(f"{stem}{i}.{kind}", rank) for kind in ("key", "value") for i in range(layers)]
            else:
                out.append((name, rank))
        return out

    for header, key in (("input", "inputs"), ("output", "outputs")):
        documented = expand(_doc_table(text, header))
        built = [(t["name"], len(t["shape"])) for t in manifest[key]]
        assert documented == built, f"docs/contract.md's {key} table differs from the model's {key}"


def test_hub_id_goes_through_huggingface_hub(monkeypatch, sources, tmp_path):
    """A hub id resolves through snapshot_download; without hub access the error says so in one sentence."""
    import huggingface_hub

    from merge.errors import MergeError
    from merge.sources.resolve import resolve_model

    local = sources("tiny").folder
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(local))
    assert resolve_model("Qwen/Qwen3-VL-2B-Instruct").folder == local

    def offline(repo_id, **kw):
        raise OSError("We couldn't connect to the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(MergeError, match=r"Qwen/Qwen3-VL-2B-Instruct: could not download from the Hugging Face hub"):
        resolve_model("Qwen/Qwen3-VL-2B-Instruct")


def test_debug_flag_before_or_after_the_command(tmp_path):
    missing = tmp_path / "missing"
    for argv in (f"--debug inspect {missing}", f"inspect {missing} --debug"):
        proc = _run(f"{sys.executable} -m merge {argv}", tmp_path, check=False)
        assert proc.returncode != 0 and "Traceback" in proc.stderr, argv
    proc = _run(f"{sys.executable} -m merge inspect {missing}", tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_architecture_layout_matches_the_tree():
    """Every package of the project is a row of docs/architecture.md's layout table (or inside one), and every room
    the table names exists."""
    section = (DOCS / "architecture.md").read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    named = {m.rstrip("/") for m in re.findall(r"^\| ((?:`[^`]+`(?:, )?)+) \|", section, flags=re.M)
             for m in re.findall(r"`([^`]+)`", m)}
    for room in named:
        assert (ROOT / room).exists(), f"docs/architecture.md's layout names {room}, which does not exist"
    packages = {str(p.parent.relative_to(ROOT)) for p in ROOT.glob("*/**/__init__.py")
                if not any(part.startswith(".") or (part in ("build", "node_modules") and p.parent.parent == ROOT)
                           for part in p.relative_to(ROOT).parts)}
    for package in sorted(packages):
        container = any(room.startswith(package + "/") for room in named)  # merge/ holds rooms
        assert container or any(package == room or package.startswith(room + "/") for room in named), \
            f"{package} is not in docs/architecture.md's layout table"
    loose = {str(p.relative_to(ROOT)) for p in (ROOT / "merge").glob("*.py") if p.name not in ("__init__.py",
                                                                                                 "__main__.py")}
    assert loose <= named, f"modules at merge/'s top missing from the layout: {sorted(loose - named)}"


def test_architecture_lists_every_stitch_pass():
    """docs/architecture.md's stitch list names each pass file in merge/stitch/passes/ once, and only those."""
    section = (DOCS / "architecture.md").read_text().split("\n## Stitch\n", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- `(\w+\.py)`", section, flags=re.M)
    files = sorted(p.name for p in (ROOT / "merge" / "stitch" / "passes").glob("*.py")
                   if p.name not in ("__init__.py", "base.py"))
    missing, gone = sorted(set(files) - set(listed)), sorted(set(listed) - set(files))
    assert files and sorted(listed) == files, f"passes not in docs/architecture.md: {missing}; listed, gone: {gone}"


def test_benchmark_tables_come_from_the_reports(tmp_path):
    """docs/benchmarks.md's tables are exactly what benchmarks/tables.py renders from the reports each block names
    (machine line, rows, peak memory), every report in benchmarks/results/ is behind one block, and the page names
    the machine each ran on; a figure changed by hand fails the check."""
    from benchmarks.tables import BLOCK, blocks

    page = DOCS / "benchmarks.md"
    text = page.read_text()
    tables = [sys.executable, str(ROOT / "benchmarks" / "tables.py")]
    proc = subprocess.run([*tables, "--check", str(page)], capture_output=True, text=True)
    assert proc.returncode == 0, ("docs/benchmarks.md differs from its reports (python benchmarks/tables.py --update "
                                  f"docs/benchmarks.md):\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    readme = subprocess.run([*tables, "--check", str(ROOT / "README.md")], capture_output=True, text=True)
    assert readme.returncode == 0, ("README.md's table differs from its reports (python benchmarks/tables.py "
                                    f"--update README.md):\n{readme.stdout[-3000:]}{readme.stderr[-2000:]}")
    named = [name for reports, body in blocks(text) for name in reports if body.count("\n| ") >= 2]
    reports = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks" / "results").glob("*.json"))
    assert reports and sorted(named) == reports, "each report in benchmarks/results/ is behind exactly one table"
    for report in reports:
        machine = json.loads((ROOT / report).read_text())["machine"]
        assert machine["model"] in text and ", ".join(machine["features"]) in text

    first = BLOCK.search(text)
    body = re.sub(r"(\d+\.\d+) GiB", lambda m: f"{float(m[1]) + 1:.2f} GiB", first["body"], count=1)
    assert body != first["body"]
    tampered = tmp_path / "benchmarks.md"
    tampered.write_text(text[:first.start("body")] + body + text[first.end("body"):])
    proc = subprocess.run([*tables, "--check", str(tampered)], capture_output=True, text=True)
    assert proc.returncode == 1 and "GiB" in proc.stdout
