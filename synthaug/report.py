"""Report: a build and its evaluations as one self-contained HTML page, plus PNG grids for papers and issues.

Consumes a build directory (ARCHITECTURE.md, "The build folder") and whatever `synthaug.evaluate` wrote under ``eval/`` and produces
``report/index.html`` (images embedded as data URIs, inline CSS and SVG, no scripts, no network) and
``report/grids/*.png``:

- at the top, the build at a glance (`synthaug.report_sections`, charts drawn by `synthaug.report_charts`): per-class
  judge and guide scores of plain prompt against method (worst first), the judge's confusion matrix, guide / judge
  probability histograms, provenance, a fitted guide's leave-one-out accuracy, generations per kept image;
- the result tables (Table 1 judge accuracy, Table 2 downstream training, Table 3 FID/KID) when present;
- per class: the plain-prompt and token images of the same seeds side by side, each with the judge's verdict (and
  the guide's probability), and the token's training curve (loss, batch accuracy, class probability per step, the
  kept step and the stop reason).

The grids are laid out by `torchvision.utils.make_grid`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import shlex
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import TMP_PREFIX, atomic_write, write_text
from .errors import UserError, write_errors
from .evaluate.images import ImageReader
from .evaluate.tables import load_result, result_tables
from .index import BuildView, method_sort_key, open_build
from .layout import EVAL_DIR, JUDGE_IMAGES_FILE, REPORT_DIR, token_path
from .report_sections import (
    attempts_html,
    confusion_html,
    fitted_guide_html,
    histograms_html,
    provenance_html,
    summary_html,
)
from .tokens.io import token_metadata, token_updates
from .tokens.trust import TrustVerdict

if TYPE_CHECKING:
    from PIL import Image


log = logging.getLogger(__name__)

OK, BAD, NEUTRAL = "#1a7f37", "#cf222e", "#6e7781"  # verdict colours (GitHub's green/red/grey)
SMALL = 64  # images up to this size are shown upscaled with hard pixels (digits), never blurred


@dataclass
class _Verdict:
    """What the judge (and the guide) said about one image."""

    judge_prob: float | None
    judge_pred: str | None
    correct: bool | None  # judge top-1 == the image's class; None when no judge has scored it
    guide_prob: float | None


@dataclass
class _Cell:
    key: str
    method: str
    seed: int
    index: int  # the sample's index within its class
    image: Image.Image
    verdict: _Verdict


# --------------------------------------------------------------------------------------------------------------------
# Gathering what the report shows
# --------------------------------------------------------------------------------------------------------------------
def _load_results(root: Path) -> dict[str, Any]:
    """Every evaluation result present under ``eval/``, by kind."""
    found = {}
    paths = [(root / EVAL_DIR / "judge.json", "judge"), (root / EVAL_DIR / "downstream.json", "downstream")]
    paths += [(p, p.stem) for p in sorted((root / EVAL_DIR).glob("fid*.json"))]
    for path, kind in paths:
        if path.is_file():
            try:
                found[kind] = load_result(path)
            except (UserError, TypeError, ValueError, KeyError) as e:  # a result from an older version: skip it
                log.warning("skipping %s in the report: %s", path, e)
    return found


def _judge_verdicts(root: Path) -> dict[str, tuple[str, bool]]:
    """key -> (judge's predicted label, top-1 correct), from the last `evaluate_judge`."""
    path = root / EVAL_DIR / JUDGE_IMAGES_FILE
    if not path.is_file():
        return {}
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["key", "judge_pred", "top1"]).to_pydict()
    return {k: (p, bool(c)) for k, p, c in zip(t["key"], t["judge_pred"], t["top1"])}


def _token_info(root: Path, class_row: dict) -> dict[str, Any]:
    """Training history and stop reason of a class's token (from its token file's metadata, else classes.json)."""
    info: dict[str, Any] = {"history": [], "stop_reason": class_row.get("stop_reason"), "steps": class_row.get("steps"),
                            "updates": class_row.get("updates"),
                            "best_step": class_row.get("best_step"), "token": class_row.get("token")}
    path = token_path(root, int(class_row["index"]))
    if path.is_file():

        meta = token_metadata(path)
        try:
            info["history"] = json.loads(meta.get("history", "[]"))
        except json.JSONDecodeError:
            log.warning("token file %s has an unreadable history", path)
        for key in ("stop_reason", "steps", "best_step", "token"):
            if meta.get(key) not in (None, ""):
                info[key] = meta[key]
        info["updates"] = token_updates(meta)
    return info


def _select_cells(view: BuildView, rows: list[dict], methods: list[str], per_class: int,
                  verdicts: dict[str, tuple[str, bool]], read: ImageReader) -> tuple[list[int], dict]:
    """The seeds shown for one class (shared by every method where possible, lowest sample index first)."""
    by_method: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        by_method[r["method"]].setdefault(int(r["seed"]), r)
    ordered = sorted(rows, key=lambda r: (int(r["index"]), method_sort_key(r["method"])))
    present = [m for m in methods if by_method.get(m)]
    shared = [int(r["seed"]) for r in ordered if all(int(r["seed"]) in by_method[m] for m in present)]
    seeds = list(dict.fromkeys(shared or [int(r["seed"]) for r in ordered]))[:per_class]
    cells: dict[tuple[str, int], _Cell] = {}
    for m in present:
        for s in seeds:
            r = by_method[m].get(s)
            if r is None:
                continue
            pred, correct = verdicts.get(r["key"], (None, None))
            verdict = _Verdict(r.get("judge_prob"), pred, correct, r.get("guide_prob"))
            cells[(m, s)] = _Cell(r["key"], m, s, int(r["index"]), read(r), verdict)
    return seeds, cells


# --------------------------------------------------------------------------------------------------------------------
# Rendering pieces
# --------------------------------------------------------------------------------------------------------------------
def _thumbnail(img: Image.Image, thumb: int) -> tuple[str, int]:
    """(data URI, display width): small images keep their exact pixels (shown upscaled), large ones shrink to JPEG."""
    buf = io.BytesIO()
    if max(img.size) <= SMALL:
        img.save(buf, format="PNG")
        mime, width = "image/png", max(96, img.width * max(1, 96 // img.width))
    else:
        img = img.copy()
        img.thumbnail((thumb, thumb))
        img.convert("RGB").save(buf, format="JPEG", quality=85)
        mime, width = "image/jpeg", img.width
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}", width


def _verdict_text(v: _Verdict) -> tuple[str, str]:
    """(caption, colour) of one image."""
    parts = []
    colour = NEUTRAL
    if v.correct is not None:
        colour = OK if v.correct else BAD
        mark = "✓" if v.correct else "✗"
        parts.append(f"{mark} {v.judge_prob:.2f}" if v.judge_prob is not None else mark)
        if not v.correct and v.judge_pred:
            parts.append(f"→ {v.judge_pred}")
    elif v.judge_prob is not None:
        parts.append(f"judge {v.judge_prob:.2f}")
    if v.guide_prob is not None:
        parts.append(f"guide {v.guide_prob:.2f}")
    return " ".join(parts) or "not judged", colour


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _step_number(v: Any) -> int | None:
    """A step number from a token file's metadata (a string), or None where it holds none (absent, or not a number:
    a token file is read, never trusted)."""
    try:
        return int(str(v).strip())
    except (TypeError, ValueError):
        return None


def svg_curve(history: list[dict], best_step: Any, stop_reason: str | None, width: int = 380,
              height: int = 150) -> str:
    """Inline SVG of a token's training: loss (left scale), batch accuracy and class probability (0-1, right)."""
    if not history:
        return '<p class="muted">no training history recorded for this token</p>'
    if len(history) == 1:  # stopped at the first measurement: a curve of one point says less than a sentence
        e = history[0]
        acc = f", batch accuracy {100 * e['accuracy']:.0f}%" if _finite(e.get("accuracy")) else ""
        loss = f"loss {e['loss']:.3f}" if _finite(e.get("loss")) else "loss ?"
        return (f'<p class="muted">stopped at the first step ({html.escape(str(stop_reason or "?"))}): '
                f"{loss}{acc}; the initial token was kept</p>")
    pad_l, pad_r, pad_t, pad_b = 44, 34, 18, 26
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    steps = [int(e.get("step", i)) for i, e in enumerate(history)]
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)
    losses = [e.get("loss") for e in history]
    finite = [v for v in losses if _finite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5

    def x(step):
        return pad_l + w * (step - s0) / (s1 - s0)

    def y_unit(v):
        return pad_t + h * (1 - v)

    def y_loss(v):
        return pad_t + h * (1 - (v - lo) / (hi - lo))

    def line(values, ymap, colour, dash=""):
        pts = [f"{x(s):.1f},{ymap(v):.1f}" for s, v in zip(steps, values)
               if _finite(v)]
        if not pts:
            return ""
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        return (f'<polyline fill="none" stroke="{colour}" stroke-width="1.6"{dash_attr} '
                f'points="{" ".join(pts)}"/>')

    parts = [(f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
              'aria-label="token training curve">'),
             f'<rect x="{pad_l}" y="{pad_t}" width="{w}" height="{h}" fill="#fafbfc" stroke="#d0d7de"/>']
    for frac in (0.25, 0.5, 0.75):
        parts.append(f'<line x1="{pad_l}" x2="{pad_l + w}" y1="{y_unit(frac):.1f}" y2="{y_unit(frac):.1f}" '
                     'stroke="#eaeef2"/>')
    kept = _step_number(best_step)
    if kept is not None:
        bx = x(kept)
        parts.append(f'<line x1="{bx:.1f}" x2="{bx:.1f}" y1="{pad_t}" y2="{pad_t + h}" stroke="#8250df" '
                     'stroke-dasharray="3,2"/>')
        parts.append(f'<text x="{bx + 3:.1f}" y="{pad_t + 10}" fill="#8250df" font-size="9">kept</text>')
    parts.append(line(losses, y_loss, "#0969da"))
    parts.append(line([e.get("accuracy") for e in history], y_unit, "#bf8700", "4,2"))
    parts.append(line([e.get("target_prob") for e in history], y_unit, "#1a7f37", "1,2"))
    text = 'font-size="9" fill="#57606a"'
    parts += [
        f'<text x="{pad_l - 4}" y="{pad_t + 4}" text-anchor="end" {text}>{hi:.2f}</text>',
        f'<text x="{pad_l - 4}" y="{pad_t + h}" text-anchor="end" {text}>{lo:.2f}</text>',
        f'<text x="{pad_l + w + 4}" y="{pad_t + 4}" {text}>1</text>',
        f'<text x="{pad_l + w + 4}" y="{pad_t + h}" {text}>0</text>',
        f'<text x="{pad_l}" y="{height - 8}" {text}>step {s0}</text>',
        f'<text x="{pad_l + w}" y="{height - 8}" text-anchor="end" {text}>{s1}</text>',
        f'<text x="{pad_l}" y="11" font-size="10" fill="#0969da">loss</text>',
        f'<text x="{pad_l + 34}" y="11" font-size="10" fill="#bf8700">batch accuracy</text>',
        f'<text x="{pad_l + 122}" y="11" font-size="10" fill="#1a7f37">p(class)</text>',
        (f'<text x="{pad_l + w}" y="11" text-anchor="end" font-size="10" fill="#57606a">'
         f'stop: {html.escape(str(stop_reason or "?"))}</text>'),
        "</svg>",
    ]
    return "".join(p for p in parts if p)


def _html_table(title: str, headers: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<figure class="table"><figcaption>{esc(title)}</figcaption><table><thead><tr>{head}</tr></thead>' \
           f"<tbody>{body}</tbody></table></figure>"


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px;color:#1f2328;
background:#fff;max-width:1400px}
h1{font-size:22px;margin:0 0 6px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d0d7de}
h3{font-size:15px;margin:18px 0 4px}.muted{color:#6e7781;font-size:12px}
.warn{background:#ffebe9;border:1px solid #cf222e;color:#82071e;padding:8px 12px;border-radius:6px;font-weight:600}
figure.table{margin:10px 0}figure.table figcaption{font-size:12px;color:#57606a;margin-bottom:4px}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}thead{background:#f6f8fa}
.class{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
table.grid td,table.grid th{border:none;padding:2px;text-align:center;vertical-align:top}
table.grid th{font-size:11px;color:#57606a;font-weight:normal}
.img{display:inline-block;border:3px solid;border-radius:3px;line-height:0}
.img img{image-rendering:pixelated}
.cap{font-size:10px;line-height:1.25;max-width:120px;margin-top:2px}
nav a{margin-right:8px;font-size:12px}
"""


# --------------------------------------------------------------------------------------------------------------------
# PNG grids
# --------------------------------------------------------------------------------------------------------------------
def _tile(img: Image.Image, size: int, colour: str | None) -> Image.Image:
    from PIL import Image, ImageOps

    resample = Image.NEAREST if max(img.size) <= SMALL else Image.LANCZOS
    tile = ImageOps.pad(img.convert("RGB"), (size, size), method=resample, color=(255, 255, 255))
    if colour is not None:
        tile = ImageOps.expand(tile.crop((3, 3, size - 3, size - 3)), border=3, fill=colour)
    return tile


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no sized default font
        return ImageFont.load_default()


def _grid_png(rows: list[tuple[str, list[tuple[Image.Image, str | None]]]], title: str, tile: int) -> Image.Image:
    """Rows of labelled tiles (colour = verdict border) under a title line: the tiles laid out by
    `torchvision.utils.make_grid` (one grid row per labelled row, short rows padded with white), the labels and the
    title drawn beside and above it with PIL."""
    import torch
    from PIL import Image, ImageDraw
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image
    from torchvision.utils import make_grid

    label_w, gap, title_h = 90, 4, 24
    cols = max((len(tiles) for _, tiles in rows), default=1)
    blank = torch.full((3, tile, tile), 255, dtype=torch.uint8)
    tensors = []
    for _, tiles in rows:
        tensors += [pil_to_tensor(_tile(img, tile, colour)) for img, colour in tiles] + [blank] * (cols - len(tiles))
    grid = make_grid(torch.stack(tensors), nrow=cols, padding=gap, pad_value=255)  # tile j at gap + j * (tile + gap)
    canvas = Image.new("RGB", (label_w + grid.shape[2], title_h + grid.shape[1]), "white")
    canvas.paste(to_pil_image(grid), (label_w - gap, title_h - gap))
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 4), title, fill="black", font=_font(14))
    for i, (label, _) in enumerate(rows):
        draw.text((gap, title_h + i * (tile + gap) + tile // 2 - 6), label, fill="black", font=_font(12))
    return canvas


_UNWRITABLE = "pass --out a folder you can write to (and with free space)"


def _save_png(img: Image.Image, path: Path) -> None:
    with write_errors(f"`out` {str(path.parent.parent)!r}", _UNWRITABLE), atomic_write(path, "wb") as f:
        img.save(f, format="PNG")


def _check_writable(out_dir: Path) -> None:
    """Create `out_dir` and write (and remove) a probe file there, before any work: a read-only folder or a full disk
    is one line naming the folder, not a traceback after the images were read."""
    with write_errors(f"`out` {str(out_dir)!r}", _UNWRITABLE):
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX + "probe.", dir=out_dir)
        os.close(fd)
        os.unlink(probe)


# --------------------------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------------------------
def _header_html(view: BuildView, methods: list[str], results: dict) -> list[str]:
    """The report's title, what the build is, and the evaluations' tables (or how to make them)."""
    esc = html.escape
    cfg = view.config
    counts = {m: sum(1 for r in view.rows([m])) for m in methods}
    judge = results.get("judge")
    body = [f"<h1>synthaug report: {esc(view.root.resolve().name)}</h1>",
            f'<p class="muted">build {esc(str(view.root))}; model {esc(str(cfg.get("model", "?")))}; guide '
            f'{esc(str(cfg.get("guide", "?")))}; {len(view.classes)} classes; images: '
            + esc(", ".join(f"{m} {n}" for m, n in counts.items())) + "</p>"]
    if judge is not None and judge.self_scored:
        body.append(f'<p class="warn">The judge ({esc(judge.judge)}) is the guide: it scores images optimised to '
                    "please it, so the judge accuracies below are flattered.</p>")
    body.append("<h2>Results</h2>")
    labels = {"judge": "Table 1 - judge accuracy", "downstream": "Table 2 - downstream training",
              "fid": "Table 3 - FID/KID (Inception-v3 features)"}
    if results:
        for kind, result in results.items():
            label = labels.get(kind) or f"Table 3/5 - FID/KID ({getattr(result, 'features', kind)} features)"
            body.append(f"<h3>{esc(label)}</h3>")
            body += [_html_table(t.title, t.headers, t.rows) for t in result_tables(result, per_class=False)]
    else:
        body.append('<p class="muted">No evaluation yet: run <code>synthaug evaluate</code>, <code>synthaug '
                    "train</code> or <code>synthaug fid</code> on this build.</p>")
    return body


def _class_html(view: BuildView, ci: int, crow: dict, rows: list[dict], methods: list[str], per_class: int,
                verdicts: dict, read: ImageReader, per_class_top1: dict, thumb: int) -> tuple[str, list, dict]:
    """One class's section: its methods' images side by side on the same seeds with the judge's verdicts, the
    token's numbers and training curve. Returns the section, the grid's rows (for the PNG) and the cells shown."""
    esc = html.escape
    info = _token_info(view.root, crow)
    seeds, cells = _select_cells(view, rows, methods, per_class, verdicts, read)
    shown_methods = [m for m in methods if any((m, s) in cells for s in seeds)]
    acc = ", ".join(f"{m} {100 * per_class_top1[(ci, m)]:.0f}%" for m in shown_methods
                    if (ci, m) in per_class_top1)
    meta = [f"token {esc(str(info.get('token') or '-'))}"]
    if info.get("updates") is not None:
        meta.append(f"{esc(str(info['updates']))} updates")
    if info.get("stop_reason"):
        meta.append(f"stop: {esc(str(info['stop_reason']))}")
    if acc:
        meta.append(f"judge top-1: {esc(acc)}")
    if crow.get("trust"):  # dct.trust: the per-class verdict from the user's own real images
        t = crow["trust"]
        meta.append(esc(TrustVerdict(**{k: v for k, v in t.items() if k != "fallback"}).describe()
                        + ("; generated with the plain prompt" if t.get("fallback") else "")))
    # Columns are seeds (the same noise for every method); headed by the sample index, the seed on hover
    index_of = {c.seed: c.index for c in cells.values()}
    grid = ['<table class="grid"><tr><th></th>' + "".join(
        f'<th title="seed {s}">#{index_of[s]}</th>' for s in seeds) + "</tr>"]
    png_rows = []
    for m in shown_methods:
        tds, tiles = [], []
        for s in seeds:
            cell = cells.get((m, s))
            if cell is None:
                tds.append("<td></td>")
                continue
            uri, width = _thumbnail(cell.image, thumb)
            caption, colour = _verdict_text(cell.verdict)
            tds.append(f'<td><span class="img" style="border-color:{colour}"><img src="{uri}" '
                       f'width="{width}" alt="{esc(cell.key)}" title="{esc(cell.key)}"></span>'
                       f'<div class="cap" style="color:{colour}">{esc(caption)}</div></td>')
            tiles.append((cell.image, colour if cell.verdict.correct is not None else None))
        grid.append(f"<tr><th>{esc(m)}</th>{''.join(tds)}</tr>")
        png_rows.append((m, tiles))
    grid.append("</table>")
    section = (f'<section id="c{ci:03d}"><h3>{ci} {esc(crow["name"])}</h3>'
               f'<p class="muted">{"; ".join(meta)}</p><div class="class"><div>{"".join(grid)}</div>'
               f"<div>{svg_curve(info['history'], info.get('best_step'), info.get('stop_reason'))}</div>"
               "</div></section>")
    return section, png_rows, cells


def write_report(
    build: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    classes: Sequence[int] | None = None,
    methods: Sequence[str] | None = None,
    per_class: int = 8,
    thumb: int = 160,
    grids: bool = True,
    progress: bool = True,
) -> Path:
    """Write ``report/index.html`` (self-contained: images embedded, no scripts, no network) and PNG grids.

    Args:
        build: the build directory.
        out: report folder (default ``BUILD/report``).
        classes: class indices to show (default: every class with images).
        methods: methods to show, in this order (default: all, baseline first: sd, ti, mcti, dct).
        per_class: images per method and class (the same seeds for every method).
        thumb: thumbnail size in pixels for large images (small ones keep their pixels, shown upscaled).
        grids: also write ``grids/c{index:03d}.png`` per class and ``grids/overview.png``.
        progress: progress bar over classes.

    Returns:
        The path of ``index.html``.

    >>> write_report("out/digits")
    PosixPath('out/digits/report/index.html')
    """
    from tqdm.auto import tqdm

    # 0. Inputs checked; the build, its evaluations and the judge's verdicts read.
    if per_class <= 0:
        raise UserError(f"`per_class` must be > 0 but is {per_class}.")
    view = open_build(build)
    methods = view.select_methods(methods)
    out_dir = Path(out) if out is not None else view.root / REPORT_DIR
    _check_writable(out_dir)
    class_rows = {int(c["index"]): c for c in view.classes}
    rows_by_class: dict[int, list[dict]] = defaultdict(list)
    for r in view.rows(methods):
        rows_by_class[int(r["class_index"])].append(r)
    if classes is not None:
        missing = [c for c in classes if c not in class_rows]
        if missing:
            raise UserError(f"`classes` {missing} not in the build at {view.root}: valid indices are "
                            f"0..{len(class_rows) - 1}.")
        shown = list(classes)
    else:
        shown = sorted(rows_by_class)
    results = _load_results(view.root)
    verdicts = _judge_verdicts(view.root)
    judge = results.get("judge")
    per_class_top1 = {(c.class_index, c.method): c.top1 for c in judge.per_class} if judge else {}

    # 1. Header, the build at a glance (summary, confusion, probabilities, provenance, fitted guide, attempts),
    #    then the result tables (Table 1, Table 2, FID when eval/ holds them).
    header = _header_html(view, methods, results)
    glance = [summary_html(view, methods, judge), confusion_html(view, methods), histograms_html(view, methods),
              provenance_html(view), fitted_guide_html(view), attempts_html(view, methods)]
    body = header[:2 + (judge is not None and judge.self_scored)] + [g for g in glance if g] \
        + header[2 + (judge is not None and judge.self_scored):]

    # 2. Per class: images side by side on the same seeds, verdicts, training curve; its PNG grid.
    esc = html.escape
    body.append("<h2>Classes</h2><nav>" + "".join(
        f'<a href="#c{ci:03d}">{ci} {esc(class_rows[ci]["name"])}</a>' for ci in shown) + "</nav>")
    read = ImageReader(view)
    overview: list[tuple[str, list[tuple[Image.Image, str | None]]]] = []
    grid_dir = out_dir / "grids"
    try:
        for ci in tqdm(shown, desc="report", disable=not progress, leave=False):
            crow = class_rows[ci]
            section, png_rows, cells = _class_html(view, ci, crow, rows_by_class.get(ci, []), methods, per_class,
                                                   verdicts, read, per_class_top1, thumb)
            body.append(section)
            if grids and png_rows:
                tile = 96 if max(cells[next(iter(cells))].image.size) <= SMALL else min(thumb, 192)
                _save_png(_grid_png(png_rows, f"{ci} {crow['name']} (same seeds per column)", tile),
                          grid_dir / f"c{ci:03d}.png")
                if len(overview) < 10:
                    overview += [(f"{crow['name'][:10]} {m}", tiles) for m, tiles in png_rows]
    finally:
        read.close()
    # 3. The overview grid, then the page.
    if grids and overview:
        _save_png(_grid_png(overview, f"{view.root.resolve().name}: {' vs '.join(methods)} on identical seeds "
                                      "(green/red: judge right/wrong)", 64), grid_dir / "overview.png")

    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>synthaug report: {esc(view.root.resolve().name)}</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
    path = out_dir / "index.html"
    with write_errors(f"`out` {str(out_dir)!r}", _UNWRITABLE):
        write_text(path, page)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Tables into a shared markdown file (RESULTS.md)
# --------------------------------------------------------------------------------------------------------------------
def write_results_block(path: str | os.PathLike, block: str, markdown: str) -> Path:
    """Put `markdown` between ``<!-- synthaug:BLOCK begin -->`` and ``<!-- synthaug:BLOCK end -->`` in `path`.

    Only that block changes: the rest of the file (sections others own) is kept byte for byte. A missing block is
    appended; a missing file is created. Atomic.

    >>> write_results_block("RESULTS.md", "table1-digits", "| method | top-1 |\n| --- | --- |\n| dct | 80.1 |")
    PosixPath('RESULTS.md')
    """
    import re

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", block):
        raise UserError(f"`block` must be letters, digits, '_', '-' or '.' but is {block!r}: e.g. 'table1-digits'.")
    path = Path(path)
    begin, end = f"<!-- synthaug:{block} begin -->", f"<!-- synthaug:{block} end -->"
    text = path.read_text() if path.is_file() else ""
    new = f"{begin}\n{markdown.strip()}\n{end}"
    i, j = text.find(begin), text.find(end)
    if i >= 0 and j > i:
        text = text[:i] + new + text[j + len(end):]
    elif i >= 0 or j >= 0:
        raise UserError(f"{path} has a broken synthaug:{block} block (only one of its markers): fix the markers by "
                        "hand or delete the partial block.")
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + new + "\n"
    write_text(path, text)
    return path


def rerun_command(script: str, argv: Sequence[str] | None = None) -> str:
    """The shell command that reruns `script` with `argv` (default: this process's arguments), for a results block.

    ``OMP_NUM_THREADS``, when set, is part of it: the thread count changes the float reduction order on CPU, and with
    it trained weights.

    >>> rerun_command("pipelines/reproduce_table1.py", ["out/digits", "--judge", "digits-judge"])
    'python pipelines/reproduce_table1.py out/digits --judge digits-judge'
    """
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
    return threads + shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


__all__ = ["rerun_command", "write_report", "write_results_block"]
