"""The report as a small document model, rendered twice: markdown for a code host, HTML for a browser.

The HTML is one self-contained file: inline CSS, images as base64 data URIs, no script, no external
reference, so it can be mailed or opened offline. The markdown links its figures relatively
(figures/NAME.png) so it reads well next to them in a repository.
"""
from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.reports.figures import FigureRef


@dataclass(frozen=True)
class Link:
    """Text that jumps to an anchor in the same report; `title` shows on hover."""

    text: str
    anchor: str
    title: str = ""


Cell = str | Link | list[str | Link]


@dataclass(frozen=True)
class Code:
    """A command, path or name shown as code: in backticks in markdown, <code> in HTML."""

    text: str


# A summary line or a note. A plain str is the report's own wording, written as it is; a list's str parts are
# user text (a description, a path), escaped in each format, and its Code parts are shown as code.
Text = str | list[str | Code]


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]
    numeric: set[int] = field(default_factory=set)  # column indexes aligned right
    folded: bool = False  # shown one click away (<details>), not in the page's first view


@dataclass
class TextBlock:
    """Sampled text or decoded examples, shown verbatim."""

    anchor: str
    title: str
    text: str
    caption: str


@dataclass
class Section:
    title: str
    anchor: str
    tables: list[tuple[str, Table]]  # (heading, table)
    items: list[FigureRef | TextBlock]
    notes: list[Text] = field(default_factory=list)


@dataclass
class Report:
    title: str
    summary: list[Text]
    sections: list[Section]
    legend: list[tuple[str, str]]  # (term, meaning) shown once at the end
    legend_title: str = "How to read the flags"


# ── markdown ─────────────────────────────────────────────────────────────────
def md_escape(text: str) -> str:
    """User text made inert in Markdown, as html.escape makes it in HTML: tags, links, code, emphasis and
    table pipes print as typed (a name or description holding `<script>` stays text)."""
    inert = html.escape(str(text).replace("\n", " "), quote=False)  # & < >
    return re.sub(r"([\\`*\[\]|])", r"\\\1", inert)


def _md_code(text: str) -> str:
    text = str(text).replace("\n", " ")
    return f"`` {text} ``" if "`" in text else f"`{text}`"  # a backtick inside needs a longer fence


def _md_text(line: Text) -> str:
    if isinstance(line, str):
        return line
    return "".join(_md_code(part.text) if isinstance(part, Code) else md_escape(part) for part in line)


def _md_cell(cell: Cell) -> str:
    parts = cell if isinstance(cell, list) else [cell]
    out = []
    for part in parts:
        if isinstance(part, Link):
            title = f' "{md_escape(part.title).replace(chr(34), chr(39))}"' if part.title else ""
            out.append(f"[{md_escape(part.text)}](#{part.anchor}{title})")
        else:
            out.append(md_escape(part))
    return ", ".join(out) if isinstance(cell, list) else (out[0] if out else "")


def markdown_table(table: Table) -> str:
    header = "| " + " | ".join(md_escape(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---:" if i in table.numeric else "---" for i in range(len(table.columns))) + "|"
    rows = ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join([header, rule, *rows])


def frame_table(frame, number_format: str = ".4g") -> Table:
    """A pandas DataFrame as a Table: floats in `number_format`, missing values empty, numeric columns right."""
    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return format(value, number_format) if isinstance(value, float) else str(value)
    numeric = {i for i, kind in enumerate(frame.dtypes) if kind.kind in "iuf"}
    return Table([str(c) for c in frame.columns], [[cell(v) for v in row] for row in frame.itertuples(index=False)],
                 numeric=numeric)


def render_markdown(report: Report) -> str:
    summary = [_md_text(line) for line in report.summary]
    summary = summary[:1] + [""] + [f"- {line}" for line in summary[1:]]
    lines = [f"# {report.title}", "", *summary, "", "**Contents:** "
             + " · ".join(f"[{s.title}](#{s.anchor})" for s in report.sections), ""]
    for section in report.sections:
        lines += [f'<a id="{section.anchor}"></a>', "", f"## {section.title}", ""]
        lines += [*map(_md_text, section.notes), ""] if section.notes else []
        for heading, table in section.tables:
            if table.folded:  # GitHub renders <details> in markdown too
                lines += [f"<details><summary>{heading}</summary>", "", markdown_table(table), "", "</details>", ""]
            else:
                lines += [f"**{heading}**", "", markdown_table(table), ""]
        for item in section.items:
            lines += [f'<a id="{item.anchor}"></a>', "", f"### {item.title}", ""]
            if isinstance(item, FigureRef):
                lines += [f"![{md_escape(item.caption)}]({item.path})", "", f"*{md_escape(item.caption)}*", ""]
            else:
                lines += [f"*{md_escape(item.caption)}*", "", "```text", item.text.replace("```", "'''"), "```", ""]
    if report.legend:
        lines += [f"## {report.legend_title}", ""] + [f"- **{term}**: {meaning}" for term, meaning in report.legend]
    return "\n".join(lines).rstrip() + "\n"


# ── HTML ─────────────────────────────────────────────────────────────────────
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1240px;
 padding:1rem 1.5rem;color:#1b1f24;background:#fff}
h1{font-size:1.6rem;margin:.4rem 0}h2{font-size:1.3rem;border-bottom:1px solid #d0d7de;padding-bottom:.2rem;
 margin-top:2.2rem}h3{font-size:1rem;margin:1.4rem 0 .4rem}
nav a{margin-right:.8rem}.summary{color:#444}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:12.5px;margin:.4rem 0 1rem}
th,td{border:1px solid #d0d7de;padding:3px 7px;vertical-align:top;white-space:nowrap}
th{background:#f3f5f7;text-align:left;white-space:normal;vertical-align:bottom;min-width:3.2em}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafbfc}
a{color:#0b5cad;text-decoration:none}a:hover{text-decoration:underline}
a.flag{background:#ffebe9;color:#a40e26;border-radius:3px;padding:0 4px}
figure{margin:.4rem 0 1.4rem}figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
figure img.samples{min-width:240px;image-rendering:pixelated}
figcaption{color:#555;font-size:12.5px;margin-top:.2rem}
pre{background:#f6f8fa;border:1px solid #eaeef2;padding:.6rem;white-space:pre-wrap;font-size:12px}
:target{outline:2px solid #f0b429;outline-offset:4px}
dl dt{font-weight:600}dl dd{margin:0 0 .4rem 1rem}
details{margin:-.6rem 0 1rem}summary{cursor:pointer;color:#0b5cad;font-size:12.5px}
"""


def _h(text) -> str:
    return html.escape(str(text), quote=True)


def _html_text(line: Text) -> str:
    if isinstance(line, str):
        return _h(line)
    return "".join(f"<code>{_h(part.text)}</code>" if isinstance(part, Code) else _h(part) for part in line)


def _html_part(part: str | Link, flag: bool) -> str:
    if isinstance(part, Link):
        cls = ' class="flag"' if flag else ""
        title = f' title="{_h(part.title)}"' if part.title else ""
        return f'<a href="#{_h(part.anchor)}"{cls}{title}>{_h(part.text)}</a>'
    return _h(part)


def _html_cell(cell: Cell) -> str:
    if isinstance(cell, list):
        return " ".join(_html_part(p, flag=True) for p in cell)
    return _html_part(cell, flag=False)


def html_table(table: Table) -> str:
    head = "".join(f"<th>{_h(c)}</th>" for c in table.columns)
    body = []
    for row in table.rows:
        cells = "".join(f'<td class="num">{_html_cell(c)}</td>' if i in table.numeric else f"<td>{_html_cell(c)}</td>"
                        for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def data_uri(path: Path) -> str:
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
            ".gif": "image/gif"}.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def render_html(report: Report, reports_dir: Path) -> str:
    """The whole report as one HTML page; figure files are read from reports_dir and inlined."""
    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{_h(report.title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{_h(report.title)}</h1>"]
    parts.append(f'<p class="summary">{_html_text(report.summary[0])}</p>' if report.summary else "")
    parts.append('<ul class="summary">' + "".join(f"<li>{_html_text(line)}</li>" for line in report.summary[1:])
                 + "</ul>")
    parts.append("<nav>" + "".join(f'<a href="#{_h(s.anchor)}">{_h(s.title)}</a>' for s in report.sections)
                 + "</nav>")
    for section in report.sections:
        parts.append(f'<section id="{_h(section.anchor)}"><h2>{_h(section.title)}</h2>')
        parts += [f"<p>{_html_text(note)}</p>" for note in section.notes]
        for heading, table in section.tables:
            if table.folded:
                parts.append(f"<details><summary>{_h(heading)}</summary>{html_table(table)}</details>")
            else:
                parts.append(f"<h3>{_h(heading)}</h3>{html_table(table)}")
        for item in section.items:
            if isinstance(item, FigureRef):
                src = data_uri(Path(reports_dir) / item.path)
                css = ' class="samples"' if item.kind == "samples" else ""
                parts.append(f'<figure id="{_h(item.anchor)}"><h3>{_h(item.title)}</h3>'
                             f'<img{css} src="{src}" alt="{_h(item.caption)}">'
                             f"<figcaption>{_h(item.caption)}</figcaption></figure>")
            else:
                parts.append(f'<figure id="{_h(item.anchor)}"><h3>{_h(item.title)}</h3><pre>{_h(item.text)}</pre>'
                             f"<figcaption>{_h(item.caption)}</figcaption></figure>")
        parts.append("</section>")
    if report.legend:
        parts.append(f'<section id="legend"><h2>{_h(report.legend_title)}</h2><dl>'
                     + "".join(f"<dt>{_h(t)}</dt><dd>{_h(m)}</dd>" for t, m in report.legend) + "</dl></section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
