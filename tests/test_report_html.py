"""`mnist-jobs report --format html`: one self-contained page (the table and the plot as an embedded
PNG), opened in a real headless Chromium (Debian's `chromium`; .ci/chromium.sh installs it where it is
missing and apt-get and root are there; CI fails without it, elsewhere the browser tests skip)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mnist_jobs import report as rep
from mnist_jobs.cli import app
from mnist_jobs.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner(env={"COLUMNS": "200"})
MPL_BLUE = (31, 119, 180)  # matplotlib's first line colour (C0): the plot's pixels
BEST_GREEN = (10, 122, 47)  # the best row's text (report.HTML_STYLE)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """lr-study: 2 lrs x 2 seeds of real 30-iteration runs, plus a failed run (hand-made from one)."""
    from mnist_jobs.train import train

    root = tmp_path_factory.mktemp("results") / "lr-study"
    for lr in (0.01, 0.1):
        for seed in (0, 1):
            cfg = TrainConfig(iters=30, eval_every=10, device="cpu", lr=lr, seed=seed)
            train(
                cfg, results_dir=root, run_id=f"lr{lr:g}-s{seed}", progress=lambda p: None, tensorboard=False
            )
    failed = json.loads((root / "lr0.1-s0.json").read_text())
    failed.update(run_id="lr0.5-s0", status="failed", error={"type": "RuntimeError", "message": "boom <b>"})
    failed["config"]["lr"] = 0.5
    (root / "lr0.5-s0.json").write_text(json.dumps(failed))
    return root


@pytest.fixture(scope="module")
def chromium() -> str:
    p = subprocess.run(
        ["bash", str(REPO / ".ci" / "chromium.sh")], capture_output=True, text=True, timeout=1200
    )
    if p.returncode != 0 or not p.stdout.strip():
        msg = f"no headless chromium: {p.stderr.strip()[-2000:]}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return p.stdout.strip().splitlines()[-1]


def browse(chromium: str, page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",  # (root in a container)
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *args,
        page.as_uri(),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


class Rows(HTMLParser):
    """The rows of <table id="report">: (class, [cell texts]) for the body, the header's texts."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, list[str]]] = []
        self.header: list[str] = []
        self.images: list[str] = []
        self._in_table = self._in_body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "report":
            self._in_table = True
        elif tag == "tbody" and self._in_table:
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append((a.get("class") or "", []))
        elif tag in ("td", "th") and self._in_table:
            self._cell = []
        elif tag == "img":
            self.images.append(a.get("src") or "")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            text = "".join(self._cell).strip()
            (self.rows[-1][1] if self._in_body else self.header).append(text)
            self._cell = None
        elif tag == "table":
            self._in_table = self._in_body = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(html_text: str) -> Rows:
    r = Rows()
    r.feed(html_text)
    return r


def pixels_near(png: bytes, rgb: tuple[int, int, int], tol: int = 12) -> int:
    from matplotlib.image import imread

    img = imread(io.BytesIO(png), format="png")[..., :3] * 255
    return int((abs(img - rgb).max(axis=-1) <= tol).sum())


def test_html_page_in_a_real_browser_has_the_table_rows_and_the_plot(sweep, tmp_path, chromium):
    pytest.importorskip("matplotlib")
    r = runner.invoke(app, ["report", str(sweep), "--format", "html", "--all"])
    assert r.exit_code == 0, r.output
    page = tmp_path / "lr-study.html"
    page.write_text(r.stdout)

    # self-contained: nothing loaded from anywhere; the plot is a PNG inside the page
    # ("http" is looked for outside the data: URI, whose base64 may spell it by chance: "ohttple")
    outside = re.sub(r'"data:[^"]*"', '""', r.stdout)
    assert not re.search(r"<(script|link|iframe)\b", r.stdout) and "http" not in outside.lower()
    [src] = parse(r.stdout).images
    assert src.startswith("data:image/png;base64,")
    png = base64.b64decode(src.split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and pixels_near(png, MPL_BLUE) > 200

    # the DOM as Chromium parsed it: every row of the report, the best one marked, the failed one last
    dom = parse(browse(chromium, page, tmp_path / "profile", "--dump-dom").stdout)
    assert dom.header == ["lr", "test acc %", "test loss", "train s", "n", "status", "runs"]
    assert [cells[0] for _, cells in dom.rows] == ["0.01", "0.1", "0.5"]
    assert [cls.split()[0] for cls, _ in dom.rows] == ["done", "best", "other"]
    assert [cells[-1] for _, cells in dom.rows] == ["lr0.01-s0, lr0.01-s1", "lr0.1-s0, lr0.1-s1", "lr0.5-s0"]
    table = rep.make_report(sweep, include_all=True)
    for (_, cells), row in zip(dom.rows, table.all_rows):
        assert cells[:-1] == rep.table_cells(row, table.columns, rep.extra_columns(table))
    assert dom.rows[2][1][5] == "failed: RuntimeError: boom <b>"  # escaped on the page, text in the DOM
    assert len(dom.images) == 1 and dom.images[0] == src

    # the screenshot: the browser drew the best row in green and the embedded plot's lines
    shot = tmp_path / "lr-study.png"
    browse(chromium, page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,1300")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert pixels_near(data, BEST_GREEN, tol=30) > 50
    assert pixels_near(data, MPL_BLUE, tol=20) > 200


def test_html_without_matplotlib_has_the_table_and_says_why_no_plot(sweep, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = runner.invoke(app, ["report", str(sweep), "--format", "html"])
    assert r.exit_code == 0, r.output
    page = parse(r.stdout)
    assert [cells[0] for _, cells in page.rows] == ["0.01", "0.1"] and not page.images
    assert (
        "No plot: --plot needs matplotlib" in r.stdout
        and "pip install &#x27;mnist-jobs[plot]&#x27;" in r.stdout
    )


def test_html_escapes_what_the_results_say(tmp_path, sweep):
    folder = tmp_path / "odd"
    folder.mkdir()
    data = json.loads((sweep / "lr0.1-s0.json").read_text())
    data["run_id"] = "<img src=x onerror=alert(1)>"
    (folder / "odd.json").write_text(json.dumps(data))
    text = rep.to_html(rep.make_report(folder), plots=False)
    assert "<img" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert parse(text).rows[0][1][-1] == "<img src=x onerror=alert(1)>"


def test_html_of_an_empty_folder_is_a_page_with_no_rows(tmp_path):
    pytest.importorskip("matplotlib")
    r = runner.invoke(app, ["report", str(tmp_path), "--format", "html"])
    assert r.exit_code == 0, r.output
    page = parse(r.stdout)
    assert page.rows == [] and "No plot: nothing to plot" in r.stdout and "0 completed" in r.stdout
