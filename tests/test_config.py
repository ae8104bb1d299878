"""Config: YAML keys = field names, overrides, unknown keys rejected, presets, validation messages."""

import pytest

from synthaug.config import BuildConfig, diff, dump_yaml, from_dict, get, load_config, parse_overrides, to_dict
from synthaug.errors import UserError


def test_defaults_and_paper_lr():
    cfg = load_config()
    assert isinstance(cfg, BuildConfig)
    assert cfg.dataset == "digits" and cfg.method == "dct"
    # lr = 0.00025 * batch (DCT appendix D) unless given
    cub = load_config(overrides={"dataset": "cub"})
    assert cub.dct.learning_rate == pytest.approx(0.00025 * 5)
    assert load_config(overrides={"dataset": "cub", "dct.batch_size": 4}).dct.learning_rate == pytest.approx(0.001)


def test_paper_preset_matches_appendix_d():
    cfg = load_config(preset="paper")
    d = cfg.dct
    assert (d.guidance_scale, d.num_inference_steps, d.height, d.width, d.batch_size) == (7.0, 50, 512, 512, 5)
    assert (d.grad_clip, d.max_steps, d.patience, d.patience_min_accuracy) == (1.0, 200, 20, 0.5)
    assert d.prompts == ("A high-resolution realistic image of a {token} {label}", "A photo of {token} {label}")


def test_fast_preset_halves_the_unet_calls_on_stable_diffusion_and_on_digits():
    from synthaug.config import PRESET_VARIANTS

    # Stable Diffusion datasets: the paper's settings, DPM-Solver++ at 20 (token) / 25 (images) steps
    paper, fast = load_config(overrides={"dataset": "cub"}), load_config(preset="fast", overrides={"dataset": "cub"})
    assert (fast.scheduler, fast.dct.num_inference_steps, fast.generate.num_inference_steps) == ("dpmsolver++", 20, 25)
    assert 2 * fast.generate.num_inference_steps <= paper.generate.num_inference_steps
    assert 2 * fast.dct.num_inference_steps * fast.dct.max_steps <= paper.dct.num_inference_steps * paper.dct.max_steps
    same = ("dct.max_steps", "dct.patience", "dct.height", "dct.batch_size", "dct.guidance_scale", "dct.prompts", "dct.checkpointing", "dct.init_token",
            "generate.height", "generate.guidance_scale", "model", "guide", "dtype")
    assert all(get(fast, k) == get(paper, k) for k in same)
    # digits: the preset's own values on the world's defaults (32 px, x0 loss, validation), the same relative cut
    dflt, dfast = load_config(), load_config(preset="fast")
    assert dfast.scheduler == "dpmsolver++" and dfast.dct.height == 32 and dfast.dct.x0_weight == dflt.dct.x0_weight
    # 5 steps from pure noise (t=999) on digits; Stable Diffusion keeps the model's spacing
    assert (dfast.timestep_spacing, fast.timestep_spacing, dflt.timestep_spacing) == ("linspace", None, None)
    assert 2 * dfast.generate.num_inference_steps <= dflt.generate.num_inference_steps
    assert 2 * dfast.dct.num_inference_steps * dfast.dct.max_steps <= dflt.dct.num_inference_steps * dflt.dct.max_steps
    assert diff(dflt, dfast) == sorted(PRESET_VARIANTS["fast"]["digits"])
    # the file and the flags still beat the preset; a YAML `preset: fast` is the same as --preset fast
    assert load_config(preset="fast", overrides={"generate.num_inference_steps": 7}).generate.num_inference_steps == 7
    assert load_config(preset="fast", overrides={"dataset": "cub", "scheduler": "ddim"}).scheduler == "ddim"


def test_preset_in_a_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dataset: cub\npreset: fast\n")
    assert load_config(p) == load_config(preset="fast", overrides={"dataset": "cub"})


def test_yaml_file_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("per_class: 7\ndct:\n  lr: 0.01\n  max_steps: 3\nrun:\n  executor: local\n")
    cfg = load_config(p, parse_overrides(["dct.max_steps=5", "baseline=true"]))
    assert cfg.per_class == 7 and cfg.dct.lr == 0.01 and cfg.dct.max_steps == 5 and cfg.baseline is True
    assert cfg.run.executor == "local"


def test_roundtrip_and_diff(tmp_path):
    cfg = load_config(overrides={"per_class": 3, "dct.prompts": ["a {token} {label}"]})
    import yaml

    again = from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg
    other = load_config(overrides={"per_class": 4, "dct.lr": 0.1})
    assert diff(cfg, other) == ["dct.lr", "dct.prompts", "per_class"]
    assert diff(cfg, other, ignore=("dct",)) == ["per_class"]
    assert to_dict(cfg)["dct"]["prompts"] == ["a {token} {label}"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"per_clas": 3}, r"Unknown config key\(s\) per_clas .*valid keys are"),
        ({"dct.lrr": 3}, r"Unknown config key\(s\) dct.lrr in section `dct`"),
        ({"per_class": 0}, r"`per_class` must be > 0 but is 0"),
        ({"per_class": "many"}, r"`per_class` must be an integer but is 'many'"),
        ({"dct.height": 500}, r"`dct.height` and `dct.width` have to be positive and divisible by 8 but are 500"),
        ({"method": "lora"}, r"`method` must be one of dct, ti, mcti but is 'lora'"),
        ({"scheduler": "heun2"}, r"`scheduler` must be one of ddim.* but is 'heun2'"),
        ({"dct.grad_steps": 99, "dct.num_inference_steps": 10}, r"`dct.grad_steps` must be between 1 and"),
        ({"dct.prompts": ["a photo of {label}"]}, r"has no \{token\} placeholder"),
        ({"baseline": "maybe"}, r"`baseline` must be true or false but is 'maybe'"),
        ({"run.executor": "dask"}, r"`run.executor` must be one of auto, ray, local"),
        ({"dct": 3}, r"`dct` must be a mapping"),
    ],
)
def test_bad_values_name_the_key(overrides, match):
    with pytest.raises(UserError, match=match):
        load_config(overrides=overrides)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match=r"`--config` .*does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("per_class: [1,\n")
    with pytest.raises(UserError, match=r"is not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match=r"`preset` must be one of paper, fast but is 'slow'"):
        load_config(preset="slow")
    with pytest.raises(UserError, match=r"`--set` expects key=value"):
        parse_overrides(["per_class"])


def test_dataset_defaults_layer_under_preset_file_and_flags():
    digits = load_config()
    assert (digits.model, digits.guide, digits.generate.height) == ("digits", "digits-guide", 32)
    # the DCT levers that measured best on the digits world (RESULTS.md "Making the tokens help") ...
    d = digits.dct
    assert (d.prompts, d.x0_weight, d.select, d.max_steps, d.lr) == (("A photo of {token} {label}",), 1.0, "val", 60, 3e-3)
    assert d.prompts[0] == digits.generate.prompt  # trained on the prompt it generates with
    assert (digits.mcti.steps, digits.mcti.extra_steps) == (200, 100)
    cub = load_config(overrides={"dataset": "cub", "root": "data/CUB"})
    assert cub.model == "CompVis/stable-diffusion-v1-4" and cub.guide == "vesteinn/vit-mae-cub"
    assert cub.dct.init_token == "bird" and cub.generate.height == 512  # the paper preset comes with cub
    # ... while Stable Diffusion datasets keep the paper's settings
    assert (cub.dct.x0_weight, cub.dct.select, cub.dct.max_steps, len(cub.dct.prompts)) == (0.0, "min_loss", 200, 2)
    assert "not leak-free" in cub.guide_trained_on
    # an explicit preset beats the dataset defaults; a flag beats both
    assert load_config(preset="paper").generate.height == 512
    assert load_config(preset="paper", overrides={"generate.height": 64}).generate.height == 64


# --------------------------------------------------------------------------------------------------------------------
# Every value checked up front: one-line UserError, never a traceback
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"dct.lr": float("nan")}, r"`dct.lr` must be a finite number but is nan"),
        ({"dct.guidance_scale": float("inf")}, r"`dct.guidance_scale` must be a finite number but is inf"),
        ({"generate.guidance_scale": -1.0}, r"`generate.guidance_scale` must be >= 0 but is -1.0"),
        ({"mcti.lr": -0.1}, r"`mcti.lr` must be > 0 but is -0.1"),
        ({"mcti.scale": 0}, r"`mcti.scale` must be > 0 but is 0.0"),
        ({"dct.grad_clip": float("-inf")}, r"`dct.grad_clip` must be a finite number"),
        ({"dct.x0_weight": -1}, r"`dct.x0_weight` must be >= 0 but is -1.0"),
        ({"mcti.alpha": float("nan")}, r"`mcti.alpha` must be a finite number"),
        ({"dct.val_every": 0}, r"`dct.val_every` must be > 0 but is 0"),
        ({"dct.val_batch_size": 0}, r"`dct.val_batch_size` must be > 0 but is 0"),
        ({"shards.quality": 0}, r"`shards.quality` must be in 1..100 but is 0"),
        ({"shards.quality": 101}, r"`shards.quality` must be in 1..100 but is 101"),
        ({"dct.seed": -1}, r"`dct.seed` must be >= 0 but is -1"),
        ({"generate.seed": 2**64}, r"`generate.seed` must be < 2\*\*63"),
        ({"run.max_in_flight": 0}, r"`run.max_in_flight` must be > 0 \(or null"),
        ({"run.num_workers": -2}, r"`run.num_workers` must be > 0 \(or null"),
        ({"run.ray_address": ""}, r"`run.ray_address` must be null or an address"),
        ({"per_class": "1e400"}, r"`per_class` must be an integer but is '1e400'"),
        ({"per_class": float("inf")}, r"`per_class` must be an integer but is inf"),
        ({"dataset": ["a"]}, r"`dataset` must be a single value, not a list: \['a'\]"),
        ({"guide": {"a": 1}}, r"`guide` must be a single value, not a mapping"),
        ({"guide": ""}, r"`guide` must not be empty"),
        ({"out": " "}, r"`out` must not be empty"),
        ({"dct.init_token": ""}, r"`dct.init_token` must not be empty"),
        ({"dct.prompts": []}, r"`dct.prompts` must hold at least one prompt"),
    ],
)
def test_every_value_is_checked(overrides, match):
    with pytest.raises(UserError, match=match) as info:
        load_config(overrides=overrides)
    assert "\n" not in str(info.value)


def test_yaml_keys_that_are_not_strings(tmp_path):
    for text, match in [("1: 2\n", r"`--config` .* key 1 is not a string"),
                        ("dct:\n  7: 1\n", r"`--config` .* key dct.7 is not a string")]:
        p = tmp_path / "c.yaml"
        p.write_text(text)
        with pytest.raises(UserError, match=match):
            load_config(p)
    with pytest.raises(UserError, match=r"key 3 is not a string"):
        from_dict({3: 1})


def test_set_list_for_a_string_is_one_line():
    with pytest.raises(UserError, match=r"`dataset` must be a single value, not a list"):
        load_config(overrides=parse_overrides(["dataset=[a]"]))


# Property: any value for any key either validates or raises UserError -- never another exception.

def _values():
    from hypothesis import strategies as st

    return st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-3, max_value=300), st.sampled_from([2**63, 2**64, -2**70]),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
        st.sampled_from(["", "{token}", "a {token} {label}", "1e400", "nan", "cuda", "dct", "png", "val", "ray",
                         "[1]", "{x}"]),
        st.lists(st.integers(min_value=-1, max_value=3), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                                      st.integers(), max_size=1),
    )


def _keys():
    cfg = to_dict(BuildConfig())
    keys = sorted(k for k in __import__("synthaug.config", fromlist=["flatten"]).flatten(cfg))
    return keys + ["dct", "run", "bogus", "dct.bogus"]


def test_any_value_validates_or_is_a_user_error():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    # dataset/root stay untouched here: their checks need the data (builder.validate), the CLI test covers them
    keys = [k for k in _keys() if k not in ("dataset",)]

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.dictionaries(st.sampled_from(keys), _values(), min_size=1, max_size=3))
    def check(overrides):
        try:
            cfg = load_config(overrides=overrides)
        except UserError as e:
            assert "\n" not in str(e)
        else:
            assert from_dict(to_dict(cfg)) == cfg  # what validates also round-trips through config.yaml

    check()


def test_named_seed_sets_fix_every_base_seed_and_refuse_a_contradiction():
    """`seeds: report` moves token training, validation and image seeds off the tuning seeds, all at once."""
    from synthaug.config import SEED_SETS

    tune, report = load_config(overrides={"seeds": "tune"}), load_config(overrides={"seeds": "report"})
    for key in SEED_SETS["tune"]:
        assert get(tune, key) == SEED_SETS["tune"][key] != get(report, key) == SEED_SETS["report"][key]
    assert load_config(overrides={"seeds": "report"}) == report  # recorded, so a resume compares it
    with pytest.raises(UserError, match=r"`seeds` is 'report', which fixes dct.seed to 1, but dct.seed is 0"):
        load_config(overrides={"seeds": "report", "dct.seed": 0})
    with pytest.raises(UserError, match=r"`seeds` must be one of tune, report"):
        load_config(overrides={"seeds": "final"})


def test_ti_and_mcti_generate_with_the_mcti_prompt_by_default_and_keep_the_label_form_as_an_option():
    from synthaug.config import load_config

    assert load_config(overrides={"method": "mcti"}).generate.prompt == "A photo of a {token}"
    assert load_config(overrides={"method": "ti"}).generate.prompt == "A photo of a {token}"
    assert load_config().generate.prompt == "A photo of {token} {label}"  # DCT: the token beside the class name
    label_form = load_config(overrides={"method": "ti", "generate.prompt": "A photo of {token} {label}",
                                        "baseline": True})
    assert label_form.generate.prompt == "A photo of {token} {label}" and label_form.baseline


def test_a_baseline_needs_a_class_name_in_the_prompt():
    from synthaug.config import load_config

    with pytest.raises(UserError, match=r"^`baseline` needs a class name in `generate.prompt` 'A photo of a \{token\}'"):
        load_config(overrides={"method": "mcti", "baseline": True})


@pytest.mark.parametrize("key, value, match", [
    ("dct.batch_size", 99999999999999999999, (r"`dct.batch_size` must be <= 4,096 \(a batch\) but is "
                                             r"99,999,999,999,999,999,999: a value that large can only be a mistake")),
    ("dct.max_steps", 10**9, r"`dct.max_steps` must be <= 10,000,000 \(updates\) but is 1,000,000,000"),
    ("generate.batch_size", 10**6, r"`generate.batch_size` must be <= 4,096"),
    ("generate.num_inference_steps", 10**5, r"`generate.num_inference_steps` must be <= 10,000 \(denoising steps\)"),
    ("shots", 10**7, r"`shots` must be <= 1,000,000 \(images per class\)"),
])
def test_counts_too_large_to_be_meant_are_refused_naming_the_limit(key, value, match):
    with pytest.raises(UserError, match=match):
        load_config(overrides={key: value})
    load_config(overrides={key: 8})  # an ordinary value passes


@pytest.mark.parametrize("pair, match", [("=1", r"`--set` '=1' has an empty key: name the setting"),
                                         (" =1", "has an empty key:"),
                                         ("dct.=1", r"`--set` 'dct.=1' has an empty key part"),
                                         (".lr=1", "has an empty key part")])
def test_an_empty_set_key_is_named(pair, match):
    with pytest.raises(UserError, match=match):
        parse_overrides([pair])


def test_the_default_out_names_the_dataset(tmp_path):
    assert load_config().out == "out/digits"
    assert load_config(overrides={"dataset": "cub", "root": str(tmp_path)}).out == "out/cub"
    assert load_config(overrides={"dataset": "cub", "out": "mine"}).out == "mine"  # given: kept
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: flowers102\nout: elsewhere\n")
    assert load_config(cfg).out == "elsewhere"


def test_a_misspelt_key_or_dataset_gets_a_did_you_mean():
    with pytest.raises(UserError, match=r"Unknown config key\(s\) dct.lrr in section `dct`: did you mean dct.lr"):
        load_config(overrides={"dct.lrr": 1})
    with pytest.raises(UserError, match=r"`dataset` must be one of .* but is 'flower102': did you mean 'flowers102'\?"):
        load_config(overrides={"dataset": "flower102"})
