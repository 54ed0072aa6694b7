"""The performance and fidelity tables, rendered from the benchmarks' JSON reports (vision.py, video.py, speed.py,
fidelity.py), each under the machine it ran on. Several vision reports (say small images and photos, run apart)
merge into one table.

    python benchmarks/tables.py vision.json photo.json video.json speed.json

A Markdown page holds rendered tables between markers that name their reports, in order (paths from the
repository's root); what lies between the markers is exactly what this script prints for those reports:

    <!-- tables.py benchmarks/results/vision-2b-small.json benchmarks/results/vision-2b-photo.json -->
    ...
    <!-- /tables.py -->

    python benchmarks/tables.py --update docs/benchmarks.md   # render every block of the page again
    python benchmarks/tables.py --check docs/benchmarks.md    # exit 1 if a block differs from its reports
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^<!-- tables\.py (?P<reports>[^\n]+?) -->\n(?P<body>.*?)^<!-- /tables\.py -->$", re.M | re.S)


def machine_line(info: dict) -> str:
    features = ", ".join(info.get("features", [])) or "no AVX-512/AMX"
    return (f"{info['model']}, {info['cores']} cores ({features}), {info['threads']} threads, memory read "
            f"{info['read_bandwidth_gbs']:.1f} GB/s")


def vision_table(reports: list[dict]) -> list[str]:
    lines = [f"Vision tower, {reports[0]['model']}, one image per call (median, peak memory of the process; "
             f"ratios > 1: ours faster). Machine: {machine_line(reports[0]['machine'])}.", "",
             "| image | patches | system | time | peak | vs torch fp32 | vs torch bf16 |",
             "|---|---|---|---|---|---|---|"]
    for report in reports:
        for size, entry in report["sizes"].items():
            t, h, w = entry["grid"]
            rows = entry["systems"]
            for system, row in rows.items():
                if "error" in row:
                    lines.append(f"| {size} | {t * h * w:,} | {system} | failed: {str(row['error'])[:60]} | | | |")
                    continue
                ratios = []
                for base in ("torch-fp32", "torch-bf16"):
                    ref = rows.get(base, {})
                    ratios.append(f"{ref['median_s'] / row['median_s']:.2f}x" if "median_s" in ref else "-")
                runs = f" ({row['runs']} run{'s' if row['runs'] > 1 else ''})"
                lines.append(f"| {size} | {t * h * w:,} | {system} | {row['median_s']:.2f} s{runs} | "
                             f"{row['peak_gib']:.2f} GiB | {ratios[0]} | {ratios[1]} |")
    return lines


def video_table(report: dict) -> list[str]:
    lines = [f"Video, {report['model']} ({Path(report['combined']).name}): first call (preprocessing excluded) on a "
             f"{report['size']}x{report['size']} clip at {report['fps']:g} fps. Machine: "
             f"{machine_line(report['machine'])}.", "",
             "| clip | frames | video tokens | preprocessing | first call | per video token | peak |",
             "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        if "first_call_s" not in row:
            lines.append(f"| {row['seconds']:g} s | | | | failed: {row['runs'][-1].get('error', '')[:60]} | | |")
            continue
        frames = int(row["seconds"] * report["fps"])
        lines.append(f"| {row['seconds']:g} s | {frames} | {row['video_tokens']:,} | {row['preprocess_s']:.1f} s | "
                     f"{row['first_call_s']:.1f} s | {row['first_call_s'] / row['video_tokens'] * 1e3:.1f} ms | "
                     f"{row['peak_gib']:.2f} GiB |")
    return lines


SPEED_ORDER = ("combined", "combined-growing", "bare", "llama-Q4_0", "llama-Q4_K_M", "torch-fp32", "torch-bf16")


def speed_table(reports: list[dict]) -> list[str]:
    """One table from one or more speed reports of the same model (e.g. a long-context run kept apart)."""
    phases: dict[str, dict] = {}
    peaks: dict[str, float] = {}
    for report in reports:
        for phase, summary in report["systems"].items():
            phases.setdefault(phase, {}).update(summary)
        for system, peak in report.get("peak_gib", {}).items():
            peaks[system] = max(peaks.get(system, 0.0), peak)
    systems = sorted({s for summary in phases.values() for s in summary},
                     key=lambda s: (SPEED_ORDER.index(s) if s in SPEED_ORDER else 1, s))
    first = reports[0]
    series = f" ({first['series']})" if first.get("series") else ""
    scheme = first.get("combined_scheme", "block 32, KV cache in place")  # reports before it: block 32
    lines = [f"Decoder phases, {first['model']}{series}, int4: medians (how many runs in brackets), then how many "
             f"times faster the combined model ({scheme}) is than each system. Machine: "
             f"{machine_line(first['machine'])}.", "",
             "| phase | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    for phase, summary in phases.items():
        base = summary.get("combined")
        cells = []
        for system in systems:
            row = summary.get(system)
            if not row:
                cells.append("-")
                continue
            unit = row["unit"]
            text = f"{row['median']:.2f} {unit} ({len(row.get('runs', [0]))})"
            if base and system != "combined":
                r = row["median"] / base["median"] if unit == "s" else base["median"] / row["median"]
                text += f", {r:.2f}x"
            cells.append(text)
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Peak memory: " + ", ".join(f"{s} {peaks[s]:.2f} GiB" for s in systems if s in peaks) + ".")
    return lines


def speed_groups(reports: list[dict]) -> list[list[dict]]:
    """One table per model and series (``speed.py --series``): a long-context run of the same series joins its
    main run; another series gets a table of its own. In the order first seen."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for report in reports:
        groups.setdefault((report["model"], report.get("series", "")), []).append(report)
    return list(groups.values())


def fidelity_table(report: dict) -> list[str]:
    """``fidelity.py``'s report: one row per system and prompt, each against its own fp32 base."""
    text, image, llama = report["text"], report["image"], report.get("llama", {})
    spread = report.get("torch_fp32_spread", {}).get("text")
    spread_note = (f"; PyTorch fp32 there: mean top-1 probability {spread['top1_prob_mean']:.2f}, mean entropy "
                   f"{spread['entropy_mean']:.2f} nats" if spread else "")
    lines = [f"Fidelity, {report['model']}, spread copy (final text norm x {report['factor']:g}{spread_note}). "
             f"Text: {text['chunks']} chunks of {text['ctx']} tokens of the corpus, the second half of each scored "
             f"(as llama-perplexity does); image: a {image['size']}x{image['size']} picture ({image['image_tokens']} "
             f"image tokens), every position of the {image['tokens']}-token prompt. KL(base || system) in nats. "
             f"Machine: {machine_line(report['machine'])}.", "",
             "| system | base | prompt | positions | mean KL | p99 KL | top-1 | rel. logits error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        rel = f"{r['rel_error']:.2e}" if r.get("rel_error") is not None else "n/a"
        lines.append(f"| {r['system']} | {r['base']} | {r['prompt']} | {r['positions']:,} | {r['kl_mean']:.2e} | "
                     f"{r['kl_p99']:.2e} | {r['top1']:.1%} | {rel} |")
    if llama:
        lines.append("")
        same = llama.get("same_tokens")
        tokens = "" if same is None else f"; its tokens of the text are {'ours' if same else 'NOT ours'}"
        lines.append(f"llama.cpp: text only ({llama.get('text_only', '')}){tokens}; no logits (rel. error n/a).")
    return lines


SUMMARY_PHASES = (("prefill-226", "prefill 226"), ("prefill-2048", "prefill 2048"), ("decode-256", "decode @256"),
                  ("decode-4096", "decode @4k"), ("decode-16384", "decode @16k"), ("image-448", "448² image"),
                  ("batch-1", "batch 1"), ("batch-4", "batch 4"), ("batch-8", "batch 8"))
SUMMARY_OURS = "ours-int4"  # fidelity.py's label of the default scheme


def summary_table(fidelity: dict, speeds: list[dict], long_context: dict | None = None) -> list[str]:
    """The README's table: the default int4 folder beside llama.cpp's 4-bit GGUFs of the same weights, text KL to
    each one's own fp32 (``fidelity.py``) and how many times faster ours is in each phase (``speed.py``; reports of
    one model joined), the 16k-context peak from ``long_context.py`` where given."""
    phases: dict[str, dict] = {}
    for report in speeds:
        for phase, summary in report["systems"].items():
            phases.setdefault(phase, {}).update(summary)
    shown = [(key, label) for key, label in SUMMARY_PHASES if key in phases]
    text = {r["system"]: r for r in fidelity["rows"] if r["prompt"] == "text"
            and not r["base"].endswith("stored log-probs")}
    ours = text[SUMMARY_OURS]
    peaks = {}
    if long_context:
        peaks = {r["system"]: r["peak_gib"] for r in long_context["rows"] if r["context"] == 16384 and "peak_gib" in r}
    speed = speeds[0]
    lines = [f"{speed['model']} on {machine_line(speed['machine'])}: the default int4 folder "
             f"({speed.get('combined_scheme', 'int4')}) beside llama.cpp's 4-bit GGUFs of the same weights. KL: mean "
             f"KL(fp32 || system) in nats on {fidelity['text']['chunks']} x {fidelity['text']['ctx']} tokens of text "
             f"(the spread copy, final norm x {fidelity['factor']:g}), each system against its own fp32. Phases: "
             "ours in seconds or tokens/s, llama.cpp as how many times faster ours is (> 1: ours faster)"
             + (f"; peak memory at a 16k context, ours with {long_context['combined'].split(', ')[-1]}"
                if peaks else "") + "; one run each.", "",
             "| system | KL mean | KL p99 | " + " | ".join(label for _, label in shown)
             + (" | peak @16k |" if peaks else " |"),
             "|---|---|---|" + "---|" * (len(shown) + bool(peaks))]
    cells = []
    for key, _ in shown:
        row = phases[key]["combined"]
        cells.append(f"{row['median']:.2f} {'s' if row['unit'] == 's' else 'tok/s'}")
    peak = [f"{peaks['ours']:.2f} GiB"] if peaks else []
    lines.append(f"| ours, int4 | {ours['kl_mean']:.2e} | {ours['kl_p99']:.2e} | " + " | ".join(cells + peak) + " |")
    for kind in ("Q4_K_M", "Q4_0"):
        fid = text.get(f"llama-{kind}")
        cells = []
        for key, _ in shown:
            base, other = phases[key].get("combined"), phases[key].get(f"llama-{kind}")
            if not other:
                cells.append("-")
                continue
            r = other["median"] / base["median"] if other["unit"] == "s" else base["median"] / other["median"]
            cells.append(f"{r:.2f}x")
        if peaks:
            cells.append(f"{peaks[f'llama.cpp {kind}']:.2f} GiB" if f"llama.cpp {kind}" in peaks else "-")
        kl = f"{fid['kl_mean']:.2e} | {fid['kl_p99']:.2e}" if fid else "- | -"
        lines.append(f"| llama.cpp {kind} | {kl} | " + " | ".join(cells) + " |")
    return lines


def render_summary(paths: list[str]) -> str:
    reports = [json.loads(Path(p).read_text()) for p in paths]
    fidelity = next(r for r in reports if r.get("benchmark") == "fidelity")
    long_context = next((r for r in reports if r.get("benchmark") == "long_context"), None)
    return "\n".join(summary_table(fidelity, [r for r in reports if "systems" in r and "peak_gib" in r],
                                   long_context))


def long_context_table(report: dict) -> list[str]:
    """``long_context.py``'s report: resident memory per system and context length."""
    lines = [f"Memory at long context, {report['model']} ({report['combined']}): resident memory in GiB after "
             f"loading, after the context is filled ({report['chunk']:,} positions a call, the runtime's chunked "
             f"prefill) and at the peak; llama.cpp is `llama-bench -d N -n 8` (text only: no vision weights). "
             f"Machine: {machine_line(report['machine'])}.", "",
             "| system | context | loaded | after the fill | KV cache | peak |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['context']:,} | error: {' '.join(r['error'])} | | | |")
            continue
        cells = " | ".join(f"{r[k]:.2f}" if k in r else "" for k in ("loaded_gib", "filled_gib", "kv_gib"))
        lines.append(f"| {r['system']} | {r['context']:,} | {cells} | {r['peak_gib']:.2f} |")
    return lines


def render(paths: list[str]) -> str:
    reports = [json.loads(Path(p).read_text()) for p in paths]
    vision = [r for r in reports if "sizes" in r]
    out: list[str] = []
    if vision:
        out += [*vision_table(vision), ""]
    for report in reports:
        if "rows" in report and "fps" in report:
            out += [*video_table(report), ""]
    for report in reports:
        if report.get("benchmark") == "fidelity":
            out += [*fidelity_table(report), ""]
    for report in reports:
        if report.get("benchmark") == "long_context":
            out += [*long_context_table(report), ""]
    for group in speed_groups([r for r in reports if "systems" in r and "peak_gib" in r]):
        out += [*speed_table(group), ""]
    return "\n".join(out).rstrip()


def blocks(page: str) -> list[tuple[list[str], str]]:
    """The page's marked blocks: the reports each names (as written, from the repository's root) and its body."""
    return [(m["reports"].split(), m["body"]) for m in BLOCK.finditer(page)]


def update(page: str) -> str:
    """The page with every marked block rendered again from the reports it names."""

    def again(m: re.Match) -> str:
        names = m["reports"].split()
        summary = names[:1] == ["--summary"]  # the README's table (summary_table) rather than the full ones
        names = names[1:] if summary else names
        missing = [name for name in names if not (ROOT / name).is_file()]
        if missing:
            raise SystemExit(f"a tables.py block names {', '.join(missing)}, which is not a report under {ROOT}")
        body = (render_summary if summary else render)([str(ROOT / name) for name in names])
        return f"<!-- tables.py {m['reports']} -->\n{body}\n<!-- /tables.py -->"

    return BLOCK.sub(again, page)


def main(argv: list[str]) -> int:
    if argv[:1] in (["--update"], ["--check"]) and len(argv) == 2:
        page = Path(argv[1])
        text = page.read_text()
        if not blocks(text):
            print(f"{page}: no <!-- tables.py REPORT.json ... --> blocks", file=sys.stderr)
            return 2
        new = update(text)
        if argv[0] == "--update":
            if new != text:
                page.write_text(new)
            return 0
        if new != text:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), str(page),
                                                       f"{page} rendered from its reports"))
            return 1
        return 0
    print(render(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
