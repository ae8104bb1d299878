"""Terminal tables and saved results of the evaluations."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..index import method_sort_key
from .downstream import CellResult, DownstreamResult, DownstreamRow
from .fid import FIDResult, FIDRow
from .judge import ClassAccuracy, JudgeResult, MethodAccuracy, PairedComparison


# --------------------------------------------------------------------------------------------------------------------
# Tables for the terminal, RESULTS.md and the HTML report
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Table:
    """One table of a result: a title line, column headers, rows of strings."""

    title: str
    headers: list[str]
    rows: list[list[str]]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def result_tables(result: JudgeResult | DownstreamResult | FIDResult | Sequence[Mapping[str, Any]], *,
                  per_class: bool = False) -> list[Table]:
    """The tables of a result (what `format_table` prints and the report shows); a list of `evaluate_shots` rows
    gives one table: a row per method, a column per N, ``mean ± std`` accuracy (%) over seeds.

    >>> [t.title for t in result_tables(load_result("out/digits/eval/judge.json"))]
    """
    if isinstance(result, JudgeResult):
        return _judge_tables(result, per_class)
    if isinstance(result, DownstreamResult):
        return _downstream_tables(result)
    if isinstance(result, FIDResult):
        return _fid_tables(result)
    if isinstance(result, Sequence) and all(isinstance(r, Mapping) for r in result):
        return _shots_tables(result)
    raise TypeError(f"expected a JudgeResult, DownstreamResult, FIDResult or evaluate_shots rows, not "
                    f"{type(result).__name__}")


def _render(table: Table, markdown: bool) -> str:
    headers, rows = table.headers, table.rows
    title = [table.title] if table.title else []
    if markdown:
        lines = [*title, *([""] if title else []), "| " + " | ".join(headers) + " |",
                 "|" + "|".join(" --- " for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [*title, fmt.format(*headers), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + [fmt.format(*r) for r in rows])


def format_table(result: JudgeResult | DownstreamResult | FIDResult | Sequence[Mapping[str, Any]], *,
                 markdown: bool = False, per_class: bool = False) -> str:
    """The result as tables: aligned text for the terminal, or markdown (`markdown=True`) for RESULTS.md.

    >>> print(format_table([{"method": "ti", "shots": 1, "seed": 0, "accuracy": 0.5}], markdown=True))
    | method | 1-shot |
    | --- | --- |
    | ti | 50.0 |
    """
    text = "\n\n".join(_render(t, markdown) for t in result_tables(result, per_class=per_class))
    if isinstance(result, JudgeResult) and result.self_scored:
        text = "WARNING: the judge is the guide (self-scoring): these accuracies are flattered.\n\n" + text
    return text


def _judge_tables(r: JudgeResult, per_class: bool) -> list[Table]:
    title = (f"Judge accuracy (%): judge {r.judge}" + (f" (trained on {r.judge_trained_on})" if r.judge_trained_on
                                                         else "")
             + f"; guide {r.guide or '?'}" + (" [SELF-SCORED]" if r.self_scored else "")
             + f"; {r.shared_classes}/{r.total_classes} classes shared ({r.class_mapping})"
             + ("; judge restricted to the shared labels" if r.restrict_to_shared else ""))
    rows = [[m.method, str(m.images), _pct(m.top1), _pct(m.top5), _pct(m.class_mean_top1), f"{m.mean_prob:.3f}"]
            for m in r.methods]
    tables = [Table(title, ["method", "images", "top-1", f"top-{r.top5_k}", "class-mean top-1", "mean p(class)"],
                    rows)]
    if r.paired:
        prow = [[f"{p.baseline} -> {p.method}", str(p.pairs), str(p.fixed), str(p.broken), str(p.both_right),
                 str(p.both_wrong), f"{p.p_value:.2g}"] for p in r.paired]
        tables.append(Table("Paired on identical (class, seed): images the token fixed vs broke (judge top-1)",
                            ["pair", "pairs", "fixed", "broken", "both right", "both wrong", "p (sign test)"], prow))
    if per_class:
        methods = [m.method for m in r.methods]
        by_class: dict[tuple[int, str], dict[str, ClassAccuracy]] = defaultdict(dict)
        for c in r.per_class:
            by_class[(c.class_index, c.class_name)][c.method] = c
        crow = [[f"{ci} {name}"] + [_pct(v[m].top1) if m in v else "-" for m in methods]
                for (ci, name), v in sorted(by_class.items())]
        tables.append(Table("Judge top-1 (%) per class", ["class"] + methods, crow))
    return tables


def _downstream_tables(r: DownstreamResult) -> list[Table]:
    methods = sorted({row.method for row in r.rows}, key=method_sort_key)
    shots = sorted({row.shots for row in r.rows})
    cell = {(row.method, row.shots): row for row in r.rows}
    seeds = max((row.seeds for row in r.rows), default=0)
    tables = []
    for metric, label in (("top1", "top-1"), ("top5", "top-5")):
        rows = []
        for k in shots:
            line = [str(k)]
            for m in methods:
                x = cell.get((m, k))
                line.append(f"{_pct(getattr(x, metric + '_mean'))} ± {_pct(getattr(x, metric + '_std'))}" if x
                            else "-")
            rows.append(line)
        title = (f"Downstream {label} (%) on the real test split, mean ± std over {seeds} seeds; {r.arch}; "
                 f"k real + {r.synthetic_per_class} synthetic per class of each method (real: real images only)")
        tables.append(Table(title, ["k real/class"] + methods, rows))
    return tables


def _shots_tables(rows: Sequence[Mapping[str, Any]]) -> list[Table]:
    shots = sorted({r["shots"] for r in rows})
    body = []
    for m in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for n in shots:
            acc = [100 * r["accuracy"] for r in rows if r["method"] == m and r["shots"] == n]
            cells.append("" if not acc else f"{acc[0]:.1f}" if len(acc) == 1 else
                         f"{np.mean(acc):.1f} ± {np.std(acc, ddof=1):.1f}")
        body.append([m, *cells])
    return [Table("", ["method", *(f"{n}-shot" for n in shots)], body)]


def _fid_tables(r: FIDResult) -> list[Table]:
    rows = [[x.method, str(x.fake_images), str(x.real_images), f"{x.fid:.2f}",
             f"{x.kid_mean:.5f} ± {x.kid_std:.5f}", str(x.kid_subset_size)] for x in r.rows]
    title = (f"FID/KID against real {r.real} ({r.image_size[0]}x{r.image_size[1]}), features: {r.features} "
             f"({r.feature_dim}-d); lower is better")
    return [Table(title, ["method", "generated", "real", "FID", "KID", "KID subset"], rows)]


def load_result(path: str | os.PathLike) -> JudgeResult | DownstreamResult | FIDResult:
    """Read back a result JSON written under ``eval/`` (judge.json, downstream.json, fid*.json).

    >>> print(format_table(load_result("out/digits/eval/downstream.json"), markdown=True))
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"No evaluation result at {p}: run the evaluation that writes it first.")
    d = json.loads(p.read_text())
    if "judge" in d and "paired" in d:
        return JudgeResult(**{**d, "methods": [MethodAccuracy(**m) for m in d["methods"]],
                              "per_class": [ClassAccuracy(**c) for c in d["per_class"]],
                              "paired": [PairedComparison(**x) for x in d["paired"]]})
    if "cells" in d:
        return DownstreamResult(**{**d, "rows": [DownstreamRow(**x) for x in d["rows"]],
                                   "cells": [CellResult(**c) for c in d["cells"]]})
    if "features" in d:
        return FIDResult(**{**d, "rows": [FIDRow(**x) for x in d["rows"]]})
    raise UserError(f"{p} is not a synthaug evaluation result (judge, downstream or FID).")
