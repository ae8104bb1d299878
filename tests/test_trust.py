"""dct.trust: the per-class check of a token against the user's own real images, and what a build does with it."""

import dataclasses
import json

import buildworld as bw
import pytest
import torch
from fakebuild import ColorJudge, color_image

from synthaug.builder.driver import build
from synthaug.commands import inspect
from synthaug.config import GenerateConfig
from synthaug.errors import UserError
from synthaug.generation import generate
from synthaug.testing import tiny_pipeline
from synthaug.tokens.io import add_tokens
from synthaug.tokens.trust import TrustVerdict, check_token_trust

TOKEN = "<synthaug-003>"


@pytest.fixture(scope="module")
def pipe():
    p = tiny_pipeline(seed=0)
    add_tokens(p, {TOKEN: 50 * torch.randn(1, 32, generator=torch.Generator().manual_seed(0))})
    return p


def test_verdict_follows_the_guide_on_real_images_and_where_the_token_images_land(pipe):
    gen = GenerateConfig(num_inference_steps=2, height=16, width=16, batch_size=4)
    real = {c: [color_image(c, size=16, green=g) for g in (0, 40, 80)] for c in range(6)}
    kw = {"generate": generate, "class_index": 3, "label": "three", "token": TOKEN, "config": gen, "images": 4}
    ok = check_token_trust(pipe, ColorJudge(), real_images=real, **kw)
    assert ok.guide_real_accuracy == 1.0 and ok.real_images == 3 and ok.images == 4
    assert ok.trusted == (ok.token_on_class >= ok.plain_on_class)
    assert check_token_trust(pipe, ColorJudge(), real_images=real, **kw) == ok  # seeded: the same verdict
    assert TrustVerdict.from_json(ok.to_json()) == ok
    # the guide takes this user's threes for fives: whatever the token does, it is not trusted
    confused = {**real, 3: [color_image(5, size=16, green=g) for g in (0, 40, 80)]}
    bad = check_token_trust(pipe, ColorJudge(), real_images=confused, **kw)
    assert not bad.trusted and bad.guide_real_accuracy == 0.0
    assert "the guide recognises 0% of the class's real images" in bad.reason
    assert bad.describe().startswith("NOT trusted (the guide recognises 0%")


def test_the_check_asks_in_the_feature_space_it_is_given(pipe):
    gen = GenerateConfig(num_inference_steps=2, height=16, width=16, batch_size=4)
    real = {c: [color_image(c, size=16, green=g) for g in (0, 40, 80)] for c in range(6)}
    kw = {"generate": generate, "class_index": 3, "label": "three", "token": TOKEN, "config": gen, "images": 4, "real_images": real}
    guide = ColorJudge()
    seen = []

    def space(pixels):
        seen.append(len(pixels))
        return guide.features(pixels)

    in_guide = check_token_trust(pipe, guide, **kw)
    elsewhere = check_token_trust(pipe, guide, features=space, features_name="clip", **kw)
    assert seen == [3] * 6 + [4, 4]  # every class's real images, then the token's and the plain prompt's images
    assert elsewhere.features == "clip" and in_guide.features == "guide"
    assert dataclasses.replace(elsewhere, features="guide") == in_guide
    assert "(clip features)" in elsewhere.describe()


def test_build_checks_in_clips_feature_space_when_asked(tmp_path, world, monkeypatch):
    from synthaug.tokens import trust
    from synthaug.tokens.clip import DIGITS_CLIP

    loaded = []
    real_load = trust.load_clip

    def counted(*args, **kwargs):
        loaded.append(args[0] if args else kwargs.get("clip_model"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(trust, "load_clip", counted)
    out = tmp_path / "clip"
    cfg = bw.config(out, *world, **{"dct.trust": "warn", "shots": 2, "dct.trust_images": 2,
                                    "dct.trust_features": "clip", "mcti.clip_model": str(DIGITS_CLIP)})
    assert build(cfg, progress=False).ok
    assert loaded == [str(DIGITS_CLIP)]  # once per worker, its image tower shared by every class's check
    verdicts = [TrustVerdict.from_json(p.read_text()) for p in sorted((out / "tokens").glob("*_trust.json"))]
    assert len(verdicts) == 3 and {v.features for v in verdicts} == {"clip"}
    classes = json.loads((out / "classes.json").read_text())
    assert {c["trust"]["features"] for c in classes} == {"clip"}
    # a CLIP folder that is not there is one line before any work
    from synthaug.builder.validate import check_build

    missing = bw.config(tmp_path / "missing", *world, **{"dct.trust": "warn", "dct.trust_features": "clip",
                                                          "mcti.clip_model": str(tmp_path / "no-clip")})
    with pytest.raises(UserError, match=r"`mcti.clip_model` .*no-clip' does not exist"):
        check_build(missing, False)


def test_build_fallback_generates_distrusted_classes_with_the_plain_prompt(tmp_path, world):
    out = tmp_path / "build"
    cfg = bw.config(out, *world, **{"dct.trust": "fallback", "shots": 2, "dct.trust_images": 2})
    result = build(cfg, progress=False)
    assert result.ok
    classes = json.loads((out / "classes.json").read_text())
    rows = pq_rows(out)
    for c in classes:
        t = c["trust"]
        assert t["real_images"] == 2 and t["images"] == 2 and t["fallback"] == (not t["trusted"])
        assert json.loads((out / "tokens" / f"{c['index']:03d}_trust.json").read_text())["trusted"] == t["trusted"]
        dct = [r for r in rows if r["class_index"] == c["index"] and r["method"] == "dct"]
        sd = [r for r in rows if r["class_index"] == c["index"] and r["method"] == "sd"]
        if t["fallback"]:  # the plain prompt's images, on the dct rows' own seeds
            assert all(r["token_sha256"] is None and c["token"] not in r["prompt"] for r in dct)
            assert [r["sha256"] for r in dct] == [r["sha256"] for r in sd]
        else:
            assert all(r["token_sha256"] is not None and c["token"] in r["prompt"] for r in dct)
    summary = inspect(out).summary()
    assert "trust check (dct.trust=fallback):" in summary
    assert sum("generated with the plain prompt" in line for line in summary.splitlines()) == sum(
        c["trust"]["fallback"] for c in classes)
    from synthaug.report import write_report

    html = write_report(out, grids=False, progress=False).read_text()
    assert html.count("trusted: guide") + html.count("NOT trusted (") == len(classes)
    from synthaug.layout import build_files  # --overwrite deletes them with the rest of the build

    assert {p.name for p in build_files(out)} >= {f"{c['index']:03d}_trust.json" for c in classes}
    # resumed: the verdicts are read back, nothing changes
    before = bw.snapshot(out)
    assert build(cfg, progress=False).ok and bw.snapshot(out) == before


def test_a_kept_verdict_is_reused_only_with_the_settings_it_was_checked_with(tmp_path, world, monkeypatch):
    import shutil

    from synthaug.tokens import trust as trust_module

    first = tmp_path / "first"
    trust = {"dct.trust": "warn", "shots": 2, "dct.trust_images": 2}
    assert build(bw.config(first, *world, **trust), progress=False).ok
    kept = {p.name: p.read_bytes() for p in (first / "tokens").glob("*_trust.json")}
    assert len(kept) == 3 and all(TrustVerdict.from_json(v).settings_sha256 for v in kept.values())

    checks = []
    real_check = trust_module.check_token_trust

    def counted(*args, **kwargs):
        checks.append(kwargs["class_index"])
        return real_check(*args, **kwargs)

    monkeypatch.setattr(trust_module, "check_token_trust", counted)

    def tokens_without_images(name):  # a build whose config may still change: its tokens (and verdicts), no image
        folder = tmp_path / name
        folder.mkdir()
        for f in ("config.yaml", "plan.json"):
            shutil.copy2(first / f, folder / f)
        shutil.copytree(first / "tokens", folder / "tokens")
        return folder

    same = tokens_without_images("same")
    assert build(bw.config(same, *world, **trust), progress=False).ok
    assert checks == [] and {p.name: p.read_bytes() for p in (same / "tokens").glob("*_trust.json")} == kept
    # other real images for the check (shots_seed): every verdict is checked again, and says so
    other = tokens_without_images("other")
    assert build(bw.config(other, *world, **trust, shots_seed=1), progress=False).ok
    assert sorted(checks) == [0, 1, 2]
    again = {p.name: TrustVerdict.from_json(p.read_text()) for p in (other / "tokens").glob("*_trust.json")}
    assert all(v.settings_sha256 != TrustVerdict.from_json(kept[n]).settings_sha256 for n, v in again.items())
    # a verdict file without the field (an older build) reads, and is checked again
    old = json.loads(kept["000_trust.json"])
    del old["settings_sha256"]
    assert TrustVerdict.from_json(json.dumps(old)).settings_sha256 == ""


def test_trust_setting_is_checked():
    from synthaug.config import BuildConfig, DCTConfig, validate

    with pytest.raises(UserError, match="`dct.trust` must be one of off, warn, fallback but is 'maybe'"):
        validate(BuildConfig(dct=DCTConfig(trust="maybe")))
    with pytest.raises(UserError, match="`dct.trust_features` must be one of guide, clip but is 'pixels'"):
        validate(BuildConfig(dct=DCTConfig(trust_features="pixels")))
    with pytest.raises(UserError, match="`shots` must be > 0 but is 0"):
        validate(BuildConfig(shots=0))
    with pytest.raises(UserError, match="`dct.trust` 'warn' checks DCT tokens, but `method` is 'mcti'"):
        validate(BuildConfig(method="mcti", dct=DCTConfig(trust="warn")))


def pq_rows(out):
    import pyarrow.parquet as pq

    return pq.read_table(out / "index.parquet").to_pylist()


@pytest.mark.parametrize("text, match", [
    ("not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"trusted": "false"}', r"field 'trusted' must be a bool but is 'false'"),
])
def test_a_verdict_file_is_read_field_by_field_with_types(text, match):
    with pytest.raises(ValueError, match=match):
        TrustVerdict.from_json(text)
    good = json.loads(TrustVerdict(True, 1.0, 0.5, 0.5, 2, 2, "").to_json())
    for field, bad in [("trusted", 1), ("token_on_class", "0.5"), ("token_on_class", float("nan")),
                       ("images", 2.5), ("images", True), ("reason", None)]:
        with pytest.raises(ValueError, match=f"field '{field}' must be"):
            TrustVerdict.from_dict({**good, field: bad})
    del good["plain_on_class"]
    with pytest.raises(ValueError, match="field 'plain_on_class' is missing"):
        TrustVerdict.from_dict(good)


def test_a_damaged_verdict_is_checked_again_on_resume_never_blocks_it(tmp_path, world):
    from synthaug.layout import read_plan, shard_paths, trust_path

    out = tmp_path / "build"
    cfg = bw.config(out, *world, **{"dct.trust": "fallback", "shots": 2, "dct.trust_images": 2})
    assert build(cfg, progress=False).ok
    before = bw.snapshot(out)
    task = read_plan(out).jobs[1].shards[0]
    # a verdict that is not JSON, with a shard of its class to redo; a string where the bool belongs, nothing to redo
    trust_path(out, 1).write_text("not json\n")
    shard_paths(out, task.shard_id, task.method).stats.unlink()
    bad = json.loads(trust_path(out, 2).read_text())
    trust_path(out, 2).write_text(json.dumps({**bad, "trusted": "false"}))
    problems = inspect(out, verify=True).problems
    assert any(p.startswith("tokens/001_trust.json: damaged (not JSON") and "synthaug build --config" in p
               for p in problems)
    assert any(p.startswith("tokens/002_trust.json: damaged (field 'trusted' must be a bool") for p in problems)
    result = build(cfg, progress=False)
    assert result.ok and result.images_new == task.size
    assert bw.snapshot(out) == before  # the verdicts checked again are the seeded same
    assert inspect(out, verify=True).problems == []


def test_finalize_names_a_verdict_damaged_under_it(tmp_path, world):
    from synthaug.builder.driver import finalize
    from synthaug.layout import read_plan, trust_path

    out = tmp_path / "build"
    cfg = bw.config(out, *world, **{"dct.trust": "warn", "shots": 2, "dct.trust_images": 2})
    assert build(cfg, progress=False).ok
    trust_path(out, 0).write_text('{"trusted": "false"}')
    with pytest.raises(UserError, match=r"000_trust.json is damaged \(field .* resume with synthaug build --config"):
        finalize(out, cfg, list(read_plan(out).jobs))
