"""Real datasets, torchvision-style: fake trees injected into a temp dir, then length, types, transforms, repr,
few-shot draws and the missing-data messages."""

import json

import numpy as np
import pytest
from PIL import Image

from synthaug.datasets.catalog import DATASET_NAMES, DATASETS, check_split, dataset_splits, get_dataset
from synthaug.datasets.cub import CUB200
from synthaug.datasets.digits import Digits
from synthaug.datasets.fewshot import few_shot, few_shot_indices
from synthaug.datasets.folder import ImageFolder
from synthaug.datasets.imagenet import ImageNet
from synthaug.datasets.inat import INat2021, per_supercategory_sample
from synthaug.errors import UserError
from synthaug.names import clean_class_name


def _png(path, value, size=(12, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)


@pytest.fixture
def cub_root(tmp_path):
    """CUB_200_2011 with 3 classes x 3 images (2 train, 1 test); one grayscale image, as the real set has."""
    root = tmp_path / "CUB_200_2011"
    folders = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    images, labels, split = [], [], []
    image_id = 0
    for c, folder in enumerate(folders):
        for k in range(3):
            image_id += 1
            rel = f"{folder}/{folder[4:]}_{k:04d}.jpg"
            _png(root / "images" / rel, 10 * image_id, mode="L" if image_id == 1 else "RGB")
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {1 if k < 2 else 0}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{i + 1} {f}" for i, f in enumerate(folders)) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    return root


def test_cub_layout_splits_names_and_items(cub_root):
    train = CUB200(cub_root, split="train")
    test = CUB200(cub_root.parent, split="test")  # the folder containing CUB_200_2011 works too
    assert len(train) == 6 and len(test) == 3 and len(CUB200(cub_root, split="all")) == 9
    assert train.classes == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    assert train.folder_names[0] == "001.Black_footed_Albatross"
    assert train.class_to_idx["Sooty Albatross"] == 2
    assert train.targets == [0, 0, 1, 1, 2, 2] and test.targets == [0, 1, 2]
    assert train.image_ids == [1, 2, 4, 5, 7, 8]
    assert train.samples[0][0].endswith("images/001.Black_footed_Albatross/Black_footed_Albatross_0000.jpg")
    img, target = train[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and target == 0  # grayscale file -> RGB
    t = CUB200(cub_root, split="test", transform=lambda im: im.size, target_transform=lambda y: y + 100)
    assert t[1] == ((12, 10), 101)
    assert "Split: test" in repr(t) and "Classes: 3" in repr(t)


def test_cub_missing_and_malformed(cub_root, tmp_path):
    with pytest.raises(UserError, match=r"Dataset not found or corrupted at .*nowhere: expected images\.txt\."):
        CUB200(tmp_path / "nowhere")
    (cub_root / "train_test_split.txt").write_text("1 1\n2 x y\n")
    with pytest.raises(UserError, match="image id 2 to have a class in 1..3 and a split flag 0/1"):
        CUB200(cub_root)
    (cub_root / "image_class_labels.txt").write_text("1 1\nbroken\n")
    with pytest.raises(UserError, match=r"expected image_class_labels\.txt line 2 to read '<id> <value>' but it is "
                                        "'broken'"):
        CUB200(cub_root)
    with pytest.raises(UserError, match="`split` for CUB200 must be one of train, test, all but is 'val'"):
        CUB200(cub_root, split="val")


def test_clean_class_name():
    assert clean_class_name("001.Black_footed_Albatross") == "Black footed Albatross"
    assert clean_class_name("apple_pie") == "apple pie"
    assert clean_class_name("n01440764") == "n01440764"


# iNat 2021: 5 species in 3 supercategories, with iNat's annotation file (common names)
INAT_SPECIES = [
    ("00000_Animalia_Chordata_Aves_Procellariiformes_Diomedeidae_Phoebastria_nigripes", "Black-footed Albatross"),
    ("00001_Animalia_Chordata_Aves_Procellariiformes_Diomedeidae_Phoebastria_immutabilis", "Laysan Albatross"),
    ("00002_Animalia_Chordata_Aves_Passeriformes_Cardinalidae_Cardinalis_cardinalis", "Northern Cardinal"),
    ("00003_Plantae_Tracheophyta_Magnoliopsida_Rosales_Rosaceae_Rosa_canina", "Dog Rose"),
    ("00004_Fungi_Basidiomycota_Agaricomycetes_Agaricales_Amanitaceae_Amanita_muscaria", "Fly Agaric"),
]


@pytest.fixture
def inat_root(tmp_path):
    root = tmp_path / "inat"
    for version, n in (("2021_train_mini", 3), ("2021_valid", 1)):
        for i, (folder, _) in enumerate(INAT_SPECIES):
            for k in range(n):
                _png(root / version / folder / f"img{k}.jpg", 20 * i + k)
    return root


def _write_categories(root):
    cats = [{"id": i, "name": " ".join(f.split("_")[6:]), "common_name": c, "image_dir_name": f,
             "supercategory": {"Animalia": "Birds", "Plantae": "Plants", "Fungi": "Fungi"}[f.split("_")[1]]}
            for i, (f, c) in enumerate(INAT_SPECIES)]
    (root / "val.json").write_text(json.dumps({"categories": cats, "images": [], "annotations": []}))


def test_inat_scientific_names_without_annotations(inat_root):
    ds = INat2021(inat_root, split="train")
    assert len(ds) == 15 and len(ds.classes) == 5
    assert ds.classes[0] == "Phoebastria nigripes" and ds.targets[:4] == [0, 0, 0, 1]
    assert ds.supercategories == ["Birds", "Birds", "Birds", "Plants", "Fungi"]  # derived from the taxonomy
    assert ds[4][1] == 1 and ds[4][0].mode == "RGB"
    with pytest.raises(UserError, match="iNat's annotation file"):
        INat2021(inat_root, subset="inat179")


def test_inat_common_names_and_subsets(inat_root):
    _write_categories(inat_root)
    ds = INat2021(inat_root, split="val")
    assert ds.classes[:3] == ["Black-footed Albatross", "Laysan Albatross", "Northern Cardinal"]
    cub = INat2021(inat_root, split="val", subset="inat179")
    assert cub.classes == ["Black-footed Albatross", "Laysan Albatross", "Northern Cardinal"]
    assert cub.cub_index == [0, 1, 16]  # CUB's 001, 002 and 017.Cardinal (matched through the alias table)
    assert len(cub.unmatched) == 197 and "Sooty Albatross" in cub.unmatched
    assert len(cub) == 3 and cub.targets == [0, 1, 2]
    # a seeded per-supercategory draw: one species from each of the 3 supercategories, the same for the same seed
    a = INat2021(inat_root, split="train", subset="inat50", subset_size=3, subset_seed=7)
    b = INat2021(inat_root, split="train", subset="inat50", subset_size=3, subset_seed=7)
    assert a.folder_names == b.folder_names and sorted(a.supercategories) == ["Birds", "Fungi", "Plants"]
    named = INat2021(inat_root, subset=["Amanita muscaria", "dog rose"])
    assert named.classes == ["Fly Agaric", "Dog Rose"] and named.category_ids == [4, 3]
    with pytest.raises(UserError, match=r"`subset` names \['Dodo'\] are not iNat 2021 species"):
        INat2021(inat_root, subset=["Dodo"])


def test_inat_missing(tmp_path):
    with pytest.raises(UserError, match=r"Dataset not found or corrupted at .*: expected the folder 2021_valid/"):
        INat2021(tmp_path, split="val")


def test_per_supercategory_sample_spreads_and_is_seeded():
    supers = ["a"] * 10 + ["b"] * 10 + ["c"] * 2
    picked = per_supercategory_sample(supers, 9, seed=3)
    counts = np.bincount([0 if i < 10 else 1 if i < 20 else 2 for i in picked])
    assert len(picked) == 9 == len(set(picked)) and counts[2] == 2 and sorted(counts[:2]) == [3, 4]
    assert picked == per_supercategory_sample(supers, 9, seed=3) != per_supercategory_sample(supers, 9, seed=4)


def test_imagenet_folders_and_names(tmp_path):
    for wnid in ("n01440764", "n01443537"):
        for k in range(2):
            _png(tmp_path / "train" / wnid / f"{wnid}_{k}.JPEG", k)
    ds = ImageNet(tmp_path, split="train")
    assert ds.classes == ["tench", "goldfish"] and ds.targets == [0, 0, 1, 1] and len(ds) == 4
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tinca, tench\nn01443537 goldfish\n")
    assert ImageNet(tmp_path).classes[0] == "tinca"
    _png(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", 1)
    with pytest.raises(UserError, match="expected val/ to hold one folder per class. The val images are flat"):
        ImageNet(tmp_path, split="val")


def test_image_folder_and_get_dataset(tmp_path):
    for c in ("001.Red_Fox", "002.Gray_Wolf"):
        for k in range(2):
            _png(tmp_path / "animals" / "train" / c / f"{k}.png", k)
    ds = get_dataset("imagefolder", tmp_path / "animals", "train")
    assert isinstance(ds, ImageFolder) and ds.classes == ["Red Fox", "Gray Wolf"] and len(ds) == 4
    flat = get_dataset("ImageFolder", tmp_path / "animals" / "train")  # no split folder: the root itself
    assert flat.classes == ds.classes
    with pytest.raises(UserError, match=r"expected .*animals/test/<class>/<image>"):
        get_dataset("imagefolder", tmp_path / "animals", "test")


def test_get_dataset_names_and_errors(cub_root, tmp_path):
    assert isinstance(get_dataset("cub", cub_root, "test"), CUB200)
    digits = get_dataset("digits", None, "judge")
    assert isinstance(digits, Digits) and len(digits) == 359
    with pytest.raises(UserError, match=r"`dataset` must be one of digits, cub, inat, imagenet, imagefolder, "
                                        r"inat179, inat50, flowers102, .*stanfordcars but is 'mnist'"):
        get_dataset("mnist", tmp_path)
    with pytest.raises(UserError, match="`root` is required for dataset 'cub'"):
        get_dataset("cub")
    with pytest.raises(UserError, match="`split` must be one of train, judge, test for dataset 'digits' but is 'val'"):
        get_dataset("digits", split="val")
    assert "eurosat" in DATASET_NAMES and "inat" in DATASET_NAMES


def test_torchvision_sets_never_download_and_get_clean_names(tmp_path):
    with pytest.raises(UserError, match=r"Dataset not found or corrupted at .*: expected torchvision's DTD files"):
        get_dataset("dtd", tmp_path)
    # Food-101's layout: food-101/meta/{train,test}.json + food-101/images/<class>/<id>.jpg
    base = tmp_path / "food-101"
    meta = {"apple_pie": ["apple_pie/1", "apple_pie/2"], "beef_tartare": ["beef_tartare/3"]}
    (base / "meta").mkdir(parents=True)
    (base / "meta" / "train.json").write_text(json.dumps(meta))
    for items in meta.values():
        for item in items:
            _png(base / "images" / f"{item}.jpg", 5)
    food = get_dataset("food", tmp_path, "train")
    assert food.classes == ["apple pie", "beef tartare"] and food.targets == [0, 0, 1]
    assert food.class_to_idx["beef tartare"] == 1 and food.samples[2][0].endswith("beef_tartare/3.jpg")
    assert food[2][1] == 1
    with pytest.raises(UserError, match="`split` must be one of train, test for dataset 'food101' but is 'val'"):
        get_dataset("food101", tmp_path, "val")


def test_few_shot_indices_seeded_nested_and_checked():
    targets = [i % 4 for i in range(40)]  # 10 per class
    a = few_shot_indices(targets, 3, seed=0)
    assert a == few_shot_indices(targets, 3, seed=0) != few_shot_indices(targets, 3, seed=1)
    assert len(a) == 12 and np.bincount([targets[i] for i in a]).tolist() == [3, 3, 3, 3]
    assert set(few_shot_indices(targets, 2, seed=0)) <= set(a)  # k-shot is inside (k+1)-shot
    assert few_shot_indices(targets, 0, seed=0) == []
    with pytest.raises(UserError, match="`shots` is 11 but class 0 has only 10 samples in this split"):
        few_shot_indices(targets, 11, seed=0)
    assert len(few_shot_indices(targets, 11, seed=0, allow_fewer=True)) == 40
    with pytest.raises(UserError, match="`shots` must be an integer >= 0 but is -1"):
        few_shot_indices(targets, -1)


def test_few_shot_view_keeps_attributes(cub_root):
    ds = few_shot(CUB200(cub_root), shots=1, seed=0)
    assert len(ds) == 3 and ds.targets == [0, 1, 2] and ds.classes[0] == "Black footed Albatross"
    assert ds[1][1] == 1 and ds.samples[1][1] == 1
    assert "Shots: 1 per class, seed 0" in repr(ds)


def test_digits_unchanged():
    sizes = {s: len(Digits(split=s)) for s in ("train", "judge", "test")}
    assert sizes == {"train": 1078, "judge": 359, "test": 360}
    img, target = Digits(split="test")[0]
    assert img.size == (32, 32) and img.mode == "RGB" and Digits.classes[9] == "nine"
    assert target == Digits(split="test").targets[0]


def test_each_dataset_declares_its_splits_once_and_the_catalog_reads_them(monkeypatch):
    assert {k: cls.SPLITS for k, cls in DATASETS.items()} == {
        "digits": ("train", "judge", "test"), "cub": ("train", "test", "all"), "inat": ("train", "train_full", "val"),
        "imagenet": ("train", "val"), "imagefolder": None}
    assert dataset_splits("inat50") == INat2021.SPLITS  # a subset has its dataset's splits
    monkeypatch.setattr(CUB200, "SPLITS", ("train", "holdout"))  # the class is the one place: the catalog follows
    assert dataset_splits("cub") == ("train", "holdout")
    with pytest.raises(UserError, match=r"`split` must be one of train, holdout for dataset 'cub' but is 'test'"):
        check_split("cub", "test")
