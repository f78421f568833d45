"""Markdown and self-contained HTML from a list of blocks. Every string that is not our own number
formatting is escaped: `html.escape` in HTML, backslash escapes or code spans in Markdown."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass

from bench.reporting.plots import Figure
from bench.reporting.tables import Table


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str
    kind: str = ""  # "", "note", "warning"


@dataclass
class Defs:
    pairs: list[tuple[str, str]]


@dataclass
class Code:
    text: str
    summary: str = ""  # HTML: collapsed under this summary


# -- Markdown ----------------------------------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|&#~])")


def md_escape(text) -> str:
    """Literal text in Markdown (CommonMark/GFM): punctuation that could start markup is backslash-escaped."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def md_code(text) -> str:
    text = " ".join(str(text).split())
    ticks = max((len(m) for m in re.findall(r"`+", text)), default=0) + 1
    pad = " " if text.startswith("`") or text.endswith("`") or not text else ""
    return f"{'`' * ticks}{pad}{text}{pad}{'`' * ticks}"


def _md_cell(cell) -> str:
    text = cell.text if getattr(cell, "trusted", False) else md_escape(cell.text)
    return f"**{text}**" if cell.best else text


def md_table(t: Table) -> str:
    lines = ["| " + " | ".join(md_escape(h) for h in t.header) + " |",
             "|" + "|".join(":---" if i < t.label_columns else "---:" for i in range(len(t.header))) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def to_markdown(blocks: list) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + md_escape(b.text), ""]
        elif isinstance(b, Para):
            prefix = {"warning": "**Warning:** ", "note": ""}.get(b.kind, "")
            out += [prefix + md_escape(b.text), ""]
        elif isinstance(b, Table):
            out += [f"*{md_escape(b.caption)}*", "", md_table(b), ""]
            out += [f"*{md_escape(n)}*" for n in b.notes] + ([""] if b.notes else [])
        elif isinstance(b, Figure):
            alt = md_escape(b.alt)
            out += [f"![{alt}]({b.path.name})", "", f"*{md_escape(b.caption)}*", ""]
        elif isinstance(b, Defs):
            out += [f"- **{md_escape(k)}**: {md_code(v)}" for k, v in b.pairs] + [""]
        elif isinstance(b, Code):
            fence = "`" * max(3, max((len(m) for m in re.findall(r"`+", b.text)), default=0) + 1)
            if b.summary:
                out += [md_escape(b.summary) + ":", ""]
            out += [fence + "yaml", b.text.rstrip("\n"), fence, ""]
    return "\n".join(out).rstrip("\n") + "\n"


# -- HTML --------------------------------------------------------------------------------------------------------
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")

CSS = """
:root{--fg:#1d1d1f;--muted:#5f6368;--line:#d0d3d8;--head:#f1f3f5;--best:#0b5394;--warn:#8a4b00}
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:var(--fg);
max-width:64rem;margin:1.5rem auto;padding:0 1rem}
h1{font-size:1.55rem;margin:.2rem 0 .6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid var(--line)}
h3{font-size:1.05rem;margin-top:1.5rem}
.table-wrap{overflow-x:auto;margin:0 0 .4rem}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;font-size:.9rem}
figure.table{margin:.6rem 0 1rem}figure.table>figcaption{padding:.2rem 0 .4rem}
th,td{border:1px solid var(--line);padding:.22rem .55rem;text-align:right;white-space:nowrap}
th{background:var(--head);font-weight:600;vertical-align:bottom}
th.label,td.label{text-align:left}
td.wrap{white-space:normal;text-align:left;min-width:18rem;word-break:break-word}
th[data-col]{cursor:pointer;user-select:none}
th[data-col]:after{content:" \\2195";color:#9aa0a6;font-size:.75em}
th[aria-sort=ascending]:after{content:" \\25B2";color:var(--fg)}
th[aria-sort=descending]:after{content:" \\25BC";color:var(--fg)}
td.best{font-weight:700;color:var(--best)}
tbody tr:nth-child(even){background:#fafbfc}
p.note{color:var(--muted);font-size:.85rem;margin:.2rem 0}
p.warning{color:var(--warn);font-weight:600}
figure{margin:1rem 0;page-break-inside:avoid;break-inside:avoid}
figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:var(--muted);font-size:.85rem}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.15rem 1rem;font-size:.88rem}
dt{font-weight:600}dd{margin:0;word-break:break-word;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.82rem}
pre{background:#f6f8fa;padding:.6rem;overflow-x:auto;font-size:.8rem}
nav.toc{font-size:.85rem;color:var(--muted)}nav.toc a{margin-right:.8rem}
@media print{body{max-width:none;margin:0;font-size:10pt}th[data-col]:after{content:""}
.table-wrap{overflow:visible}nav.toc{display:none}details{display:block}details>*{display:block}
h2{page-break-after:avoid}table,figure{page-break-inside:avoid}a{color:inherit;text-decoration:none}}
"""

# Click a header to sort by that column (numbers numerically via data-v, '–' last); click again to reverse.
JS = """
document.querySelectorAll('table.sortable').forEach(function(table){
  table.querySelectorAll('th[data-col]').forEach(function(th){
    th.addEventListener('click',function(){
      var col=+th.dataset.col, asc=th.getAttribute('aria-sort')!=='ascending';
      table.querySelectorAll('th[data-col]').forEach(function(o){o.removeAttribute('aria-sort');});
      th.setAttribute('aria-sort',asc?'ascending':'descending');
      var body=table.tBodies[0], rows=Array.prototype.slice.call(body.rows);
      function key(r){var c=r.cells[col]; if(!c||!c.hasAttribute('data-v')) return null;
        var v=c.getAttribute('data-v'); return c.hasAttribute('data-num')?parseFloat(v):v;}
      rows.sort(function(a,b){var x=key(a),y=key(b);
        if(x===null&&y===null) return 0; if(x===null) return 1; if(y===null) return -1;
        var d=(typeof x==='number'&&typeof y==='number')?x-y:String(x).localeCompare(String(y),undefined,{numeric:true});
        return asc?d:-d;});
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
});
"""


def _slug(text: str, used: set) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:40] or "s"
    slug, n = base, 2
    while slug in used:
        slug, n = f"{base}-{n}", n + 1
    used.add(slug)
    return slug


def html_table(t: Table, ident: str) -> str:
    e = html.escape
    head = "".join(f"<th scope='col' data-col='{i}'{' class=label' if i < t.label_columns else ''}>{e(h)}</th>"
                   for i, h in enumerate(t.header))
    body = []
    for row in t.rows:
        tds = []
        for i, c in enumerate(row):
            classes = (["label"] if i < t.label_columns else []) + (["best"] if c.best else []) + \
                (["wrap"] if i in t.wrap_columns else [])
            attrs = f" class='{' '.join(classes)}'" if classes else ""
            if c.sort is not None:
                num = isinstance(c.sort, (int, float))
                attrs += f" data-v='{e(repr(float(c.sort)) if num else str(c.sort))}'" + (" data-num" if num else "")
            if c.title:
                attrs += f" title='{e(c.title)}'"
            tds.append(f"<td{attrs}>{e(c.text)}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    notes = "".join(f"<p class='note'>{e(n)}</p>" for n in t.notes)
    # the caption sits outside the scrolling wrapper: a table wider than the page scrolls, its caption wraps at
    # the page's width instead of running off with the table (a <caption> is as wide as its table)
    return (f"<figure class='table'><figcaption id='{ident}-caption'>{e(t.caption)}</figcaption>"
            f"<div class='table-wrap'><table class='results sortable' id='{ident}' data-table='{e(t.id)}' "
            f"aria-labelledby='{ident}-caption'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody>"
            f"</table></div>{notes}</figure>")


def html_figure(f: Figure) -> str:
    e = html.escape
    mime = "image/svg+xml" if f.path.suffix == ".svg" else "image/png"
    data = base64.b64encode(f.path.read_bytes()).decode("ascii")
    return (f"<figure><img alt='{e(f.alt)}' src='data:{mime};base64,{data}'>"
            f"<figcaption>{e(f.caption)}</figcaption></figure>")


def to_html(blocks: list, title: str) -> str:
    e = html.escape
    used: set = set()
    toc, parts, n_tables = [], [], 0
    for b in blocks:
        if isinstance(b, Heading):
            level = min(max(b.level, 1), 4)
            slug = _slug(b.text, used)
            if level == 2:
                toc.append(f"<a href='#{slug}'>{e(b.text)}</a>")
            parts.append(f"<h{level} id='{slug}'>{e(b.text)}</h{level}>")
        elif isinstance(b, Para):
            cls = f" class='{b.kind}'" if b.kind else ""
            parts.append(f"<p{cls}>{e(b.text)}</p>")
        elif isinstance(b, Table):
            n_tables += 1
            parts.append(html_table(b, f"table-{n_tables}"))
        elif isinstance(b, Figure):
            parts.append(html_figure(b))
        elif isinstance(b, Defs):
            parts.append("<dl>" + "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in b.pairs) + "</dl>")
        elif isinstance(b, Code):
            pre = f"<pre><code>{e(b.text)}</code></pre>"
            parts.append(f"<details><summary>{e(b.summary)}</summary>{pre}</details>" if b.summary else pre)
    nav = f"<nav class='toc'>{''.join(toc)}</nav>" if len(toc) > 1 else ""
    if parts and parts[0].startswith("<h1"):
        parts.insert(1, nav)
    else:
        parts.insert(0, nav)
    return ("<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
            "<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>{e(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(parts)
            + f"\n<script>{JS}</script>\n</body></html>\n")
