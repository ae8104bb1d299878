"""The HTML report: self-contained, shows images side by side with verdicts and curves, renders in Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from fakebuild import ColorJudge, color_image, make_build
from PIL import Image

from synthaug.errors import UserError
from synthaug.evaluate.downstream import DownstreamResult, DownstreamRow
from synthaug.evaluate.judge import evaluate_judge
from synthaug.layout import EVAL_DIR
from synthaug.report import write_report


def _history(n: int) -> list[dict]:
    return [{"step": i, "loss": 2.0 / (1 + i), "accuracy": min(1.0, i / n), "target_prob": min(1.0, i / (n + 2))}
            for i in range(n)]


@pytest.fixture
def report_build(tmp_path):
    # sd images: right on seeds 0, 2, wrong (class + 4) on seeds 1, 3; dct right everywhere.
    samples = []
    for t in (2, 3, 4):
        samples += [{"method": "sd", "class_index": t, "index": s, "image": color_image(t if s % 2 == 0 else t + 4,
                                                                                          size=16, green=40 * s),
                     "guide_prob": 0.5} for s in range(4)]
        samples += [{"method": "dct", "class_index": t, "index": s, "image": color_image(t, size=16, green=40 * s),
                     "guide_prob": 0.9} for s in range(4)]
    build = make_build(tmp_path / "build", samples, histories={2: _history(12), 4: _history(1)})
    evaluate_judge(build, ColorJudge(), progress=False)
    rows = [DownstreamRow("real", 3, 3, 0.5, 0.01, 0.9, 0.01), DownstreamRow("dct", 3, 3, 0.6, 0.02, 0.95, 0.01)]
    result = DownstreamResult(str(build), "digits", "resnet10t", 100, rows, [])
    (build / EVAL_DIR / "downstream.json").write_text(json.dumps(result.to_dict()))
    return build


def test_report_content_is_self_contained(report_build):
    path = write_report(report_build, progress=False)
    assert path == report_build / "report" / "index.html"
    page = path.read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 24 and all(s.startswith("data:image/png;base64,") for s in srcs)  # 3 classes x 2 x 4
    # same seeds side by side, verdicts on every image, the judge's wrong label named
    assert page.count('<th title="seed 0">#0</th>') == 3
    assert "✗ " in page and "→ six" in page and "→ eight" in page and page.count("✓ ") == 18
    assert "guide 0.90" in page
    # the token's curve for class 2 (history in its token file), a sentence for class 4 (stopped at once), a note
    # for class 3 (no token file)
    assert page.count("<polyline") == 3 and "stop: patience" in page
    assert "stopped at the first step (patience): loss 2.000" in page
    assert "no training history recorded" in page
    # Table 1 and Table 2 from eval/
    assert "Table 1 - judge accuracy" in page and "Table 2 - downstream training" in page
    assert "sd -&gt; dct" in page and "60.0 ± 2.0" in page


def _chart_sizes(section: str) -> list[tuple[int, int]]:
    """The sizes of the charts (PNG data URIs) embedded in one section of the page."""
    import base64
    import io

    return [Image.open(io.BytesIO(base64.b64decode(uri))).size
            for uri in re.findall(r'<img class="chart" src="data:image/png;base64,([^"]+)"', section)]


def _section(page: str, anchor: str) -> str:
    start = page.index(f'<h2 id="{anchor}">')
    end = page.find("<h2", start + 1)
    return page[start:end if end > 0 else None]


def test_report_top_shows_the_build_at_a_glance(report_build):
    """Summary (per class, plain vs method, by judge and guide, worst first), the judge's confusion matrix,
    probability histograms and provenance come before the result tables and the classes; Table 2 stays."""
    page = write_report(report_build, progress=False).read_text()
    anchors = ["summary", "confusion", "probabilities", "provenance"]
    positions = [page.index(f'<h2 id="{a}">') for a in anchors]
    assert positions == sorted(positions) and positions[-1] < page.index("<h2>Results</h2>") < page.index(
        "<h2>Classes</h2>")
    summary = _section(page, "summary")
    assert len(_chart_sizes(summary)) == 2  # judge top-1 and guide probability per class
    # every class: sd is right on 2 of its 4 seeds (50%), dct on all; the guide said 0.5 and 0.9
    assert summary.count("<td>50%</td>") == 6 and summary.count("<td>100%</td>") == 3
    assert summary.count("<td>90%</td>") == 3
    confusion = _section(page, "confusion")
    assert len(_chart_sizes(confusion)) == 2 and "two → six (2)" in confusion  # sd's wrong seeds, by the judge
    assert len(_chart_sizes(_section(page, "probabilities"))) == 2  # guide_prob and judge_prob
    provenance = _section(page, "provenance")
    assert "synthaug build --config" in provenance and "<td>dataset</td><td>digits</td>" in provenance
    assert "pyarrow " in provenance and "Table 2 - downstream training" in page
    assert 'id="fitted-guide"' not in page and 'id="attempts"' not in page  # nothing of the kind in this build


def test_report_shows_a_fitted_guide_and_generations_per_kept_image(tmp_path):
    """``guide: fit``: the guide's leave-one-out accuracy per class; ``generate.keep_confidence``: seeds tried per
    kept image (a row's index is its seed index: kept 0, 2, 5 of class 2 is 6 tried for 3 kept)."""
    import yaml
    from fakebuild import make_build

    from synthaug.layout import GUIDE_RECORD_FILE, fitted_guide_dir

    samples = [{"method": "dct", "class_index": 2, "index": i, "image": color_image(2, size=16), "guide_prob": 0.8}
               for i in (0, 2, 5)]
    samples += [{"method": "dct", "class_index": 3, "index": i, "image": color_image(3, size=16)} for i in (0, 1)]
    build = make_build(tmp_path / "build", samples)
    config = yaml.safe_load((build / "config.yaml").read_text())
    (build / "config.yaml").write_text(yaml.safe_dump({**config, "guide": "fit", "generate": {"keep_confidence": 0.5}}))
    fitted_guide_dir(build).mkdir()
    (fitted_guide_dir(build) / GUIDE_RECORD_FILE).write_text(json.dumps({
        "backbone": "tiny-clip", "family": "clip", "head": "linear", "features": "pooled", "strength": 1.0,
        "shots": 2, "shots_seed": 7, "dataset": "digits", "split": "train", "loo_accuracy": 0.75,
        "loo_per_class": {"two": 1.0, "three": 0.5}, "train_accuracy": 1.0}))
    page = write_report(build, progress=False).read_text()
    fitted = _section(page, "fitted-guide")
    assert "leave-one-out accuracy 75.0%" in fitted and "2 shots per class (seed 7" in fitted
    assert fitted.index("<td>three</td><td>50%</td>") < fitted.index("<td>two</td><td>100%</td>")  # worst first
    attempts = _section(page, "attempts")
    assert "2.00 (3 kept of 6)" in attempts and "1.00 (2 kept of 2)" in attempts and "dct 1.60" in attempts
    assert attempts.index("2 two") < attempts.index("3 three")  # the most costly class first
    assert "<td>guide</td><td>fit</td>" in _section(page, "provenance")


def test_report_png_grids(report_build):
    write_report(report_build, progress=False)
    grids = report_build / "report" / "grids"
    assert sorted(p.name for p in grids.iterdir()) == ["c002.png", "c003.png", "c004.png", "overview.png"]
    grid = Image.open(grids / "c002.png").convert("RGB")
    assert grid.height > 2 * 96 and grid.width > 4 * 96  # 2 method rows x 4 seeds of 96 px tiles
    pixels = np.asarray(grid).reshape(-1, 3)
    assert ((pixels == (26, 127, 55)).all(1)).any() and ((pixels == (207, 34, 46)).all(1)).any()  # green + red
    # the layout (torchvision's make_grid): a 90 px label column, a 24 px title, tiles 96 px apart by 4 px of white
    assert grid.size == (90 + 4 * 100 + 4, 24 + 2 * 100 + 4)
    a = np.asarray(grid)
    assert (a[24 + 100 + 48, 90 + 3 * 100 + 48] == (40, 120, 0)).all()  # row 2 (dct), seed 3 of class 2
    assert (a[24 + 96: 24 + 100, 90:] == 255).all()  # the white gap between the two rows


def test_report_bad_input(report_build):
    with pytest.raises(UserError, match="`classes` \\[42\\] not in the build"):
        write_report(report_build, classes=[42])
    with pytest.raises(UserError, match="`methods` mcti not in the build"):
        write_report(report_build, methods=["mcti"])
    with pytest.raises(UserError, match="`per_class` must be > 0"):
        write_report(report_build, per_class=0)


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(report_build, tmp_path):
    path = write_report(report_build, progress=False)
    shot = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,4000", f"--screenshot={shot}",
           path.resolve().as_uri()]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)
    assert shot.is_file(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[0] >= 1000 and img.shape[1] >= 1200
    not_white = (img < 245).any(-1).mean()
    assert not_white > 0.02, f"screenshot is blank ({not_white:.1%} non-white pixels)"
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50
    # the verdict borders were painted: the embedded images and their captions rendered
    def near(colour):
        return int((np.abs(img.astype(int) - colour).sum(-1) < 30).sum())

    assert near((26, 127, 55)) > 100 and near((207, 34, 46)) > 100
    # the top's charts were painted too: the summary's and histograms' method colours (sd grey, dct blue) and the
    # confusion matrix's darkest shade (dct's diagonal)
    assert near((140, 149, 159)) > 500 and near((9, 105, 218)) > 500 and near((0, 85, 255)) > 200


def test_a_histogram_bin_too_small_for_a_pixel_still_draws():
    from synthaug.report_charts import histograms

    # one value of 2,000 in its own bin: a share far below one pixel of the plot (the README demo's guide_prob)
    values = [[0.99] * 1999 + [0.05], [0.5] * 10]
    img = histograms(values, ["dct", "sd"], "guide_prob", bins=20)
    assert img.size[0] > 0 and img.getbbox() is not None
