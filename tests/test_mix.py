"""SynthAugDataset: counts and class balance of every mixing mode, filters, class alignment, DataLoader workers."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from synthaug.datasets.digits import Digits
from synthaug.errors import UserError
from synthaug.generation import GeneratedImage
from synthaug.index import merge_index
from synthaug.mix import SynthAugDataset
from synthaug.shards import ShardError, write_shard

SYN = 16  # synthetic images are 16 px, real digits 32 px: an item's size tells where it came from


def _image(class_index, index, method):
    rng = np.random.default_rng([class_index, index, len(method)])
    return Image.fromarray(rng.integers(0, 256, (SYN, SYN, 3), dtype=np.uint8))


def _sample(class_index, index, method, guide_prob):
    return GeneratedImage(
        image=_image(class_index, index, method), class_index=class_index,
        class_name=Digits.classes[class_index], method=method, index=index, prompt="p", seed=index,
        token_sha256=None, model_id="tiny", scheduler="DDIMScheduler", steps=2, guidance_scale=7.0, height=SYN,
        width=SYN, guide_prob=guide_prob, guide_top5=None,
    )


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """Classes 0-2 ("zero".."two"): 6 dct images each (guide_prob 0.1..0.6) and, for class 0, 6 sd images."""
    root = tmp_path_factory.mktemp("build")
    for c in range(3):
        write_shard(root, c, [_sample(c, i, "dct", 0.1 * (i + 1)) for i in range(6)])
    write_shard(root, 3, [_sample(0, i, "sd", None) for i in range(6)])
    merge_index(root, classes=[{"index": i, "name": n} for i, n in enumerate(Digits.classes)])
    return root


@pytest.fixture(scope="module")
def real():
    return Digits(split="test")


def _kinds(ds):
    return [ds.source(i).kind for i in range(len(ds))]


def size_of(img):
    return torch.tensor(img.size)


def test_synthetic_only(out):
    ds = SynthAugDataset(out)
    assert len(ds) == 24 and ds.classes == list(Digits.classes)
    assert np.bincount(ds.targets).tolist() == [12, 6, 6]
    img, target = ds[0]
    assert img.size == (SYN, SYN) and img.mode == "RGB" and target == 0
    assert ds.samples[0] == ("shards/dct-00000.tar#dct-c000-s00000", 0)
    assert "Synthetic: 24 images in 3 classes (methods: dct, sd)" in repr(ds)


def test_default_methods_are_the_builds_own_the_baseline_only_when_asked(reference, tmp_path):
    """A --baseline build: the plain-prompt images are there to measure against, never mixed in by default."""
    ds = SynthAugDataset(reference)
    assert len(ds) == 12 and set(ds.synthetic["method"]) == {"dct"} and ds.methods == ["dct"]
    assert not any(k.startswith("sd-") for k in ds.synthetic["key"])
    assert set(SynthAugDataset(reference, methods=["sd"]).synthetic["method"]) == {"sd"}
    everything = SynthAugDataset(reference, methods="all")
    assert len(everything) == 24 and set(everything.synthetic["method"]) == {"dct", "sd"} and everything.methods is None
    # a build still running (no _info.json yet): its config.yaml names the method
    import shutil

    running = tmp_path / "running"
    shutil.copytree(reference, running)
    (running / "_info.json").unlink()
    assert set(SynthAugDataset(running).synthetic["method"]) == {"dct"}


def test_filters_and_cap(out):
    dct = SynthAugDataset(out, methods=["dct"])
    assert len(dct) == 18 and set(dct.synthetic["method"]) == {"dct"}
    confident = SynthAugDataset(out, min_confidence=0.45)  # 0.5 and 0.6 of each class; sd has no guide_prob
    assert len(confident) == 6 and sorted(confident.synthetic["index"]) == [4, 4, 4, 5, 5, 5]
    capped = SynthAugDataset(out, synthetic_per_class=2)
    assert np.bincount(capped.targets).tolist() == [2, 2, 2]
    assert capped.synthetic["index"] == [0, 0, 0, 1, 1, 1][:2] + [0, 1, 0, 1]  # lowest indices first
    assert capped.synthetic["method"][:2] == ["dct", "sd"]  # class 0: index 0 of both methods
    with pytest.raises(UserError, match=r"`methods` must be among dct, sd, ti, mcti \(or \"all\"\) but contains \['dtc'\]"):
        SynthAugDataset(out, methods=["dtc"])
    with pytest.raises(UserError, match="No synthetic images in .* match methods=\\['mcti'\\]"):
        SynthAugDataset(out, methods=["mcti"])


def test_per_class_methods_and_a_cap_that_keeps_the_guides_surest(out):
    # class 0 ("zero") from the plain prompt, the others from the token: "token images only where plain ones fail"
    mixed = SynthAugDataset(out, methods=["dct"], class_methods={"zero": ["sd"]})
    assert np.bincount(mixed.targets).tolist() == [6, 6, 6]
    assert {m for m, c in zip(mixed.synthetic["method"], mixed.synthetic["class_index"]) if c == 0} == {"sd"}
    assert {m for m, c in zip(mixed.synthetic["method"], mixed.synthetic["class_index"]) if c > 0} == {"dct"}
    assert SynthAugDataset(out, methods=["dct"], class_methods={0: "sd"}).synthetic == mixed.synthetic  # by index
    surest = SynthAugDataset(out, methods=["dct"], synthetic_per_class=2, rank="confidence")
    assert surest.synthetic["index"] == [5, 4] * 3  # guide_prob 0.6 and 0.5 of every class, surest first
    assert SynthAugDataset(out, methods=["dct"], synthetic_per_class=2).synthetic["index"] == [0, 1] * 3
    unsure = SynthAugDataset(out, methods="all", synthetic_per_class=7, rank="confidence")  # sd has no guide_prob
    zero = [m for m, c in zip(unsure.synthetic["method"], unsure.synthetic["class_index"]) if c == 0]
    assert zero == ["dct"] * 6 + ["sd"]  # images without a probability come last
    with pytest.raises(UserError, match=r"`rank` must be one of index, confidence but is 'best'"):
        SynthAugDataset(out, rank="best")
    with pytest.raises(UserError, match=r"`class_methods` names class 'eleven', which the build has no images of"):
        SynthAugDataset(out, class_methods={"eleven": ["dct"]})
    with pytest.raises(UserError, match=r"`class_methods` 'zero': methods must be a non-empty list among"):
        SynthAugDataset(out, class_methods={"zero": ["plain"]})
    with pytest.raises(UserError, match=r"`class_methods` asks for methods \['mcti'\] but the build has"):
        SynthAugDataset(out, class_methods={"zero": ["mcti"]})


def test_concat_counts_and_balance(out, real):
    ds = SynthAugDataset(out, real=real, shots=2, methods=["dct"], seed=0)
    assert len(ds) == 20 + 18
    assert _kinds(ds) == ["real"] * 20 + ["synthetic"] * 18
    assert np.bincount(ds.targets).tolist() == [8, 8, 8] + [2] * 7  # 2 real + 6 synthetic for classes 0-2
    assert ds[0][0].size == (32, 32) and ds[20][0].size == (SYN, SYN)
    assert [ds[i][1] for i in range(len(ds))] == ds.targets
    assert ds.samples[0][0].startswith("digits/test/")
    none = SynthAugDataset(out, real=real, shots=0)  # zero-shot: the real classes only name the labels
    assert len(none) == 24 and none.classes == list(Digits.classes)
    everything = SynthAugDataset(out, real=real, methods="dct")
    assert len(everything) == len(real) + 18


def test_replace_mode_probability_balance_and_epochs(out, real):
    ds = SynthAugDataset(out, real=real, shots=20, mode="replace", p=0.5, methods=["dct"], seed=3)
    assert len(ds) == 200
    kinds = _kinds(ds)
    targets = ds.targets
    syn = [i for i, k in enumerate(kinds) if k == "synthetic"]
    assert all(targets[i] in (0, 1, 2) for i in syn)  # classes without synthetic images always serve real ones
    assert 18 <= len(syn) <= 42  # 60 eligible items at p=0.5 (binomial, ±3 sd)
    for i in range(len(ds)):  # a replaced item keeps its class
        assert ds.source(i).target == targets[i]
    again = SynthAugDataset(out, real=real, shots=20, mode="replace", p=0.5, methods=["dct"], seed=3)
    assert [again.source(i) for i in range(len(ds))] == [ds.source(i) for i in range(len(ds))]
    ds.set_epoch(1)
    assert _kinds(ds) != kinds and ds.epoch == 1
    always = SynthAugDataset(out, real=real, shots=2, mode="replace", p=1.0, methods=["dct"])
    assert [k == "synthetic" for k in _kinds(always)] == [t < 3 for t in always.targets]


def test_ratio_mode_fraction_balance_and_epochs(out, real):
    ds = SynthAugDataset(out, real=real, shots=3, mode="ratio", p=0.25, methods=["dct"], seed=1)
    assert len(ds) == 30 + 10  # 10 synthetic = 25% of the epoch
    kinds = _kinds(ds)
    assert kinds.count("synthetic") == 10
    counts = np.bincount(ds.targets[30:], minlength=3).tolist()
    assert sorted(counts) == [3, 3, 4]  # balanced over the 3 classes that have synthetic images
    first = [ds.source(i).index for i in range(30, 40)]
    ds.set_epoch(1)
    second = [ds.source(i).index for i in range(30, 40)]
    assert first != second
    ds.set_epoch(0)
    assert [ds.source(i).index for i in range(30, 40)] == first
    # a class with fewer synthetic images than its share cycles through them
    big = SynthAugDataset(out, real=real, shots=25, mode="ratio", p=0.5, methods=["dct"])
    assert len(big) == 500 and sorted(np.bincount(big.targets[250:]).tolist()) == [83, 83, 84]
    rows = [big.source(i).index for i in range(250, 500)]
    assert sorted(np.bincount(rows).tolist()) == [13] * 2 + [14] * 16  # every image used 13-14 times, none left out


def test_mode_errors(out, real):
    with pytest.raises(UserError, match="`mode` must be one of concat, replace, ratio but is 'mix'"):
        SynthAugDataset(out, mode="mix")
    with pytest.raises(UserError, match=r"mode='replace' mixes synthetic images into real ones, but there are no "
                                        r"real images \(real=None"):
        SynthAugDataset(out, mode="replace")
    with pytest.raises(UserError, match=r"`p` must be in \[0, 1\) for mode='ratio' but is 1.0"):
        SynthAugDataset(out, real=real, mode="ratio", p=1.0)
    with pytest.raises(UserError, match="`synthetic_per_class` must be >= 0"):
        SynthAugDataset(out, synthetic_per_class=-1)
    with pytest.raises(UserError, match="No synthetic data at .*: expected index.parquet"):
        SynthAugDataset(out / "missing")


def test_class_alignment_is_checked(out, tmp_path):
    class Birds(torch.utils.data.Dataset):
        classes = ("albatross", "one", "two")
        targets = (0, 1, 2)

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return Image.new("RGB", (32, 32)), self.targets[i]

    with pytest.raises(UserError, match=r"Class indices of .* and the real dataset disagree \(1 classes; 0: "
                                        r"synthetic 'zero' vs real 'albatross'\)"):
        SynthAugDataset(out, real=Birds())
    assert len(SynthAugDataset(out, real=Birds(), check_classes=False)) == 3 + 24

    class Few(Birds):
        classes = ("zero", "one")

    with pytest.raises(UserError, match="2: synthetic 'two' vs real None"):
        SynthAugDataset(out, real=Few())

    class Nameless(torch.utils.data.Dataset):
        targets = (0,)

    with pytest.raises(UserError, match="`real` \\(Nameless\\) has no `classes`"):
        SynthAugDataset(out, real=Nameless())


def test_dataloader_workers_match_the_main_process(out, real):
    ds = SynthAugDataset(out, real=real, shots=2, mode="replace", p=0.5, methods=["dct"], seed=5,
                         transform=size_of)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        ds.set_epoch(epoch)  # reaches the persistent workers through shared memory
        sizes, targets = zip(*[(s, t) for sb, tb in loader for s, t in zip(sb.tolist(), tb.tolist())])
        expected = [SYN if k == "synthetic" else 32 for k in _kinds(ds)]
        assert [s[0] for s in sizes] == expected and list(targets) == ds.targets
    ratio = SynthAugDataset(out, real=real, shots=2, mode="ratio", p=0.5, methods=["dct"], transform=size_of)
    got = [t for _, tb in torch.utils.data.DataLoader(ratio, batch_size=5, num_workers=2) for t in tb.tolist()]
    assert got == ratio.targets and len(got) == 40


def test_corrupt_shard_error_names_shard_and_command(tmp_path):
    write_shard(tmp_path, 0, [_sample(0, i, "dct", 0.5) for i in range(3)])
    merge_index(tmp_path)
    ds = SynthAugDataset(tmp_path, check_sha256=True)
    tar = tmp_path / "shards" / "dct-00000.tar"
    data = bytearray(tar.read_bytes())
    data[ds._offset[1] + 40] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert ds[0][1] == 0
    with pytest.raises(ShardError, match=r"00000\.tar is corrupt .*delete .*00000_stats\.json and rerun `synthaug "
                                         "build --config"):
        ds[1]
    unchecked = SynthAugDataset(tmp_path)  # without the sha256 check the decoder still refuses the bytes
    with pytest.raises(ShardError, match=r"00000\.tar is corrupt \(dct-c000-s00001: Image  cannot be decoded"):
        unchecked[1]
    tar.write_bytes(bytes(data[:2000]))
    with pytest.raises(ShardError, match=r"00000\.tar is truncated"):
        SynthAugDataset(tmp_path)[2]


@pytest.fixture(scope="module")
def soft_out(tmp_path_factory):
    """Classes 0-1, 2 dct images each, with the guide's soft label: 0.6 on the class, 0.3 on the other one."""
    root = tmp_path_factory.mktemp("soft")
    samples = []
    for c in range(2):
        for i in range(2):
            s = _sample(c, i, "dct", 0.6)
            s.guide_soft_classes, s.guide_soft_probs = [c, 1 - c], [0.6, 0.3]
            samples.append(s)
    write_shard(root, 0, samples)
    merge_index(root, classes=[{"index": i, "name": n} for i, n in enumerate(Digits.classes)])
    return root


def test_soft_targets_guide_labels_for_synthetic_one_hot_for_real(soft_out, real):
    ds = SynthAugDataset(soft_out, real=real, shots=1, targets="soft")
    assert len(ds) == 14 and "Targets: soft (temperature 1)" in repr(ds)
    real_item, syn_item = ds.source(0), ds.source(10)
    assert real_item.kind == "real" and syn_item.kind == "synthetic" and syn_item.target == 0
    one_hot = ds[0][1]
    assert one_hot.dtype == torch.float32 and one_hot.tolist() == np.eye(10)[real_item.target].tolist()
    # stored 0.6 / 0.3, the missing 0.1 spread over the 8 other classes
    assert ds[10][1].tolist() == pytest.approx([0.6, 0.3] + [0.1 / 8] * 8, abs=1e-6)
    assert ds.targets[10] == 0  # `targets` stays the class index (torchvision's convention)
    sharp = SynthAugDataset(soft_out, targets="soft", temperature=0.5)[0][1]
    p = np.array([0.6, 0.3] + [0.1 / 8] * 8) ** 2
    assert sharp.tolist() == pytest.approx((p / p.sum()).tolist(), abs=1e-6)
    # a DataLoader stacks the vectors and soft cross-entropy takes them
    _, y = next(iter(torch.utils.data.DataLoader(
        SynthAugDataset(soft_out, real=real, shots=1, targets="soft", transform=size_of), batch_size=14)))
    assert y.shape == (14, 10) and torch.allclose(y.sum(1), torch.ones(14))
    assert torch.nn.functional.cross_entropy(torch.zeros(14, 10), y).item() == pytest.approx(np.log(10), rel=1e-5)


def test_soft_targets_refused_without_recorded_probabilities(out, soft_out, tmp_path):
    with pytest.raises(UserError, match=r"targets='soft' needs the guide's probabilities .* rebuild it with "
                                        r"`synthaug build --config .*config.yaml --overwrite`, or use targets='hard'"):
        SynthAugDataset(out, targets="soft")
    # an index written before the columns existed still reads, with hard targets
    import shutil

    import pyarrow.parquet as pq

    old = tmp_path / "old"
    shutil.copytree(soft_out, old)
    table = pq.read_table(old / "index.parquet")
    pq.write_table(table.drop_columns(["guide_soft_classes", "guide_soft_probs"]), old / "index.parquet")
    assert SynthAugDataset(old)[0][1] == 0
    with pytest.raises(UserError, match="targets='soft' needs the guide's probabilities"):
        SynthAugDataset(old, targets="soft")
    with pytest.raises(UserError, match=r"`targets` must be one of hard, soft but is 'probs'"):
        SynthAugDataset(soft_out, targets="probs")
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(UserError, match=rf"`temperature` must be a finite number > 0 \(not a bool\) but is "
                                            rf"{re.escape(repr(bad))}"):
            SynthAugDataset(soft_out, targets="soft", temperature=bad)


def test_soft_targets_at_extreme_temperatures_stay_distributions(soft_out):
    stored = np.array([0.6, 0.3] + [0.1 / 8] * 8)
    for t in (1e-5, 1e-4, 1e-300, 5e-324):  # p ** (1/T) underflows every class to 0 here: NaN once renormalised
        y = SynthAugDataset(soft_out, targets="soft", temperature=t)._soft
        assert np.isfinite(y).all() and y[0].tolist() == np.eye(10)[0].tolist()
        assert np.allclose(y.sum(1), 1.0)
    flat = SynthAugDataset(soft_out, targets="soft", temperature=1e300)._soft
    assert flat[0].tolist() == pytest.approx([0.1] * 10)
    mid = SynthAugDataset(soft_out, targets="soft", temperature=np.float32(0.5))[0][1]
    assert mid.tolist() == pytest.approx((stored ** 2 / (stored ** 2).sum()).tolist(), abs=1e-6)


def test_the_default_real_images_are_the_builds_own_k(reference):
    from synthaug.datasets import Digits
    from synthaug.datasets.fewshot import few_shot_indices
    from synthaug.layout import read_config

    real = Digits(split="train")
    built = read_config(reference)
    ds = SynthAugDataset(reference, real=real)
    assert ds._real_index.tolist() == few_shot_indices(real.targets, built["shots"], built["shots_seed"])
    assert len(SynthAugDataset(reference, real=real, shots=None)._real_index) == len(real)  # None: all of them
    assert len(SynthAugDataset(reference, real=real, shots=2)._real_index) == 20
    with pytest.raises(UserError, match=r"`shots` must be an integer >= 0, None .* or 'build'"):
        SynthAugDataset(reference, real=real, shots="five")
