"""The HTML report of a real finished tiny run: its numbers, every image inline and decodable,
unknown post steps shown, text escaped; opened in headless Chromium; bad run directories."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import pytest
from PIL import Image

from conftest import cli, copy_run
from raytune_ft.post import run_steps
from raytune_ft.post.finished import FinishedRun
from raytune_ft.report.html import number

CHROMIUM = shutil.which("chromium")
IMAGES = re.compile(r"<img src='([^']*)'")


@pytest.fixture(scope="module")
def reported_run(finished_text_run, tmp_path_factory):
    """A copy of the finished tiny run with two explained rows, a step this report does not know,
    and its report written by the real CLI."""
    run_dir = copy_run(finished_text_run, tmp_path_factory.mktemp("reported"))
    run_steps(FinishedRun.open(run_dir, ["post.explain.rows=[0,1]"]), ["explain"])
    (run_dir / "post" / "future_step.json").write_text(json.dumps({
        "size_mb": {"before": 17.5, "after": 4.25}, "note": "<b>not markup</b>",
        "rows": [{"sparsity": 0.5, "accuracy": 0.91}, {"sparsity": 0.8, "accuracy": 0.62}]}))
    result = cli("report", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"report: {run_dir / 'report.html'}"
    return run_dir


def test_report_holds_the_summary_numbers_and_only_inline_images(reported_run):
    page = (reported_run / "report.html").read_text()
    summary = json.loads((reported_run / "summary.json").read_text())
    for key in ("accuracy", "macro_f1", "loss"):
        assert f"<td class='num'>{summary['test'][key]:.4f}</td>" in page
    assert f"<td class='num'>{number(summary['train_samples_per_s'])}</td>" in page and f"<td class='num'>{number(summary['wall_time_s'])}</td>" in page

    sources = IMAGES.findall(page)
    explained = json.loads((reported_run / "post" / "explain.json").read_text())
    pngs = len(list((reported_run / "plots").glob("*.png"))) + sum(1 + ("attention_png" in e) for e in explained["examples"])
    assert len(sources) == page.count("<img") == pngs == 2 + 2 * 2
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(source.removeprefix("data:image/png;base64,")))) as image:
            image.verify()
    assert not re.search(r"<(script|link|iframe)\b|src=['\"](?!data:)", page)  # self-contained, no script

    # A step the report does not know: a key/value table and a table of its rows; text escaped.
    assert "Post-training: future_step" in page and "<td>size_mb.after</td><td class='num'>4.2500</td>" in page
    assert "<th>sparsity</th><th>accuracy</th>" in page and "<td class='num'>0.6200</td>" in page
    assert "&lt;b&gt;not markup&lt;/b&gt;" in page and "<b>not markup</b>" not in page
    assert "name: tiny" in page  # the recipe


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make install installs it)")
def test_report_renders_in_headless_chromium(reported_run, tmp_path):
    """Every image decodes in a real browser (a test-only copy of the page adds a script that
    writes each image's natural size into the DOM), and the screenshot is not blank."""
    page = (reported_run / "report.html").read_text()
    probe = ("<script>addEventListener('load', () => { const out = document.createElement('pre'); out.id = 'decoded';"
             " out.textContent = [...document.images].map(i => i.naturalWidth + 'x' + i.naturalHeight).join(' ');"
             " document.body.append(out); });</script></body>")
    wrapper = tmp_path / "probe.html"
    wrapper.write_text(page.replace("</body>", probe))
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]

    dom = subprocess.run([*browser, "--virtual-time-budget=10000", "--dump-dom", wrapper.as_uri()],
                         capture_output=True, text=True, timeout=180).stdout
    sizes = re.search(r"<pre id=\"decoded\">([^<]*)</pre>", dom).group(1).split()
    assert len(sizes) == page.count("<img") == 6
    assert all(int(width) >= 100 and int(height) >= 50 for width, height in (size.split("x") for size in sizes)), sizes

    shot = tmp_path / "report.png"
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1200,3000", (reported_run / "report.html").as_uri()],
                   capture_output=True, timeout=180)
    with Image.open(shot) as image:
        grey = image.convert("L")
        assert image.size == (1200, 3000)
        drawn = sum(grey.histogram()[:250])  # pixels not the white page: text, tables, plots
        assert drawn > 0.03 * 1200 * 3000, drawn
        assert len(image.convert("RGB").getcolors(1 << 20)) > 1000  # the colour plots, not text alone


def test_report_on_a_missing_or_unfinished_run_is_a_one_line_error(cli_in_process, tmp_path):
    code, err = cli_in_process("report", str(tmp_path / "nowhere"))
    assert code == 2 and err.strip() == f"error: {tmp_path / 'nowhere'}: not a directory; give the run directory (output.dir) of a finished run"

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_text("name: x\n")
    code, err = cli_in_process("report", str(unfinished))
    assert code == 2 and err.strip() == f"error: {unfinished / 'summary.json'}: missing; is this the directory of a finished run?"
    assert not (unfinished / "report.html").exists()
