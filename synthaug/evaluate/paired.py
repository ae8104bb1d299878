"""Table 2 with intervals: rows of downstream cells → mean top-1 with its 95% t-interval over seeds, and paired
differences (same k, same seed, hence the same k real images) against baseline rows with a paired t-test.

A *row* is any set of cells `train_downstream` saved (``OUT/downstream/cells/*.json``) for one synthetic set: a
method of a build, under one setting (``sd``, ``sd`` with `min_confidence`, ``dct``, ``dct`` with soft targets, a
build made with another generation setting, ...). Rows from different builds pair up as long as their cells drew the
same real images (`CellResult.real_indices_sha256`), which this module checks.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, require
from .downstream import REAL_ONLY


@dataclass(frozen=True)
class RowCell:
    """One trained classifier of a row."""

    top1: float
    real_indices_sha256: str


@dataclass
class RowStat:
    """Mean top-1 of a row at k, with the half-width of its 95% t-interval over seeds (nan with one seed)."""

    row: str
    shots: int
    seeds: int
    mean: float
    half_width: float


@dataclass
class PairedDiff:
    """`row` - `against` at k over the seeds both have: mean, 95% t-interval half-width, two-sided paired p."""

    row: str
    against: str
    shots: int
    seeds: int
    mean: float
    half_width: float
    p_value: float


def load_row_cells(folders: Iterable[str | os.PathLike], method: str | None = None
                   ) -> dict[int, dict[int, RowCell]]:
    """k -> seed -> cell, from the cell files under each folder (``FOLDER/downstream/cells``) of one `method`
    (None: the folder must hold one method besides real-only). The same cell found twice must agree."""
    cells: dict[int, dict[int, RowCell]] = {}
    seen: set[str] = set()
    for folder in folders:
        files = sorted((Path(folder) / "downstream" / "cells").glob("*.json"))
        if not files:
            raise UserError(f"No downstream cells under {folder}: pass a result folder of train_downstream "
                            "(`synthaug train` / reproduce_table2.py --out).")
        for f in files:
            c = json.loads(f.read_text())
            if method is None and c["method"] != REAL_ONLY:
                seen.add(c["method"])
            if c["method"] != (method or c["method"]) or (method is None and c["method"] == REAL_ONLY):
                continue
            k, seed = int(c["shots"]), int(c["seed"])
            cell = RowCell(float(c["top1"]), str(c["real_indices_sha256"]))
            if cells.get(k, {}).get(seed, cell) != cell:
                raise UserError(f"{f}: k={k} seed {seed} differs from the same cell in another folder.")
            cells.setdefault(k, {})[seed] = cell
    if method is None and len(seen) > 1:
        raise UserError(f"{', '.join(map(str, folders))} hold cells of several methods ({', '.join(sorted(seen))}): "
                        "name one, e.g. FOLDER:dct.")
    return cells


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan for one value)."""
    stats = require("scipy.stats", "95% t-intervals and paired t-tests (`synthaug.evaluate.paired`)")

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def paired_diff(a: Mapping[int, RowCell], b: Mapping[int, RowCell], *, row: str, against: str, shots: int
                ) -> PairedDiff | None:
    """`a` - `b` over their shared seeds (None with fewer than 2); refused when a seed's real images differ."""
    stats = require("scipy.stats", "95% t-intervals and paired t-tests (`synthaug.evaluate.paired`)")

    seeds = sorted(set(a) & set(b))
    for s in seeds:
        if a[s].real_indices_sha256 != b[s].real_indices_sha256:
            raise UserError(f"rows {row!r} and {against!r} at k={shots}, seed {s} trained on different real images: "
                            "pair only cells of the same real dataset, split and shots_seed.")
    if len(seeds) < 2:
        return None
    diff = [a[s].top1 - b[s].top1 for s in seeds]
    mean, half = t_interval(diff)
    p = 1.0 if all(d == diff[0] for d in diff) else float(stats.ttest_rel([a[s].top1 for s in seeds],
                                                                          [b[s].top1 for s in seeds]).pvalue)
    return PairedDiff(row, against, shots, len(seeds), mean, half, p)


def compare_rows(rows: Mapping[str, Mapping[int, Mapping[int, RowCell]]], against: Sequence[str]
                 ) -> tuple[list[RowStat], list[PairedDiff]]:
    """Per row and k the mean with its interval, and every row's (real-only's aside) paired difference to each row
    in `against`.

    >>> stats, diffs = compare_rows({"sd": load_row_cells(["eval/sd"]), "dct": load_row_cells(["eval/dct"])},
    ...                             against=["sd"])  # doctest: +SKIP
    """
    missing = [a for a in against if a not in rows]
    if missing:
        raise UserError(f"baseline rows {', '.join(missing)} are not among the rows ({', '.join(rows)}).")
    stats_out, diffs = [], []
    for name, by_k in rows.items():
        for k in sorted(by_k):
            mean, half = t_interval([c.top1 for c in by_k[k].values()])
            stats_out.append(RowStat(name, k, len(by_k[k]), mean, half))
            for base in against:
                if base != name and name != REAL_ONLY and k in rows[base]:
                    d = paired_diff(by_k[k], rows[base][k], row=name, against=base, shots=k)
                    if d is not None:
                        diffs.append(d)
    return stats_out, diffs


def format_comparison(stats: Sequence[RowStat], diffs: Sequence[PairedDiff], *, title: str = "") -> str:
    """A markdown table: one line per k, a column per row (mean ± half-width), then the paired differences."""
    rows = list(dict.fromkeys(s.row for s in stats))
    against = sorted({d.against for d in diffs}, key=rows.index)
    by = {(s.row, s.shots): s for s in stats}
    dby = {(d.row, d.against, d.shots): d for d in diffs}
    pairs: list[tuple[str, str]] = []
    for a in against:
        for r in rows:  # each pair once: "sd+conf - sd", not also "sd - sd+conf"
            if r != a and (a, r) not in pairs and any(k[:2] == (r, a) for k in dby):
                pairs.append((r, a))
    head = ["k"] + rows + [f"{r} - {a}" for r, a in pairs]
    lines = ([f"**{title}**", ""] if title else []) + [
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pct(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{100 * x:.1f}"

    for k in sorted({s.shots for s in stats}):
        cells = [str(k)]
        for r in rows:
            s = by.get((r, k))
            cells.append("-" if s is None else f"{pct(s.mean)} ± {pct(s.half_width)}")
        for r, a in pairs:
            d = dby.get((r, a, k))
            cells.append("-" if d is None else f"{100 * d.mean:+.1f} ± {pct(d.half_width)} (p = {d.p_value:.2g})")
        lines.append("| " + " | ".join(cells) + " |")
    n = sorted({s.seeds for s in stats})
    lines += ["", (f"Mean top-1 (%) ± half-width of the 95% t-interval over {'/'.join(map(str, n))} seeds; "
                   "differences paired over seeds (the same k real images), two-sided paired t-test.")]
    return "\n".join(lines) + "\n"


__all__ = ["PairedDiff", "RowCell", "RowStat", "compare_rows", "format_comparison", "load_row_cells",
           "paired_diff", "t_interval"]
