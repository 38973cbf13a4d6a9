"""Markdown reports print user strings as text: names and descriptions cannot inject HTML, links or tables."""
from __future__ import annotations

import re

from pipeline.reports.document import Link, Report, Section, Table, TextBlock, md_escape, render_markdown

EVIL = "<script>alert(1)</script> [x](http://evil) a|b `c` *d*"


def test_md_escape_leaves_no_tag_link_code_pipe_or_emphasis():
    out = md_escape(EVIL)
    assert "<" not in out and ">" not in out
    assert out == ("&lt;script&gt;alert(1)&lt;/script&gt; \\[x\\](http://evil) a\\|b \\`c\\` \\*d\\*")


def test_user_strings_in_a_markdown_report_stay_text():
    table = Table(columns=["experiment", "note"], rows=[[Link(EVIL, "a1", title=EVIL), EVIL]])
    block = TextBlock(anchor="t1", title="samples", text="raw text", caption=EVIL)
    report = Report(title="r", summary=["s"], sections=[Section("S", "s1", [("h", table)], [block])], legend=[])
    md = render_markdown(report)
    assert "<script>" not in md and not re.search(r"(?<!\\)\]\(http", md)  # no live link either
    assert md.count("&lt;script&gt;") == 4  # the link text, its title, the cell and the caption
