"""The HTML report in a real headless Chromium: it renders (screenshot, print), the DOM holds the results
tables and figures, hostile strings stay text, the console shows no errors and nothing is fetched."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from bench.reporting import save_qualitative
from browser import INSTALL_HINT, check_page, find_chromium
from test_report import HOSTILE_CLASSES, hostile_report, make_cfg, make_frame, make_prov, two_runs

pytestmark = pytest.mark.skipif(find_chromium() is None, reason=f"no Chromium on this machine; {INSTALL_HINT}")

PROBE = """(() => {
  const t = document.querySelector('table.results');
  const col = r => Array.from(t.tBodies[0].rows).map(row => row.cells[1].textContent);
  const before = col();
  t.querySelector('th[data-col="1"]').click();
  const ascending = col();
  t.querySelector('th[data-col="1"]').click();
  const descending = col();
  const imgs = Array.from(document.images);
  return {tables: document.querySelectorAll('table.results').length,
          header: Array.from(t.tHead.rows[0].cells).map(c => c.textContent),
          rows: t.tBodies[0].rows.length, before, ascending, descending,
          images: imgs.length, loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
          figures: document.querySelectorAll('figure img').length,
          hostile: document.body.innerText.includes(%r),
          pwned: window.__pwned === undefined ? null : window.__pwned,
          scripts: document.scripts.length, width: document.documentElement.scrollWidth};
})()"""


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


class Sample:
    image_id = "img-0"
    image = np.full((32, 32, 3), 128, np.uint8)
    label = np.zeros((32, 32), np.uint8)
    label[4:20, 4:20] = 1


class Pred:
    scores = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 8, 8)
    labels = Sample.label.astype(np.int64)


def test_single_report_in_chromium(tmp_path):
    html = hostile_report(tmp_path / "run")
    save_qualitative(tmp_path / "run" / "qualitative", Sample(), HOSTILE_CLASSES, ["t0000", "t0001", "t0002"],
                     [Pred(), Pred(), Pred()], [1], seed=0)
    html = hostile_report(tmp_path / "run")  # again, now with the qualitative figure
    check = check_page(html, PROBE % HOSTILE_CLASSES[1], pdf=True)
    assert check.errors == [], check.errors
    assert check.external_requests == [], check.external_requests
    assert all(u.startswith(("file:", "data:")) for u in check.requests)
    v = check.value
    assert v["tables"] == 3  # main, per-class, all metrics
    assert v["header"][:2] == ["lambda", "mIoU (ours)"] and v["rows"] == 3
    assert v["before"] == ["70.0", "72.5", "71.0"]
    assert v["ascending"] == ["70.0", "71.0", "72.5"] and v["descending"] == ["72.5", "71.0", "70.0"]
    assert v["figures"] == v["images"] == v["loaded"] == 3  # lambda plot, class bars, qualitative
    assert v["hostile"] is True and v["pwned"] is None and v["scripts"] == 1
    assert v["width"] <= 1280  # no horizontal page scroll on a laptop
    width, height = png_size(check.screenshot)
    assert width == 1280 and height > 1500
    (tmp_path / "screenshot.png").write_bytes(check.screenshot)
    assert check.pdf[:5] == b"%PDF-" and len(check.pdf) > 10_000


def test_combined_report_in_chromium(tmp_path):
    from bench.reporting.cli import main

    a, b = two_runs(tmp_path)
    assert main([str(a), str(b), "--out", str(tmp_path / "combined")]) == 0
    check = check_page(tmp_path / "combined" / "report.html", PROBE % "run-b")
    assert check.errors == [] and check.external_requests == []
    v = check.value
    assert v["header"][0] == "method (setting)" and v["header"][1] == "embedded (128 px)"
    assert v["rows"] == 3 and v["loaded"] == v["images"] >= 5 and v["hostile"] is True


LAYOUT = """(() => {
  const page = document.documentElement.clientWidth;
  const clipped = [];
  document.querySelectorAll('caption, figcaption, p, h1, h2, h3, dt, dd').forEach(el => {
    const r = el.getBoundingClientRect();
    if (r.right > page + 1 || el.scrollWidth > el.clientWidth + 1) clipped.push(el.textContent.slice(0, 60));
  });
  const details = Array.from(document.querySelectorAll('figure.table')).find(
      f => f.querySelector('figcaption').textContent.startsWith('All metrics'));
  return {clipped, page, scroll: document.documentElement.scrollWidth,
          wraps: Array.from(document.querySelectorAll('.table-wrap')).map(w => w.scrollWidth - w.clientWidth),
          detailsHeader: Array.from(details.querySelectorAll('th')).map(th => th.textContent.replace(/\\s+\\S$/, '')),
          detailsCaption: details.querySelector('figcaption').textContent,
          labelled: Array.from(document.querySelectorAll('table.results')).every(
              t => document.getElementById(t.getAttribute('aria-labelledby')) !== null),
          figcaptions: Array.from(document.querySelectorAll('figure > figcaption')).map(c => c.textContent)};
})()"""


def test_nothing_is_clipped_and_shared_settings_go_to_the_caption(tmp_path):
    """Captions wrap at the page's width (outside the tables' scrolling wrappers); the forward setting every
    configuration shares (a long prompt) is said once in the All-metrics caption, so that table needs no
    horizontal scroll; a categorical axis (methods) is drawn as points, not a line."""
    from bench.reporting import write_report

    cfg = make_cfg(sweep={"method": {"grid": ["daam", "attn2mask", "ovam", "whole_image_baseline_long_name"]}},
                   paper=False)
    cfg["description"] = "A description long enough to wrap several times. " * 8
    long_prompt = "A photograph of {classes} and other objects and background, " + ", ".join(["ground"] * 30)
    frame = make_frame({m: [50.0 + k] for k, m in enumerate(cfg["sweep"]["method"]["grid"])}, prompt=long_prompt)
    frame = frame.rename(columns={"lambda": "method"})
    out = tmp_path / "run"
    out.mkdir()
    write_report(out, cfg, frame, make_prov(cfg))
    check = check_page(out / "report.html", LAYOUT)
    assert check.errors == [], check.errors
    v = check.value
    assert v["clipped"] == [] and v["scroll"] <= v["page"]
    assert all(extra <= 1 for extra in v["wraps"]), v["wraps"]  # no table scrolls sideways
    assert v["labelled"]
    assert "forward setting" not in " ".join(v["detailsHeader"]).lower()
    assert "Forward setting of every configuration: seed=0; template=A photograph of" in v["detailsCaption"]
    assert any("no line joins them" in c for c in v["figcaptions"])
