"""The report's build-at-a-glance sections, each an HTML fragment (`synthaug.report` puts them at the top).

- `summary_html`: per class, plain prompt against the build's method by the judge (top-1) and by the guide (mean
  probability of the class), the worst classes first (`report_charts.bar_chart`);
- `confusion_html`: the judge's confusion matrix on the generated images of each method, from
  ``eval/judge_images.parquet`` (`synthaug.evaluate.judge` writes each image's class and top-1 prediction there);
- `histograms_html`: ``guide_prob`` per method (the index), ``judge_prob`` per method (the judge's per-image file);
- `provenance_html`: the command that remakes the build, its dataset, preset, model, guide and seeds, the software;
- `fitted_guide_html`: a ``guide: fit`` build's guide (``guide/guide.json``: leave-one-out accuracy per class);
- `attempts_html`: ``generate.keep_confidence``: seeds tried per kept image, per class and method.

Every section is empty ("") when the build has nothing for it, so a report never shows an empty heading.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any

from . import report_charts
from .index import BuildView, method_sort_key
from .layout import EVAL_DIR, GUIDE_RECORD_FILE, JUDGE_IMAGES_FILE, fitted_guide_dir, resume_command

log = logging.getLogger(__name__)

SUMMARY_ROWS = 60  # classes the summary chart shows (the worst); the table below it lists every class
SOFTWARE = ("synthaug", "torch", "diffusers", "transformers", "timm", "webdataset", "pyarrow", "Pillow")


def _png(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _chart(img, alt: str) -> str:
    """A chart embedded at its own pixel size (capped to the page's width)."""
    return (f'<img class="chart" src="{_png(img)}" width="{img.width}" alt="{html.escape(alt)}" '
            'style="max-width:100%;height:auto">')


def _table(headers: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _judge_images(root: Path) -> list[dict]:
    path = root / EVAL_DIR / JUDGE_IMAGES_FILE
    if not path.is_file():
        return []
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=["method", "class_index", "class_name", "judge_pred", "judge_prob",
                                            "top1"]).to_pylist()
    except (OSError, ValueError, KeyError) as e:  # written by an older version: the sections without it
        log.warning("skipping %s in the report: %s", path, e)
        return []


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summary_html(view: BuildView, methods: list[str], judge: Any) -> str:
    """Per class, each method by the judge (top-1) and by the guide (mean ``guide_prob``), the worst first."""
    names = {int(c["index"]): c["name"] for c in view.classes}
    judged = {(c.class_index, c.method): c.top1 for c in judge.per_class} if judge is not None else {}
    guide: dict[tuple[int, str], list[float]] = defaultdict(list)
    for r in view.rows(methods):
        if r.get("guide_prob") is not None:
            guide[(int(r["class_index"]), r["method"])].append(float(r["guide_prob"]))
    guided = {k: _mean(v) for k, v in guide.items()}
    classes = sorted({c for c, _ in judged} | {c for c, _ in guided})
    if not classes:
        return ""
    own = [m for m in methods if m != "sd"] or methods  # the build's method: what "worst" is measured on

    def worst_key(c: int) -> tuple:
        score = [v for m in own for v in (judged.get((c, m)), guided.get((c, m))) if v is not None]
        return (min(score) if score else 1.0, c)

    order = sorted(classes, key=worst_key)
    parts = ["<h2 id=\"summary\">Summary</h2>",
             f'<p class="muted">{len(classes)} classes, the worst first (by {", ".join(own)}); '
             + ("judge top-1 and " if judged else "no judge yet; ") + "the guide's mean probability of the class."
             + (f" The charts show the worst {SUMMARY_ROWS}." if len(order) > SUMMARY_ROWS else "") + "</p>"]
    charts = []
    for what, values in (("judge top-1", judged), ("guide probability", guided)):
        if values:
            rows = [(f"{c}: {names.get(c, '?')}", [values.get((c, m)) for m in methods]) for c in order[:SUMMARY_ROWS]]
            charts.append(_chart(report_charts.bar_chart(rows, methods, f"{what} per class"), f"{what} per class"))
    parts.append('<div class="class">' + "".join(f"<div>{c}</div>" for c in charts) + "</div>")
    headers = ["class"] + [f"{m} judge" for m in methods if judged] + [f"{m} guide" for m in methods if guided]
    parts.append("<details><summary>every class</summary>" + _table(headers, [
        [f"{c} {names.get(c, '?')}"] + [_pct(judged.get((c, m))) for m in methods if judged]
        + [_pct(guided.get((c, m))) for m in methods if guided] for c in order]) + "</details>")
    return "\n".join(parts)


def confusion_html(view: BuildView, methods: list[str]) -> str:
    """The judge's confusion matrix on each method's images: rows the build's classes, columns its predictions."""
    scored = [r for r in _judge_images(view.root) if r["method"] in methods]
    if not scored:
        return ""
    parts = ['<h2 id="confusion">Judge confusion matrix</h2>',
             ('<p class="muted">Rows: the class each image was made for; columns: the judge\'s top-1 label; each row '
             "sums to 1 (darker: more images).</p>")]
    for m in sorted({r["method"] for r in scored}, key=method_sort_key):
        mine = [r for r in scored if r["method"] == m]
        rows = sorted({(int(r["class_index"]), r["class_name"]) for r in mine})
        names = [n for _, n in rows]
        cols = names + sorted({r["judge_pred"] for r in mine} - set(names))
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for r in mine:
            counts[(r["class_name"], r["judge_pred"])] += 1
        matrix = []
        for n in names:
            total = sum(counts[(n, p)] for p in cols) or 1
            matrix.append([counts[(n, p)] / total for p in cols])
        img = report_charts.heatmap(matrix, names, cols, f"{m}: judge top-1 on {len(mine)} images")
        parts.append(_chart(img, f"confusion matrix of the judge on {m} images"))
        off = sorted(((counts[(n, p)], n, p) for n in names for p in cols if p != n and counts[(n, p)]), reverse=True)
        if off:
            parts.append('<p class="muted">most confused: ' + html.escape(", ".join(
                f"{n} → {p} ({k})" for k, n, p in off[:8])) + "</p>")
    return "\n".join(parts)


def histograms_html(view: BuildView, methods: list[str]) -> str:
    """``guide_prob`` (the index) and ``judge_prob`` (the judge's per-image file) per method."""
    charts = []
    for what, rows in (("guide_prob", view.rows(methods)), ("judge_prob", _judge_images(view.root))):
        by_method = {m: [float(r[what]) for r in rows if r["method"] == m and r.get(what) is not None]
                     for m in methods}
        shown = [m for m in methods if by_method[m]]
        if shown:
            img = report_charts.histograms([by_method[m] for m in shown], shown,
                                           f"{what}: the {'guide' if what == 'guide_prob' else 'judge'}'s "
                                           "probability of the image's class")
            charts.append(_chart(img, f"histogram of {what} per method"))
    if not charts:
        return ""
    return ('<h2 id="probabilities">Probabilities</h2><p class="muted">Share of each method\'s images per bin.</p>'
            '<div class="class">' + "".join(f"<div>{c}</div>" for c in charts) + "</div>")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def provenance_html(view: BuildView) -> str:
    """What made the build: the command that remakes it, its settings and seeds, and the software of this report."""
    cfg = view.config
    if not cfg:
        return ""
    section = lambda name: cfg.get(name) if isinstance(cfg.get(name), dict) else {}
    rows = [["command", resume_command(view.root)]]
    for key in ("dataset", "preset", "method", "model", "guide", "classes", "per_class", "baseline", "shots",
                "shots_seed"):
        if cfg.get(key) not in (None, ""):
            rows.append([key, str(cfg[key])])
    seeds = {f"{name}.seed": section(name).get("seed") for name in ("dct", "mcti", "generate")}
    rows.append(["seeds", ", ".join(f"{k} {v}" for k, v in seeds.items() if v is not None) or "-"])
    seconds = [float(c["seconds"]) for c in view.classes if isinstance(c.get("seconds"), (int, float))]
    if seconds:
        rows.append(["wall time", f"{sum(seconds):.0f}s over {len(seconds)} classes"])
    rows.append(["software (this report)", ", ".join(f"{p} {_version(p)}" for p in SOFTWARE)])
    return '<h2 id="provenance">Provenance</h2>' + _table(["what", "value"], rows)


def fitted_guide_html(view: BuildView) -> str:
    """A ``guide: fit`` build's few-shot guide: how it was fitted and its leave-one-out accuracy per class."""
    path = fitted_guide_dir(view.root) / GUIDE_RECORD_FILE
    if not path.is_file():
        return ""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("skipping %s in the report: %s", path, e)
        return ""
    loo = record.get("loo_accuracy")
    facts = [f"backbone {record.get('backbone')} ({record.get('family')})", f"head {record.get('head')}",
             f"features {record.get('features')}", (f"{record.get('shots')} shots per class (seed "
             f"{record.get('shots_seed')}, {record.get('dataset')} {record.get('split')})"),
             "leave-one-out accuracy " + ("- (one shot per class)" if loo is None else f"{100 * loo:.1f}%")]
    if record.get("train_accuracy") is not None:
        facts.append(f"on its own shots {100 * record['train_accuracy']:.1f}%")
    per_class = record.get("loo_per_class") or {}
    table = _table(["class", "leave-one-out accuracy"], [[n, _pct(v)] for n, v in
                                                         sorted(per_class.items(), key=lambda kv: (kv[1], kv[0]))])
    return ('<h2 id="fitted-guide">Fitted guide</h2><p class="muted">' + html.escape("; ".join(facts)) + "</p>"
            + (f"<details><summary>per class, the worst first</summary>{table}</details>" if per_class else ""))


def attempts_html(view: BuildView, methods: list[str]) -> str:
    """``generate.keep_confidence``: seeds tried per kept image (a row's ``index`` is its seed index, so a class
    and method tried max(index) + 1 seeds for the images it kept)."""
    generate = view.config.get("generate") if isinstance(view.config.get("generate"), dict) else {}
    if not generate.get("keep_confidence"):
        return ""
    per: dict[tuple[int, str], list[int]] = defaultdict(list)
    for r in view.rows(methods):
        per[(int(r["class_index"]), r["method"])].append(int(r["index"]))
    names = {int(c["index"]): c["name"] for c in view.classes}
    shown = [m for m in methods if any(k[1] == m for k in per)]
    ratio = {k: (max(v) + 1) / len(v) for k, v in per.items()}
    order = sorted({c for c, _ in per}, key=lambda c: (-max(ratio.get((c, m), 0.0) for m in shown), c))
    rows = [[f"{c} {names.get(c, '?')}"] + [
        f"{ratio[(c, m)]:.2f} ({len(per[(c, m)])} kept of {max(per[(c, m)]) + 1})" if (c, m) in per else "-"
        for m in shown] for c in order]
    totals = []
    for m in shown:
        tried, kept = (sum(f(v) for k, v in per.items() if k[1] == m) for f in (lambda v: max(v) + 1, len))
        totals.append(f"{m} {tried / kept:.2f}")
    return (f'<h2 id="attempts">Generations per kept image</h2><p class="muted">generate.keep_confidence '
            f'{html.escape(str(generate["keep_confidence"]))}: seeds tried per image kept, overall '
            f'{html.escape(", ".join(totals))}; the most costly classes first.</p>'
            + _table(["class"] + shown, rows))
