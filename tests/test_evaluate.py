"""Evaluation: judge accuracy on hand-made images with known answers, FID/KID on known shifts, the downstream protocol."""

from __future__ import annotations

import functools
import json
import math
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fakebuild import DIGITS, ColorJudge, ImageList, color_image, make_build
from PIL import Image

from synthaug.errors import UserError
from synthaug.evaluate.fid import compute_fid, fid_kid
from synthaug.evaluate.judge import SelfScoringWarning, evaluate_judge
from synthaug.evaluate.names import map_classes
from synthaug.evaluate.tables import format_table, load_result
from synthaug.names import normalize_name

CLASSES = (2, 3, 4, 5, 6)



def encoded(method: str, t: int, seed: int) -> int:
    """What the judge will predict for each image of the scenario (see `judge_build`)."""
    miss = t + 3 if t <= 4 else t - 3  # 3 away from t and not at an edge: outside the top-5
    if method == "sd":
        return [t, t + 1, t, miss, t][seed]
    return [t, t, t, miss, t if t in (2, 3) else t + 1][seed]


@pytest.fixture
def judge_build(tmp_path):
    """Classes 2-6, seeds 0-4, methods sd and dct, each image encoding the judge's top-1.

    sd: right, top-5 only, right, miss, right. dct: right, right, right, miss, right for classes 2-3 / top-5 only for
    4-6. So dct fixes seed 1 in every class (5) and breaks seed 4 in classes 4-6 (3).
    """
    samples = [{"method": m, "class_index": t, "index": s, "image": color_image(encoded(m, t, s))}
               for m in ("sd", "dct") for t in CLASSES for s in range(5)]
    return make_build(tmp_path / "build", samples)


def softmax_prob(p: int, t: int, n: int = 10) -> float:
    z = [math.exp(-((c - p) ** 2)) for c in range(n)]
    return z[t] / sum(z)


def test_judge_accuracy_known_answers(judge_build):
    result = evaluate_judge(judge_build, ColorJudge(), progress=False)
    by_method = {m.method: m for m in result.methods}
    assert [m.method for m in result.methods] == ["sd", "dct"]
    assert by_method["sd"].images == by_method["dct"].images == 25
    assert by_method["sd"].top1 == pytest.approx(15 / 25)
    assert by_method["sd"].top5 == pytest.approx(20 / 25)
    assert by_method["dct"].top1 == pytest.approx(17 / 25)
    assert by_method["dct"].top5 == pytest.approx(20 / 25)
    per_class = {(c.class_index, c.method): c for c in result.per_class}
    assert per_class[(2, "dct")].top1 == pytest.approx(4 / 5)
    assert per_class[(6, "dct")].top1 == pytest.approx(3 / 5)
    assert per_class[(4, "sd")].top5 == pytest.approx(4 / 5)
    assert result.shared_classes == result.total_classes == 10 and result.class_mapping == "identity"
    assert not result.self_scored

    (pair,) = result.paired
    assert (pair.baseline, pair.method, pair.pairs) == ("sd", "dct", 25)
    assert (pair.fixed, pair.broken, pair.both_right, pair.both_wrong) == (5, 3, 12, 5)
    assert pair.p_value == pytest.approx(2 * (1 + 8 + 28 + 56) / 256)  # exact sign test, n=8, k=3


def test_judge_prob_written_back_atomically(judge_build):
    before = pq.read_table(judge_build / "index.parquet")
    assert before.column("judge_prob").null_count == before.num_rows
    evaluate_judge(judge_build, ColorJudge(), progress=False)
    after = pq.read_table(judge_build / "index.parquet")
    assert after.drop(["judge_prob"]).equals(before.drop(["judge_prob"]))  # nothing else changed
    assert after.schema.metadata[b"synthaug.judge"] == b"color-judge"
    for row in after.to_pylist():
        t, s = row["class_index"], row["seed"]
        assert row["judge_prob"] == pytest.approx(softmax_prob(encoded(row["method"], t, s), t), rel=1e-5)
    assert not list(judge_build.glob(".tmp-*"))


def test_judge_verdicts_survive_a_rebuilt_index(judge_build):
    from synthaug.index import merge_index

    evaluate_judge(judge_build, ColorJudge(), progress=False)
    judged = pq.read_table(judge_build / "index.parquet")
    merge_index(judge_build)  # what a resumed or extended build does
    again = pq.read_table(judge_build / "index.parquet")
    assert again.column("judge_prob").to_pylist() == judged.column("judge_prob").to_pylist()
    assert again.schema.metadata[b"synthaug.judge"] == b"color-judge"


def test_judge_result_files(judge_build):
    result = evaluate_judge(judge_build, ColorJudge(), progress=False)
    saved = load_result(judge_build / "eval" / "judge.json")
    assert saved == result
    images = pq.read_table(judge_build / "eval" / "judge_images.parquet").to_pylist()
    assert len(images) == 50
    miss = next(r for r in images if r["key"] == "sd-c003-s00003")
    assert (miss["judge_pred"], miss["top1"], miss["top5"]) == ("six", False, False)
    csv_lines = (judge_build / "eval" / "judge_per_class.csv").read_text().splitlines()
    assert csv_lines[0].startswith("class_index,class_name,method,images,top1") and len(csv_lines) == 11
    text = format_table(result, per_class=True)
    assert "sd -> dct" in text and "68.0" in text and "2 two" in text


def test_self_scoring_warns_and_is_recorded(tmp_path):
    build = make_build(tmp_path / "b", [{"method": "dct", "class_index": 3, "index": 0, "image": color_image(3)}],
                       guide="color-judge")
    with pytest.warns(SelfScoringWarning, match="is the guide"):
        result = evaluate_judge(build, ColorJudge(source="color-judge"), progress=False)
    assert result.self_scored
    assert json.loads((build / "eval" / "judge.json").read_text())["self_scored"] is True
    assert format_table(result).startswith("WARNING: the judge is the guide")


def test_the_guide_as_judge_is_refused_before_it_loads_unless_allowed(tmp_path, capsys, recwarn):
    from synthaug.cli import main

    build = make_build(tmp_path / "b", [{"method": "dct", "class_index": 3, "index": 0, "image": color_image(3)}],
                       guide="digits-guide")
    with pytest.raises(UserError, match=r"`judge` 'digits-guide' is the build's guide, .*: pass an independent judge "
                                        r".*, or --allow-guide-judge to score with the guide anyway"):
        evaluate_judge(build, "digits-guide", allow_guide_judge=False)
    assert main(["evaluate", str(build), "--judge", "digits-guide"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--allow-guide-judge" in err and not (build / "eval").exists()
    judge = ColorJudge(source="digits-guide")
    with pytest.warns(SelfScoringWarning) as seen:  # allowed: scored, said once
        assert evaluate_judge(build, judge, progress=False, allow_guide_judge=True).self_scored
    assert len([w for w in seen if issubclass(w.category, SelfScoringWarning)]) == 1


def test_the_sign_test_is_scipys_binomtest_and_its_fallback_agrees(monkeypatch):
    from scipy.stats import binomtest

    from synthaug.evaluate import judge as judge_module

    cases = [(f, b) for f in range(0, 30, 3) for b in range(0, 30, 4)] + [(400, 380), (0, 0)]
    with_scipy = [judge_module._sign_test(f, b) for f, b in cases]
    assert with_scipy[:-1] == [binomtest(min(f, b), f + b, 0.5).pvalue if f + b else 1.0 for f, b in cases[:-1]]
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # the base install: no [eval] extra
    without = [judge_module._sign_test(f, b) for f, b in cases]
    assert without == pytest.approx(with_scipy, rel=1e-9, abs=1e-15) and without[-1] == 1.0


def test_judge_with_other_labels_maps_by_clean_name(judge_build):
    # Judge outputs 0-4 are the build's zero..four under other spellings; 5-9 are classes the build lacks.
    labels = ["000.Zero", "One", "two", "THREE", "four_"] + ["cat", "dog", "owl", "emu", "yak"]
    result = evaluate_judge(judge_build, ColorJudge(labels), progress=False, write_back=False)
    assert (result.class_mapping, result.shared_classes, result.total_classes) == ("name", 5, 10)
    assert result.unmapped_classes == ["five", "six", "seven", "eight", "nine"]
    assert sorted({c.class_index for c in result.per_class}) == [2, 3, 4]  # classes 5, 6 not scored
    assert result.methods[0].images == 15
    per_class = {(c.class_index, c.method): c.top1 for c in result.per_class}
    assert per_class[(4, "sd")] == pytest.approx(3 / 5)
    # Closed set over the shared labels: class 4's "five" and "seven" verdicts fall back to "four".
    closed = evaluate_judge(judge_build, ColorJudge(labels), progress=False, write_back=False,
                            restrict_to_shared=True)
    assert {(c.class_index, c.method): c.top1 for c in closed.per_class}[(4, "sd")] == 1.0
    assert closed.top5_k == 5


def test_map_classes_rules():
    assert normalize_name("001.Black_footed_Albatross") == "black footed albatross"
    assert normalize_name("3 - three") == "three"
    m = map_classes(["Black footed Albatross", "Dodo"], ["dog", "black_footed_albatross"])
    assert (m.build_to_judge, m.shared, m.unmapped, m.by) == ({0: 1}, 1, ("Dodo",), "name")
    m = map_classes(["Laysan Albatross"], ["Phoebastria immutabilis"], {"Laysan Albatross": "Phoebastria immutabilis"})
    assert (m.build_to_judge, m.by) == ({0: 0}, "map")
    with pytest.warns(UserWarning, match="by index"):
        assert map_classes(["a", "b"], ["LABEL_0", "LABEL_1"]).by == "index"
    with pytest.raises(UserError, match="shares no class names.*class_map"):
        map_classes(["zero", "one"], ["cat", "dog", "owl"])
    with pytest.raises(UserError, match="`class_map` maps 'zero' to 'nil'"):
        map_classes(["zero"], ["cat"], {"zero": "nil"})


def test_evaluate_bad_input(tmp_path, judge_build):
    with pytest.raises(UserError, match="Build directory not found"):
        evaluate_judge(tmp_path / "nope", ColorJudge())
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="expected classes.json"):
        evaluate_judge(tmp_path / "empty", ColorJudge())
    with pytest.raises(UserError, match="`methods` mcti not in the build"):
        evaluate_judge(judge_build, ColorJudge(), methods=["mcti"])
    with pytest.raises(UserError, match="`batch_size` must be > 0"):
        evaluate_judge(judge_build, ColorJudge(), batch_size=0)


# ----------------------------------------------------------------------------------------------------------------
# FID / KID
# ----------------------------------------------------------------------------------------------------------------
def test_fid_of_a_set_against_itself_is_zero_and_a_shift_costs_its_squared_norm():
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    same = fid_kid(x, x, kid_subsets=20)
    assert abs(same.fid) < 1e-6
    # Equal covariances: FID = ||mu_1 - mu_2||^2 exactly = 8 dims x 0.5^2.
    shifted = fid_kid(x, x + 0.5, kid_subsets=20)
    assert shifted.fid == pytest.approx(2.0, abs=1e-4)
    assert shifted.kid_mean > 10 * abs(same.kid_mean)
    assert fid_kid(x[:50], x[:40] + 0.5).kid_subset_size == 40  # adapted: the default 1000 would fail
    with pytest.raises(UserError, match="at least 2"):
        fid_kid(x[:1], x)


def _noise_images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 200, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]


def test_compute_fid_on_a_build(tmp_path):
    real = _noise_images(30, 0)
    targets = [i % 3 for i in range(30)]
    brighter = [Image.fromarray(np.asarray(im) + 50) for im in real]  # +50 stays below 255
    samples = [{"method": "sd", "class_index": t, "index": i, "image": im} for i, (im, t) in
               enumerate(zip(real, targets))]
    samples += [{"method": "dct", "class_index": t, "index": i, "image": im} for i, (im, t) in
                enumerate(zip(brighter, targets))]
    build = make_build(tmp_path / "b", samples)
    result = compute_fid(build, ImageList(real, targets), features=ColorJudge(), progress=False)
    rows = {r.method: r for r in result.rows}
    assert rows["sd"].fid == pytest.approx(0.0, abs=1e-6)  # the very same images
    assert rows["dct"].fid > 0.01
    assert rows["sd"].kid_subset_size == 30 and result.feature_dim == 6
    assert load_result(build / "eval" / "fid_color-judge.json") == result
    assert "FID" in format_table(result)


def test_inception_without_weights_names_the_fix(tmp_path, monkeypatch, judge_build):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match="(Inception-v3 FID weights not found|needs torch-fidelity).*features='judge'"):
        compute_fid(judge_build, ImageList(_noise_images(4, 0), [2, 3, 4, 5]), features="inception")


class _Untouchable(torch.utils.data.Dataset):
    """A real set whose first read fails the test: what must be refused is refused before any work."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise AssertionError("an image was read before the missing extra was refused")


@pytest.mark.parametrize("missing", ["torchmetrics", "torch_fidelity"])
def test_fid_without_the_eval_extra_is_one_line_before_any_work(judge_build, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    features = "inception" if missing == "torch_fidelity" else ColorJudge()
    with pytest.raises(UserError, match=rf"needs {missing}, which is not installed .*: pip install \"synthaug\[eval\]\""):
        compute_fid(judge_build, _Untouchable(), features=features, progress=False)


def test_the_cli_says_a_missing_extra_in_one_line_with_exit_2(judge_build, monkeypatch, capsys):
    from synthaug.cli import main

    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    assert main(["fid", str(judge_build), "--real", "digits", "--features", "judge"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "synthaug[eval]"' in err


def test_paired_statistics_without_scipy_name_the_extra(monkeypatch):
    from synthaug.evaluate.paired import t_interval

    assert t_interval([1.0, 2.0, 3.0])[0] == 2.0
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    with pytest.raises(UserError, match=r"t-intervals .* needs scipy, which is not installed .*synthaug\[eval\]"):
        t_interval([1.0, 2.0, 3.0])


# ----------------------------------------------------------------------------------------------------------------
# Downstream training protocol (paper Table 2)
# ----------------------------------------------------------------------------------------------------------------
TINY_NET = {"arch": "resnet10t", "arch_kwargs": {"channels": (4, 8, 8, 8), "stem_width": 4}, "pretrained": False}


@pytest.fixture
def downstream_world(tmp_path):
    """3 classes; a build with sd and dct images (4 per class); real train (6 per class) and test (3 per class)."""
    classes = DIGITS[:3]
    rng = np.random.default_rng(0)

    def image(c: int) -> Image.Image:  # class = which channel is bright, plus noise
        a = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
        a[..., c] += 150
        return Image.fromarray(a)

    samples = [{"method": m, "class_index": c, "index": i, "image": image(c)}
               for m in ("sd", "dct") for c in range(3) for i in range(4)]
    build = make_build(tmp_path / "build", samples, classes=classes)
    train = ImageList([image(i % 3) for i in range(18)], [i % 3 for i in range(18)], classes)
    test = ImageList([image(i % 3) for i in range(9)], [i % 3 for i in range(9)], classes)
    return build, train, test


def test_downstream_cells_share_the_few_shot_subset_and_resume(downstream_world, monkeypatch):
    import hashlib

    from synthaug.datasets.fewshot import few_shot_indices
    from synthaug.evaluate import downstream as evaluate

    build, train, test = downstream_world
    result = evaluate.train_downstream(build, train, test=test, shots=[0, 2], seeds=2, steps=2, batch_size=8,
                                       progress=False, **TINY_NET)
    cells = {(c.method, c.shots, c.seed): c for c in result.cells}
    # real-only has no k=0 cell; every other (method, k, seed) is there
    assert sorted(cells) == sorted([("real", 2, 0), ("real", 2, 1)] + [(m, k, s) for m in ("sd", "dct")
                                                                        for k in (0, 2) for s in (0, 1)])
    assert len(list((build / "eval" / "downstream" / "cells").glob("*.json"))) == 10
    for seed in (0, 1):
        expected = hashlib.sha256(json.dumps(few_shot_indices(train.targets, 2, seed)).encode()).hexdigest()
        assert {cells[(m, 2, seed)].real_indices_sha256 for m in ("real", "sd", "dct")} == {expected}
    assert cells[("sd", 2, 0)].real_indices_sha256 != cells[("sd", 2, 1)].real_indices_sha256
    assert (cells[("dct", 2, 0)].train_real, cells[("dct", 2, 0)].train_synthetic) == (6, 12)
    assert (cells[("dct", 0, 0)].train_real, cells[("real", 2, 1)].train_synthetic) == (0, 0)
    assert all(c.steps == 2 and c.test_images == 9 and 0 <= c.top1 <= c.top5 <= 1 for c in result.cells)
    row = next(r for r in result.rows if (r.method, r.shots) == ("sd", 2))
    tops = [cells[("sd", 2, s)].top1 for s in (0, 1)]
    assert row.seeds == 2 and row.top1_mean == pytest.approx(np.mean(tops))
    assert row.top1_std == pytest.approx(np.std(tops, ddof=1))
    assert load_result(build / "eval" / "downstream.json") == result
    assert "k real/class" in format_table(result)

    # Resume: every cell is read back, none retrained.
    def no_training(*a, **k):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(evaluate, "_train_cell", no_training)
    again = evaluate.train_downstream(build, train, test=test, shots=[0, 2], seeds=2, steps=2, batch_size=8,
                                      progress=False, **TINY_NET)
    assert again.cells == result.cells
    with pytest.raises(UserError, match="trained with other settings \\(steps differ\\)"):
        evaluate.train_downstream(build, train, test=test, shots=[2], seeds=1, steps=3, batch_size=8,
                                  progress=False, **TINY_NET)


def test_shots_seed_trains_every_seed_on_the_same_real_images(downstream_world, tmp_path):
    """A few-shot user has exactly k images (and maybe a guide trained on them): `shots_seed` keeps those images in
    every cell, the seeds vary the training only; the protocol records it, so cells of the usual draw never mix in."""
    import hashlib

    from synthaug.datasets.fewshot import few_shot_indices
    from synthaug.evaluate.downstream import train_downstream

    build, train, test = downstream_world
    out = tmp_path / "fixed"
    result = train_downstream(build, train, test=test, methods=["dct"], shots=[2], seeds=2, shots_seed=5, steps=2,
                              batch_size=8, out=out, progress=False, **TINY_NET)
    expected = hashlib.sha256(json.dumps(few_shot_indices(train.targets, 2, 5)).encode()).hexdigest()
    assert few_shot_indices(train.targets, 2, 5) != few_shot_indices(train.targets, 2, 0)
    assert {c.real_indices_sha256 for c in result.cells} == {expected}
    assert {c.seed for c in result.cells} == {0, 1} and all(c.protocol["shots_seed"] == 5 for c in result.cells)
    with pytest.raises(UserError, match="shots_seed differ"):
        train_downstream(build, train, test=test, methods=["dct"], shots=[2], seeds=2, steps=2, batch_size=8,
                         out=out, progress=False, **TINY_NET)


def test_downstream_cell_is_deterministic(downstream_world, tmp_path):
    build, train, test = downstream_world
    runs = []
    for name in ("a", "b"):
        r = evaluate_downstream_once(build, train, test, tmp_path / name)
        runs.append([(c.top1, c.top5) for c in r.cells])
    assert runs[0] == runs[1]


def evaluate_downstream_once(build, train, test, out):
    from synthaug.evaluate.downstream import train_downstream

    return train_downstream(build, train, test=test, methods=["dct"], include_real=False, shots=[2], seeds=[3],
                            steps=3, batch_size=8, out=out, progress=False, **TINY_NET)


def _class_image(rng: np.random.Generator, c: int) -> Image.Image:
    """A 16 px noise image whose channel `c` is bright: class c, learnable from pixels."""
    a = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
    a[..., c] += 150
    return Image.fromarray(a)


def test_downstream_mixing_modes_and_confidence_filter(tmp_path):
    from synthaug.evaluate.downstream import train_downstream

    classes = DIGITS[:3]
    rng = np.random.default_rng(1)
    image = functools.partial(_class_image, rng)

    # guide_prob 0.1, 0.4, 0.7, 1.0 for the 4 images of every class
    samples = [{"method": "dct", "class_index": c, "index": i, "image": image(c), "guide_prob": 0.1 + 0.3 * i}
               for c in range(3) for i in range(4)]
    build = make_build(tmp_path / "build", samples, classes=classes)
    train = ImageList([image(i % 3) for i in range(18)], [i % 3 for i in range(18)], classes)
    test = ImageList([image(i % 3) for i in range(9)], [i % 3 for i in range(9)], classes)

    def run(out, **kw):
        return {(c.method, c.shots): c for c in train_downstream(
            build, train, test=test, shots=[0, 2], seeds=[0], steps=3, batch_size=4, out=tmp_path / out,
            progress=False, **TINY_NET, **kw).cells}

    ratio = run("ratio", mode="ratio", p=0.25)
    # ratio: the 6 real images plus synthetic draws making 25% of the epoch; k = 0 has nothing to mix with: all 12
    assert (ratio[("dct", 2)].train_real, ratio[("dct", 2)].train_synthetic) == (6, 2)
    assert (ratio[("dct", 0)].train_real, ratio[("dct", 0)].train_synthetic) == (0, 12)
    assert ratio[("dct", 2)].protocol["mode"] == "ratio" and ratio[("dct", 2)].protocol["p"] == 0.25
    again = run("ratio-again", mode="ratio", p=0.25)
    assert [(c.top1, c.top5) for c in again.values()] == [(c.top1, c.top5) for c in ratio.values()]  # deterministic

    filtered = run("filtered", min_confidence=0.5)  # keeps the 0.7 and 1.0 images of every class
    assert filtered[("dct", 0)].train_synthetic == 6 and filtered[("dct", 2)].train_synthetic == 6
    assert filtered[("real", 2)].train_synthetic == 0 and filtered[("real", 2)].protocol["min_confidence"] == 0.5
    plain = run("plain")
    assert "mode" not in plain[("dct", 2)].protocol  # the default adds no keys: older cells still resume
    with pytest.raises(UserError, match="trained with other settings \\(mode, p differ\\)"):
        run("plain", mode="replace", p=0.5)


def test_downstream_soft_targets_and_the_linear_learner(tmp_path, downstream_world):
    """Soft targets train on the guide's recorded probabilities and are part of the protocol; a build without them
    is refused before any training, naming the fix; arch='linear' trains logistic regression on the pixels."""
    from synthaug.evaluate.downstream import train_downstream

    classes = DIGITS[:3]
    rng = np.random.default_rng(2)
    image = functools.partial(_class_image, rng)

    samples = [{"method": "dct", "class_index": c, "index": i, "image": image(c), "guide_prob": 0.7,
                "guide_soft_classes": [c, (c + 1) % 3], "guide_soft_probs": [0.7, 0.2]} for c in range(3)
               for i in range(4)]
    build = make_build(tmp_path / "soft-build", samples, classes=classes)
    train = ImageList([image(i % 3) for i in range(18)], [i % 3 for i in range(18)], classes)
    test = ImageList([image(i % 3) for i in range(9)], [i % 3 for i in range(9)], classes)

    def run(out, **kw):
        return {(c.method, c.shots): c for c in train_downstream(
            build, train, test=test, shots=[2], seeds=[0], steps=3, batch_size=4, out=tmp_path / out, mode="ratio",
            progress=False, **{**TINY_NET, **kw}).cells}

    hard, soft = run("hard"), run("soft", targets="soft", temperature=2.0)
    assert "targets" not in hard[("dct", 2)].protocol  # the default adds no keys: older cells still resume
    assert (soft[("dct", 2)].protocol["targets"], soft[("dct", 2)].protocol["temperature"]) == ("soft", 2.0)
    assert run("soft", targets="soft", temperature=2.0) == soft  # resumed: the same cells
    with pytest.raises(UserError, match="targets, temperature differ"):
        run("soft")
    linear = run("linear", arch="linear", pretrained="auto", arch_kwargs=None)
    assert linear[("dct", 2)].protocol["arch"] == "linear" and 0 <= linear[("dct", 2)].top1 <= 1

    old_build, old_train, old_test = downstream_world  # made without soft labels
    with pytest.raises(UserError, match=r"targets='soft' needs the guide's probabilities .* --overwrite"):
        train_downstream(old_build, old_train, test=old_test, shots=[2], seeds=1, steps=1, targets="soft",
                         progress=False, **TINY_NET)
    with pytest.raises(UserError, match="`targets` must be one of hard, soft but is 'probs'"):
        train_downstream(build, train, test=test, targets="probs")


def test_downstream_bad_input(downstream_world):
    from synthaug.evaluate.downstream import train_downstream

    build, train, test = downstream_world
    with pytest.raises(UserError, match="`shots` must be a non-empty list of integers >= 0"):
        train_downstream(build, train, test=test, shots=[-1])
    with pytest.raises(UserError, match="`methods` mcti not in the build"):
        train_downstream(build, train, test=test, methods=["mcti"])
    with pytest.raises(UserError, match="`mode` must be one of concat, replace, ratio but is 'mix'"):
        train_downstream(build, train, test=test, mode="mix")
    with pytest.raises(UserError, match=r"`p` must be in \[0, 1\) but is 1.0"):
        train_downstream(build, train, test=test, mode="ratio", p=1.0)
    with pytest.raises(UserError, match=r"`min_confidence` must be in \[0, 1\]"):
        train_downstream(build, train, test=test, min_confidence=2.0)
    with pytest.raises(UserError, match="`arch` 'no_such_net' is not a timm model"):
        train_downstream(build, train, test=test, shots=[2], seeds=1, steps=1, arch="no_such_net", progress=False)
    with pytest.raises(UserError, match="`pretrained` '/nope.pth' is not a file"):
        train_downstream(build, train, test=test, shots=[2], seeds=1, steps=1, arch="resnet10t",
                         pretrained="/nope.pth", progress=False)


@pytest.mark.slow
def test_inception_features_from_a_local_weights_file(tmp_path, monkeypatch):
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    # Random weights in the real file format: build the network without its download, save its state dict.
    with monkeypatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), weights)

    real = _noise_images(6, 0)
    samples = [{"method": "sd", "class_index": 2, "index": i, "image": im} for i, im in enumerate(real)]
    samples += [{"method": "dct", "class_index": 2, "index": i, "image": im} for i, im in enumerate(_noise_images(6, 1))]
    build = make_build(tmp_path / "b", samples)
    result = compute_fid(build, ImageList(real, [2] * 6), features="inception", inception_weights=weights,
                         progress=False)
    rows = {r.method: r for r in result.rows}
    assert (result.features, result.feature_dim) == ("inception", 2048)
    assert rows["sd"].fid < rows["dct"].fid
    assert rows["sd"].fid == pytest.approx(0.0, abs=1e-2 * rows["dct"].fid)
    assert (build / "eval" / "fid.json").is_file()


# ----------------------------------------------------------------------------------------------------------------
# iNat179: a CUB build scored by an iNat judge (Table 1) and trained with iNat images (Table 2)
# ----------------------------------------------------------------------------------------------------------------
CUB4 = ["Black footed Albatross", "Laysan Albatross", "Cardinal", "Sooty Albatross"]


@pytest.fixture
def inat179_world(tmp_path):
    """A CUB-named build (4 classes, sd + dct, 3 images each) and an iNat 2021 copy with 5 species, 3 of them CUB's.

    Every image encodes, for `ColorJudge`, the judge index of its own species (judge labels: iNat folder names in
    reverse order), so a right class mapping scores 100% and any other mapping less.
    """
    from test_datasets import INAT_SPECIES, _png, _write_categories

    inat = tmp_path / "inat"
    for version, n in (("2021_train_mini", 3), ("2021_valid", 2)):
        for i, (folder, _) in enumerate(INAT_SPECIES):
            for k in range(n):
                _png(inat / version / folder / f"img{k}.jpg", 40 * i + k)
    _write_categories(inat)
    judge_labels = [f for f, _ in INAT_SPECIES][::-1]
    species_of_cub = {0: 0, 1: 1, 2: 2}  # CUB class -> INAT_SPECIES row (Sooty Albatross has none)
    samples = [{"method": m, "class_index": c, "index": s,
                "image": color_image(judge_labels.index(INAT_SPECIES[species_of_cub.get(c, 3)][0]))}
               for m in ("sd", "dct") for c in range(4) for s in range(3)]
    build = make_build(tmp_path / "build", samples, classes=CUB4, guide="cub-guide")
    return build, inat, judge_labels


def test_inat179_table1_maps_cub_names_to_taxon_labels(inat179_world):
    build, inat, judge_labels = inat179_world
    result = evaluate_judge(build, ColorJudge(judge_labels, source="inat-judge"), class_map=f"inat179:{inat}",
                            progress=False, write_back=False)
    assert (result.class_mapping, result.shared_classes, result.total_classes) == ("map", 3, 4)
    assert result.unmapped_classes == ["Sooty Albatross"]  # no iNat species: reported, left out of every score
    assert all(m.top1 == 1.0 and m.images == 9 for m in result.methods)
    # The shipped map alone knows common names only: a judge labelled by taxon names shares nothing with it.
    with pytest.raises(UserError, match="shares no class names"):
        evaluate_judge(build, ColorJudge(judge_labels), class_map="inat179", progress=False, write_back=False)
    # A judge with common names needs no iNat copy ("Cardinal" -> "Northern Cardinal" through the shipped map).
    common = ["Fly Agaric", "Dog Rose", "Northern Cardinal", "Laysan Albatross", "Black-footed Albatross"]
    assert evaluate_judge(build, ColorJudge(common), class_map="inat179", progress=False,
                          write_back=False).methods[0].top1 == 1.0


def test_inat179_table1_with_a_saved_timm_judge_labelled_by_species(inat179_world, tmp_path):
    """The real loading path: a timm directory whose label names are iNat scientific names."""
    import timm
    from timm.models import save_for_hf

    build, inat, _ = inat179_world
    scientific = ["Amanita muscaria", "Rosa canina", "Cardinalis cardinalis", "Phoebastria immutabilis",
                  "Phoebastria nigripes"]
    model = timm.create_model("test_efficientnet", num_classes=5)
    save_for_hf(model, str(tmp_path / "judge"), model_config={"label_names": scientific},
                data_config={"input_size": (3, 16, 16), "interpolation": "bilinear", "mean": (0.5,) * 3,
                             "std": (0.5,) * 3, "crop_pct": 1.0}, safe_serialization=True)
    result = evaluate_judge(build, str(tmp_path / "judge"), class_map=f"inat179:{inat}", device="cpu",
                            progress=False, write_back=False)
    assert (result.shared_classes, result.unmapped_classes) == (3, ["Sooty Albatross"])
    per_class = {c.class_name for c in result.per_class}
    assert per_class == {"Black footed Albatross", "Laysan Albatross", "Cardinal"}


def test_inat179_table2_trains_on_inat_images_with_cub_tokens(inat179_world):
    from synthaug.evaluate.downstream import DownstreamConfig, train_downstream

    build, inat, _ = inat179_world
    config = DownstreamConfig(shots=[1], seeds=1, steps=2, batch_size=4, methods=["dct"], **TINY_NET)
    result = train_downstream(build, "inat179", config, root=str(inat), progress=False)
    cell = next(c for c in result.cells if c.method == "dct")
    assert cell.protocol["test_split"] == "val" and cell.test_images == 6  # iNat has no test split
    assert cell.protocol["class_map"] == {"Black footed Albatross": 0, "Laysan Albatross": 1, "Cardinal": 2}
    assert (cell.train_real, cell.train_synthetic) == (3, 9)  # Sooty Albatross's images have no iNat class
    with pytest.raises(UserError, match="`test_split` must be one of train, train_full, val for dataset 'inat179' "
                                        "but is 'test'"):
        train_downstream(build, "inat179", config, root=str(inat), test_split="test", progress=False)


def test_fid_max_images_covers_every_class(tmp_path):
    from synthaug.datasets.fewshot import stratified_indices

    targets = [0] * 10 + [1] * 10 + [2] * 10  # sorted by class, as builds and datasets are
    picked = stratified_indices(targets, 6, seed=0)
    assert sorted(np.bincount([targets[i] for i in picked])) == [2, 2, 2]
    assert picked == stratified_indices(targets, 6, seed=0) != stratified_indices(targets, 6, seed=1)
    real = _noise_images(30, 0)
    build = make_build(tmp_path / "b", [{"method": "sd", "class_index": t, "index": i, "image": im}
                                        for i, (im, t) in enumerate(zip(real, targets))])
    result = compute_fid(build, ImageList(real, targets), features=ColorJudge(), max_images=6, batch_size=64,
                         progress=False)
    assert result.rows[0].fake_images == result.rows[0].real_images == 6
    assert result.rows[0].fid == pytest.approx(0.0, abs=1e-6)  # the same images picked on both sides


def test_downstream_records_the_weights_loaded(downstream_world, tmp_path):
    import timm
    from safetensors.torch import save_file

    from synthaug.evaluate.downstream import train_downstream

    build, train, test = downstream_world

    net = timm.create_model("resnet10t", num_classes=3, **TINY_NET["arch_kwargs"])
    save_file(net.state_dict(), tmp_path / "w.safetensors")
    kw = {"test": test, "methods": ["dct"], "include_real": False, "shots": [2], "seeds": 1, "steps": 1,
          "batch_size": 8, "progress": False, "arch": "resnet10t", "arch_kwargs": TINY_NET["arch_kwargs"]}
    scratch = train_downstream(build, train, pretrained="auto", out=tmp_path / "o", **kw).cells[0]
    assert scratch.protocol["pretrained"] is None and scratch.pretrained is False  # nothing on disk: from scratch
    with pytest.raises(UserError, match=r"trained with other settings \(pretrained differ\)"):
        train_downstream(build, train, pretrained=str(tmp_path / "w.safetensors"), out=tmp_path / "o", **kw)
    loaded = train_downstream(build, train, pretrained=str(tmp_path / "w.safetensors"), out=tmp_path / "p",
                              **kw).cells[0]
    assert loaded.pretrained is True and loaded.protocol["pretrained"].startswith("sha256:")
    # A cell saved before the weights were recorded ("auto", nothing loaded) resumes as "from scratch".
    cell = tmp_path / "o" / "downstream" / "cells" / "dct-k2-s0.json"
    old = json.loads(cell.read_text())
    old["protocol"]["pretrained"] = "auto"
    cell.write_text(json.dumps(old))
    assert train_downstream(build, train, pretrained=False, out=tmp_path / "o", **kw).cells[0].top1 == scratch.top1


def test_a_build_of_selected_classes_is_judged_by_class_index(tmp_path):
    """classes.json of a `classes: 4,8` build lists those two, with the dataset's indices."""
    samples = [{"method": m, "class_index": c, "index": s, "image": color_image(c)} for m in ("sd", "dct")
               for c in (4, 8) for s in range(2)]
    build = make_build(tmp_path / "b", samples)
    rows = json.loads((build / "classes.json").read_text())
    (build / "classes.json").write_text(json.dumps([r for r in rows if r["index"] in (4, 8)]))
    result = evaluate_judge(build, ColorJudge(), progress=False, write_back=False)
    assert [(m.method, m.images, m.top1) for m in result.methods] == [("sd", 4, 1.0), ("dct", 4, 1.0)]


def test_a_cell_of_two_methods_together_takes_each_in_turn(downstream_world, tmp_path):
    from synthaug.evaluate.downstream import train_downstream

    build, train, test = downstream_world
    kw = {"test": test, "include_real": False, "shots": [2], "seeds": 1, "steps": 1, "batch_size": 8,
          "progress": False, "arch": "linear", "synthetic_per_class": 2}
    cell = train_downstream(build, train, methods=["dct+sd"], out=tmp_path / "o", **kw).cells[0]
    alone = train_downstream(build, train, methods=["dct"], out=tmp_path / "p", **kw).cells[0]
    assert cell.method == "dct+sd" and cell.train_synthetic == alone.train_synthetic  # the same count, both methods
    with pytest.raises(UserError, match=r"`methods` dct\+ti not in the build"):
        train_downstream(build, train, methods=["dct+ti"], out=tmp_path / "q", **kw)
