"""What ``characonsist eval`` writes: a terminal table, ``eval.json``, CSV files and a self-contained HTML page.

The HTML page embeds every image as a base64 thumbnail and has no script, font or style sheet from anywhere
else, so it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

from PIL import Image

from ..app.folder import write_file
from .evaluator import EVAL_FORMAT
from .metrics import METRICS

FILES = ("eval.json", "groups.csv", "images.csv", "pairs.csv", "eval.html")


class ReportError(ValueError):
    pass


def metric_header(key: str) -> str:
    label, higher = METRICS[key]
    return f"{label} {'↑' if higher else '↓'}"


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def text_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def terminal_summary(result: dict) -> str:
    """Per group and overall, one column per metric; then each metric's model and what was skipped."""
    keys = list(result["overall"])
    header = ["group", "images", *(metric_header(k) for k in keys)]
    rows = [[g["name"], str(len(g["images"])), *(fmt(g["summary"][k]["mean"]) for k in keys)] for g in result["groups"]]
    rows.append(["overall (mean of groups)", str(sum(len(g["images"]) for g in result["groups"])),
                 *(fmt(result["overall"][k]["mean"]) for k in keys)])
    lines = [f"{result['run']['label']}: {result['run']['folder']}  (pairs: {result['config']['pairs']})", "",
             text_table(rows, header), ""]
    for key in keys:
        m = result["metrics"][key]
        if m["status"] == "ok":
            lines.append(f"{m['label']}: {m.get('model', '?')}")
        else:
            lines.append(f"{m['label']}: {m['status']}: {m.get('reason', '')}")
    if result["notes"]:
        lines += ["", f"notes ({len(result['notes'])}):", *(f"  {n}" for n in result["notes"][:20])]
    return "\n".join(lines)


def check_ours(folder: Path) -> None:
    """Refuse to write into ``folder`` if it holds one of our file names that an earlier eval did not write."""
    if not folder.exists():
        return
    mine = folder / "eval.json"
    ours = False
    if mine.is_file():
        try:
            ours = json.loads(mine.read_text()).get("format") == EVAL_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
    clash = [name for name in FILES if (folder / name).exists()]
    if clash and not ours:
        raise ReportError(f"{folder}: holds {', '.join(clash)} that `characonsist eval` did not write; "
                          "choose another --report-dir (nothing was overwritten)")


def write_report(result: dict, folder: str | Path, run_folder: str | Path | None = None) -> list[Path]:
    folder = Path(folder)
    check_ours(folder)
    keys = list(result["overall"])
    written = []

    def put(name: str, data: bytes):
        write_file(folder / name, data)
        written.append(folder / name)

    put("eval.json", (json.dumps(result, indent=2, default=str) + "\n").encode())
    rows = [[result["run"]["label"], g["name"], len(g["images"]), *(g["summary"][k]["mean"] for k in keys),
             *(g["summary"][k]["n"] for k in keys)] for g in result["groups"]]
    rows.append([result["run"]["label"], "overall", sum(len(g["images"]) for g in result["groups"]),
                 *(result["overall"][k]["mean"] for k in keys), *(result["overall"][k]["n"] for k in keys)])
    put("groups.csv", _csv(["run", "group", "images", *keys, *(f"n_{k}" for k in keys)], rows))
    image_keys = ["path", "role", "text", "clip_t", "mask_source", "face"]
    put("images.csv", _csv(["group", *image_keys],
                           [[g["name"], *(im.get(k) for k in image_keys)] for g in result["groups"] for im in g["images"]]))
    pair_keys = ["a", "b", "same_scene", *(k for k in keys if k != "clip_t")]
    put("pairs.csv", _csv(["group", *pair_keys],
                          [[g["name"], *(p.get(k) for k in pair_keys)] for g in result["groups"] for p in g["pairs"]]))
    put("eval.html", html_page(result, Path(run_folder or result["run"]["folder"])).encode())
    return written


def _csv(header: list[str], rows: list[list]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else (f"{v:.6f}" if isinstance(v, float) else
                                               json.dumps(v) if isinstance(v, list) else v) for v in row])
    return buffer.getvalue().encode()


def thumbnail(path: Path, size: int = 192) -> str:
    """A ``data:`` URI of the image scaled to at most ``size`` pixels (empty when it cannot be read)."""

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size), Image.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
    except OSError:
        return ""
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
.row{display:flex;flex-wrap:wrap;gap:10px}.card{width:200px;font-size:12px;border:1px solid #ddd;padding:4px}
.card img{width:192px;display:block}.id{border:2px solid #36c}.muted{color:#777}code{font-size:12px}"""


def html_page(result: dict, run_folder: Path) -> str:
    keys = list(result["overall"])
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>eval: {e(result['run']['label'])}</title>"
           f"<style>{STYLE}</style></head><body>",
           f"<h1>{e(result['run']['label'])}</h1><p class='muted'>{e(result['run']['folder'])}; pairs: "
           f"{e(result['config']['pairs'])}; model: {e(result['run']['model'])}</p>",
           "<table><tr><th>group</th>" + "".join(f"<th>{e(metric_header(k))}</th>" for k in keys) + "</tr>"]
    for g in result["groups"]:
        out.append(f"<tr><td><a href='#{e(g['name'])}'>{e(g['name'])}</a></td>"
                   + "".join(f"<td>{fmt(g['summary'][k]['mean'])}</td>" for k in keys) + "</tr>")
    out.append("<tr><th>overall</th>" + "".join(f"<th>{fmt(result['overall'][k]['mean'])}</th>" for k in keys)
               + "</tr></table>")
    out.append("<h2>Metrics</h2><table><tr><th>metric</th><th>status</th><th>model</th><th>preprocessing</th></tr>")
    for k in keys:
        m = result["metrics"][k]
        out.append(f"<tr><td>{e(m['label'])}</td><td>{e(m['status'])}</td><td style='text-align:left'>"
                   f"{e(m.get('model', m.get('reason', '')))}</td><td style='text-align:left'>{e(m.get('preprocessing', ''))}</td></tr>")
    out.append("</table>")
    pair_keys = [k for k in keys if k != "clip_t"]
    for g in result["groups"]:
        out.append(f"<h2 id='{e(g['name'])}'>{e(g['name'])}</h2><div class='row'>")
        versus = {p["b"]: p for p in g["pairs"] if p["a"] == g["images"][0]["path"]}
        for im in g["images"]:
            lines = [f"<b>{e(im['role'])}</b> <span class='muted'>{e(im['path'])}</span>", e(im["text"]),
                     f"CLIP-T {fmt(im.get('clip_t'))}"]
            if im.get("mask_source"):
                lines.append(f"mask: {e(im['mask_source'])}")
            if "face" in im:
                lines.append("face: " + ("none found" if im["face"] is None else f"score {im['face'][4]:.2f}"))
            pair = versus.get(im["path"])
            if pair:
                lines.append("vs identity: " + ", ".join(f"{e(METRICS[k][0])} {fmt(pair.get(k))}" for k in pair_keys
                                                         if k in pair))
            out.append(f"<div class='card{' id' if im['role'] == 'identity' else ''}'>"
                       f"<img src='{thumbnail(run_folder / im['path'])}' alt='{e(im['path'])}'><br>"
                       + "<br>".join(lines) + "</div>")
        out.append("</div>")
        if result["config"]["pairs"] == "all" and g["pairs"]:
            out.append("<table><tr><th>a</th><th>b</th><th>same scene</th>"
                       + "".join(f"<th>{e(metric_header(k))}</th>" for k in pair_keys) + "</tr>")
            for p in g["pairs"]:
                out.append(f"<tr><td>{e(p['a'])}</td><td>{e(p['b'])}</td><td>{'yes' if p['same_scene'] else 'no'}</td>"
                           + "".join(f"<td>{fmt(p.get(k))}</td>" for k in pair_keys) + "</tr>")
            out.append("</table>")
        if g["notes"]:
            out.append("<p class='muted'>" + "<br>".join(e(n) for n in g["notes"]) + "</p>")
    out.append("</body></html>\n")
    return "\n".join(out)


def compare_table(results: list[dict], references: list[dict] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per run (overall means), then the reference rows of papers."""
    keys = [k for k in METRICS if any(k in r["overall"] for r in results)]
    header = ["run", "groups", *(metric_header(k) for k in keys)]
    rows = [[r["run"]["label"], str(len(r["groups"])), *(fmt(r["overall"].get(k, {}).get("mean")) for k in keys)]
            for r in results]
    for ref in references or []:
        rows.append([f"[paper] {ref['label']}", "-", *(fmt(ref["values"].get(k)) for k in keys)])
    return header, rows


def compare_html(header: list[str], rows: list[list[str]], notes: list[str]) -> str:
    e = html.escape
    body = ["<!doctype html><html><head><meta charset='utf-8'><title>eval: comparison</title>"
            f"<style>{STYLE}</style></head><body><h1>Comparison</h1><table><tr>"
            + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    body += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
    body.append("</table>" + "".join(f"<p class='muted'>{e(n)}</p>" for n in notes) + "</body></html>\n")
    return "\n".join(body)
