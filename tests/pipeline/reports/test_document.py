"""Markdown reports print user strings as text: names and descriptions cannot inject HTML, links or tables."""
from __future__ import annotations

import re
from pathlib import Path

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


def test_user_text_in_a_summary_line_stays_text_and_code_parts_show_as_code():
    from pipeline.reports.document import Code, render_html
    line = [EVIL, " run ", Code("archlab train a|b.yaml"), " or ", Code("x `y`")]
    report = Report(title="r", summary=["plain *own* words", line], sections=[Section("S", "s1", [], [], [line])],
                    legend=[])
    md, page = render_markdown(report), render_html(report, Path("."))
    assert md.count(md_escape(EVIL) + " run `archlab train a|b.yaml` or `` x `y` ``") == 2  # summary and note
    assert "- plain *own* words" not in md and "plain *own* words" in md  # the first line: a paragraph, as written
    assert "<script>" not in page and page.count("<code>archlab train a|b.yaml</code>") == 2
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt; [x](http://evil) a|b `c` *d* run ") == 2
