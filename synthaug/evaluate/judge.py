"""Table 1: a judge classifier scores every generated image; per-method accuracy, paired comparison on identical seeds."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_write, write_text
from ..classifier.load import load_classifier
from ..classifier.source import same_source
from ..errors import UserError
from ..index import method_sort_key, open_build
from ..jsonfmt import dumps
from ..layout import EVAL_DIR, INDEX_FILE, JUDGE_IMAGES_FILE, build_lock
from ..models import resolve_device
from .images import iter_image_batches, model_device_dtype
from .names import ClassMap, map_build_classes, resolve_class_map

log = logging.getLogger(__name__)

BASELINE = "sd"  # the plain-prompt images every other method is paired against


class SelfScoringWarning(UserWarning):
    """The judge is the guide: it scores images that were optimised to please it, so accuracy is flattered."""


# --------------------------------------------------------------------------------------------------------------------
# Table 1: judge accuracy
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class MethodAccuracy:
    """Judge accuracy over all scored images of one method."""

    method: str
    images: int
    top1: float  # fraction of images whose judge top-1 is their class
    top5: float  # fraction whose class is in the judge's top-k (k = min(5, judge classes))
    mean_prob: float  # mean judge probability of the image's own class
    class_mean_top1: float  # top-1 averaged over classes first (equal weight per class)


@dataclass
class ClassAccuracy:
    """Judge accuracy for one (class, method)."""

    class_index: int
    class_name: str
    method: str
    images: int
    top1: float
    top5: float
    mean_prob: float


@dataclass
class PairedComparison:
    """Images of `method` vs `baseline` generated from the same (class, seed): which the token fixed or broke."""

    baseline: str
    method: str
    pairs: int
    both_right: int
    fixed: int  # baseline wrong, method right
    broken: int  # baseline right, method wrong
    both_wrong: int
    p_value: float  # exact two-sided sign test (McNemar) on fixed vs broken


@dataclass
class JudgeResult:
    """Table 1 for one build and one judge (`evaluate_judge`)."""

    build: str
    judge: str
    judge_trained_on: str | None
    guide: str | None
    self_scored: bool  # the judge is the guide: accuracy is flattered (the images were optimised for it)
    class_mapping: str  # identity | name | map | index
    shared_classes: int
    total_classes: int
    unmapped_classes: list[str]
    restrict_to_shared: bool  # judge probabilities renormalised over the shared labels only
    top5_k: int
    methods: list[MethodAccuracy]
    per_class: list[ClassAccuracy]
    paired: list[PairedComparison]
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _sign_test(fixed: int, broken: int) -> float:
    """Exact two-sided binomial test of fixed vs broken under p = 1/2 (McNemar's exact test):
    ``scipy.stats.binomtest``.

    Without scipy the same exact sum is taken in log space: Table 1 (`synthaug evaluate`) runs on the base install,
    and scipy comes only with the ``[eval]`` extra, so a missing scipy must not cost the table its p-values. The two
    agree to float rounding (tests/test_evaluate.py).
    """
    n = fixed + broken
    if n == 0:
        return 1.0
    k = min(fixed, broken)
    try:
        from scipy.stats import binomtest
    except ImportError:
        log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
                     for i in range(k + 1)]
        m = max(log_terms)
        return min(1.0, 2.0 * math.exp(m) * sum(math.exp(t - m) for t in log_terms))
    return float(binomtest(k, n, 0.5, alternative="two-sided").pvalue)


def evaluate_judge(
    build: str | os.PathLike,
    judge: str | nn.Module,
    *,
    methods: Sequence[str] | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 64,
    class_map: ClassMap | str | os.PathLike | None = None,
    restrict_to_shared: bool = False,
    baseline: str = BASELINE,
    write_back: bool = True,
    judge_trained_on: str | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    allow_guide_judge: bool = True,
) -> JudgeResult:
    """Score every generated image with a judge classifier (paper Table 1).

    Writes ``eval/judge.json`` (the result), ``eval/judge_per_class.csv`` and ``eval/judge_images.parquet`` (one
    row per image: prediction, probability of its class, top-1/top-5 hits), and with `write_back` the judge's
    probability of each image's class into the ``judge_prob`` column of ``index.parquet`` (atomically).

    Args:
        build: the build directory.
        judge: any source `synthaug.classifier.load_classifier` accepts, or a loaded classifier (a module mapping
            images in [0, 1] to logits, with `labels`). It should not be the guide; if it is, a
            `SelfScoringWarning` is raised and ``self_scored`` is recorded.
        methods: methods to score (default: every method in the index).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``... (used when `judge` is a source).
        batch_size: images per judge forward pass.
        class_map: build class name -> judge label (a dict or JSON file) when the label sets differ beyond names;
            ``"inat179"`` or ``"inat179:INAT_ROOT"`` for a CUB build scored by an iNat 2021 judge (the paper's
            iNat179 row; with the root, judges labelled by scientific or folder names match too).
            `synthaug.evaluate.names.resolve_class_map` lists the forms.
        restrict_to_shared: renormalise the judge over the labels it shares with the build (a closed-set judge on
            the shared classes) instead of all its labels.
        baseline: the method every other method is paired against on identical seeds.
        write_back: write ``judge_prob`` into ``index.parquet``.
        judge_trained_on: note of what data the judge saw (default: what the classifier declares).
        out: where result files go (default ``BUILD/eval``).
        progress: show a progress bar.
        allow_guide_judge: False refuses a judge that is the build's guide (a `UserError` before it loads: what
            ``synthaug evaluate`` does unless ``--allow-guide-judge``); True scores with it, warning once.

    >>> result = evaluate_judge("out/digits", "digits-judge")
    >>> print(format_table(result))
    """
    if batch_size <= 0:
        raise UserError(f"`batch_size` must be > 0 but is {batch_size}.")
    view = open_build(build)
    methods = view.select_methods(methods)

    # 1. Whether the judge is the guide (decided from its source, before it loads), then the judge.
    judge_source = judge if isinstance(judge, str) else str(getattr(judge, "source", type(judge).__name__))
    guide = view.config.get("guide")
    self_scored = same_source(judge_source, guide)
    if self_scored and not allow_guide_judge:
        raise UserError(f"`judge` {judge_source!r} is the build's guide, the classifier that steered the tokens: its "
                        f"accuracy on images optimised to please it is flattered: pass an independent judge (e.g. "
                        f"digits-judge for digits), or --allow-guide-judge to score with the guide anyway.")
    if self_scored:  # one warning (printed once on stderr); the result records self_scored
        warnings.warn(f"SELF-SCORING: the judge {judge_source!r} is the guide that steered the tokens: the images "
                      "were optimised to please it, so its accuracy is flattered. Use an independent judge (e.g. "
                      "digits-judge for digits).", SelfScoringWarning, stacklevel=2)
    if isinstance(judge, str):
        judge = load_classifier(judge, device=resolve_device(device))
    judge.eval()
    trained_on = judge_trained_on or getattr(judge, "trained_on", None)

    # 2. Which judge output scores each build class.
    labels = list(getattr(judge, "labels", None) or [])
    if not labels:
        raise UserError(f"`judge` {judge_source!r} has no `labels`: load it with synthaug.load_classifier.")
    names_map, no_counterpart = resolve_class_map(class_map)
    if no_counterpart:
        log.info("class map: %d build classes have no counterpart: %s", len(no_counterpart), ", ".join(no_counterpart))
    mapping = map_build_classes(view.classes, labels, names_map)
    if mapping.unmapped:
        log.info("judge shares %d/%d classes; not scored: %s", mapping.shared, mapping.total,
                 ", ".join(mapping.unmapped[:10]) + (" ..." if len(mapping.unmapped) > 10 else ""))
    shared_cols = sorted(set(mapping.build_to_judge.values()))
    n_cols = len(shared_cols) if restrict_to_shared else len(labels)
    k5 = min(5, n_cols)

    # 3. Score the images.
    rows = [r for r in view.rows(methods) if int(r["class_index"]) in mapping.build_to_judge]
    dev, dtype = model_device_dtype(judge)
    cols = torch.tensor(shared_cols, device=dev)
    scored: list[dict] = []
    with torch.inference_mode():
        for batch_rows, images in iter_image_batches(view, rows, batch_size, progress=progress, desc="judge"):
            logits = judge(images.to(dev, dtype)).float()
            if restrict_to_shared:
                logits = logits[:, cols]
            probs = logits.softmax(-1)
            targets = [mapping.build_to_judge[int(r["class_index"])] for r in batch_rows]
            if restrict_to_shared:
                targets = [shared_cols.index(t) for t in targets]
            t = torch.tensor(targets, device=dev)
            top = probs.topk(k5, dim=-1).indices
            for i, r in enumerate(batch_rows):
                pred = int(top[i, 0])
                pred_label = labels[shared_cols[pred] if restrict_to_shared else pred]
                scored.append({
                    "key": r["key"], "method": r["method"], "class_index": int(r["class_index"]),
                    "class_name": r["class_name"], "seed": int(r["seed"]), "judge_pred": pred_label,
                    "judge_prob": float(probs[i, t[i]]), "top1": pred == int(t[i]),
                    "top5": bool((top[i] == t[i]).any()),
                })

    # 4. Aggregate per (class, method), per method, and paired on seeds.
    per_class, method_rows = _aggregate(scored, methods)
    paired = _paired(scored, methods, baseline)

    # 5. Files, and the verdict back into the index.
    out_dir = Path(out) if out is not None else view.root / EVAL_DIR
    result = JudgeResult(
        build=str(view.root), judge=judge_source, judge_trained_on=trained_on, guide=guide, self_scored=self_scored,
        class_mapping=mapping.by, shared_classes=mapping.shared, total_classes=mapping.total,
        unmapped_classes=list(mapping.unmapped), restrict_to_shared=restrict_to_shared, top5_k=k5,
        methods=method_rows, per_class=per_class, paired=paired,
    )
    result.files = _write_judge_files(result, scored, out_dir)
    if write_back and (view.root / INDEX_FILE).is_file():
        try:
            write_judge_prob(view.root, {s["key"]: s["judge_prob"] for s in scored}, judge=judge_source)
            result.files["index"] = str(view.root / INDEX_FILE)
        except UserError as e:  # a build holds the folder, or removed its index meanwhile: the eval files stand
            log.warning("judge_prob not written back into the index: %s", e)
    elif write_back:
        log.warning("%s has no index.parquet yet (build still running): judge_prob not written back", view.root)
    write_text(out_dir / "judge.json", dumps(result.to_dict(), indent=2) + "\n")
    return result


def _aggregate(scored: list[dict], methods: Sequence[str]) -> tuple[list[ClassAccuracy], list[MethodAccuracy]]:
    groups: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for s in scored:
        groups[(s["class_index"], s["method"])].append(s)
    per_class = []
    for (ci, m), items in sorted(groups.items(), key=lambda kv: (kv[0][0], method_sort_key(kv[0][1]))):
        per_class.append(ClassAccuracy(
            class_index=ci, class_name=items[0]["class_name"], method=m, images=len(items),
            top1=float(np.mean([s["top1"] for s in items])), top5=float(np.mean([s["top5"] for s in items])),
            mean_prob=float(np.mean([s["judge_prob"] for s in items])),
        ))
    method_rows = []
    for m in sorted(methods, key=method_sort_key):
        items = [s for s in scored if s["method"] == m]
        if not items:
            continue
        classes = [c.top1 for c in per_class if c.method == m]
        method_rows.append(MethodAccuracy(
            method=m, images=len(items), top1=float(np.mean([s["top1"] for s in items])),
            top5=float(np.mean([s["top5"] for s in items])),
            mean_prob=float(np.mean([s["judge_prob"] for s in items])), class_mean_top1=float(np.mean(classes)),
        ))
    return per_class, method_rows


def _paired(scored: list[dict], methods: Sequence[str], baseline: str) -> list[PairedComparison]:
    """Pair each method's images with the baseline's on (class, seed): the same noise, with and without the token."""
    by_seed: dict[str, dict[tuple[int, int], bool]] = defaultdict(dict)
    for s in scored:
        by_seed[s["method"]].setdefault((s["class_index"], s["seed"]), s["top1"])
    if baseline not in by_seed:
        return []
    base = by_seed[baseline]
    out = []
    for m in sorted(methods, key=method_sort_key):
        if m == baseline or m not in by_seed:
            continue
        keys = sorted(set(base) & set(by_seed[m]))
        if not keys:
            log.warning("no %s image shares a (class, seed) with a %s image: no paired comparison", m, baseline)
            continue
        b = np.array([base[k] for k in keys])
        x = np.array([by_seed[m][k] for k in keys])
        fixed, broken = int((~b & x).sum()), int((b & ~x).sum())
        out.append(PairedComparison(
            baseline=baseline, method=m, pairs=len(keys), both_right=int((b & x).sum()), fixed=fixed, broken=broken,
            both_wrong=int((~b & ~x).sum()), p_value=_sign_test(fixed, broken),
        ))
    return out


def _write_judge_files(result: JudgeResult, scored: list[dict], out_dir: Path) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    images = out_dir / JUDGE_IMAGES_FILE
    table = pa.Table.from_pylist(scored, schema=pa.schema([
        ("key", pa.string()), ("method", pa.string()), ("class_index", pa.int64()), ("class_name", pa.string()),
        ("seed", pa.int64()), ("judge_pred", pa.string()), ("judge_prob", pa.float64()), ("top1", pa.bool_()),
        ("top5", pa.bool_()),
    ]))
    table = table.replace_schema_metadata({"synthaug.judge": result.judge})
    with atomic_write(images, "wb") as f:
        pq.write_table(table, f)
    per_class = out_dir / "judge_per_class.csv"
    write_csv(per_class, [dataclasses.asdict(c) for c in result.per_class],
              [f.name for f in dataclasses.fields(ClassAccuracy)])
    return {"result": str(out_dir / "judge.json"), "per_class": str(per_class), "images": str(images)}


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    write_text(path, buf.getvalue())


def write_judge_prob(build: str | os.PathLike, probs: Mapping[str, float], *, judge: str | None = None) -> None:
    """Set ``judge_prob`` in ``index.parquet`` from ``{key: probability}``, atomically, under the build's lock.

    Rows without a verdict get null: a column mixing two judges' verdicts would mean nothing. The judge's name is
    kept in the table's metadata (``synthaug.judge``). A build merges the index under the same lock, so neither
    rewrite loses the other's; while a build runs in the folder this raises `UserError`.
    """
    with build_lock(build, fix="wait for the build to finish, then evaluate again"):
        _write_judge_prob(Path(build) / INDEX_FILE, probs, judge)


def _write_judge_prob(path: Path, probs: Mapping[str, float], judge: str | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise UserError(f"{path} does not exist (a build is resuming there, or never finished): run the build to the "
                        f"end, then evaluate again.")
    table = pq.read_table(path)
    values = pa.array([probs.get(k) for k in table.column("key").to_pylist()], type=pa.float64())
    if "judge_prob" in table.column_names:
        i = table.column_names.index("judge_prob")
        old_type = table.schema.field(i).type
        table = table.set_column(i, pa.field("judge_prob", old_type, nullable=True), values.cast(old_type))
    else:
        table = table.append_column(pa.field("judge_prob", pa.float64(), nullable=True), values)
    meta = dict(table.schema.metadata or {})
    if judge is not None:
        meta[b"synthaug.judge"] = judge.encode()
    table = table.replace_schema_metadata(meta)
    with atomic_write(path, "wb") as f:
        pq.write_table(table, f)
