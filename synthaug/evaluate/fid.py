"""Tables 3/5: FID and KID of each method's images against real images (torchmetrics)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import write_text
from ..classifier.load import load_classifier
from ..datasets.catalog import check_split, get_dataset
from ..datasets.fewshot import stratified_indices, targets_of
from ..errors import UserError, require
from ..index import BuildView, open_build
from ..jsonfmt import dumps
from ..layout import EVAL_DIR
from ..models import resolve_device
from .images import image_to_tensor, iter_image_batches, model_device_dtype, resize_center_crop
from .judge import write_csv

# torch-fidelity's Inception-v3 FID weights (the TF graph of the original FID code, converted to PyTorch).
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


# --------------------------------------------------------------------------------------------------------------------
# Tables 3/5: FID and KID
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class FIDRow:
    """FID/KID of one method's images against the real images."""

    method: str
    fake_images: int
    real_images: int
    fid: float
    kid_mean: float
    kid_std: float
    kid_subset_size: int  # adapted to small sets: min(1000, real, fake)


@dataclass
class FIDResult:
    """Tables 3/5 (`compute_fid`)."""

    build: str
    real: str
    features: str  # "inception" or the classifier source whose penultimate features were used
    feature_dim: int
    image_size: list[int]
    rows: list[FIDRow]
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class FeatureExtractor(nn.Module):
    """Images float [B, 3, H, W] in [0, 1] -> features [B, D]; what FID/KID are computed on."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str, device: torch.device,
                 dtype: torch.dtype = torch.float32, module: nn.Module | None = None) -> None:
        super().__init__()
        self.fn, self.name, self.device, self.dtype = fn, name, device, dtype
        self.module = module  # registered so .to()/eval() reach the wrapped network

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fn(images.to(self.device, self.dtype)).float().flatten(1)


def inception_extractor(weights: str | os.PathLike | None = None, device: str | torch.device = "auto") -> FeatureExtractor:
    """The standard FID Inception-v3 (2048-d pool features), from a weights file already on disk.

    Looks in `weights`, then ``$TORCH_HOME/hub/checkpoints/`` (where torch-fidelity caches it). Raises a `UserError`
    naming how to provide the file; nothing is downloaded.

    >>> extractor = inception_extractor("weights-inception-2015-12-05-6726825d.pth")
    """
    require("torch_fidelity", "`features='inception'` (the FID Inception-v3 of torch-fidelity)",
            alternative="use `features='judge'` / a classifier source for classifier features")
    NoTrainInceptionV3 = require("torchmetrics.image.fid", "`features='inception'`").NoTrainInceptionV3
    candidates = [Path(weights)] if weights is not None else []
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise UserError(
            f"Inception-v3 FID weights not found at {', '.join(str(p) for p in candidates)}: download {INCEPTION_URL} "
            "on a connected machine and pass its path as `inception_weights` (CLI --inception-weights) or put it "
            f"in {candidates[-1].parent}; or use `features='judge'` for classifier features."
        )
    dev = resolve_device(device)
    # torch-fidelity unpickles the file it is given with weights_only=False, which runs any code a file hides. It gets
    # instead the tensors this process read with weights_only=True, serialized again from memory: no byte of the
    # user's file reaches an unrestricted unpickler.
    state = _load_weights(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=buf).to(dev)
    except RuntimeError as e:  # load_state_dict: missing or unexpected keys, wrong shapes
        raise UserError(f"`inception_weights` {str(path)!r} is not torch-fidelity's Inception-v3 FID weights "
                        f"({str(e).splitlines()[0][:160]}): use {INCEPTION_FILE} from {INCEPTION_URL}.") from None

    def fn(x: torch.Tensor) -> torch.Tensor:
        return net((x.clamp(0, 1) * 255).round().to(torch.uint8))  # the FID network expects uint8 0-255

    return FeatureExtractor(fn, "inception", dev, torch.float32, module=net)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors from `path`, read with ``weights_only=True`` (tensors and plain containers only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (an untrusted file can fail in any way; each means "not plain weights")
        raise UserError(f"`inception_weights` {str(path)!r} is not a plain weights file (torch.load with "
                        f"weights_only=True refused it: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                        f"); synthaug never unpickles code: use {INCEPTION_FILE} from {INCEPTION_URL}.") from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"`inception_weights` {str(path)!r} holds {type(state).__name__}, not a state dict of tensors: "
                        f"use {INCEPTION_FILE} from {INCEPTION_URL}.")
    return state


def classifier_extractor(classifier: nn.Module, name: str | None = None) -> FeatureExtractor:
    """A classifier's penultimate features (`Classifier.features`) as an FID feature space (paper Table 5)."""
    dev, dtype = model_device_dtype(classifier)
    classifier.eval()
    fn = classifier.features if hasattr(classifier, "features") else classifier
    return FeatureExtractor(fn, name or str(getattr(classifier, "source", type(classifier).__name__)), dev, dtype,
                            module=classifier)


class _Precomputed(nn.Module):
    """Identity 'feature extractor' so torchmetrics computes its statistics on features we extracted once."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@dataclass
class FIDScore:
    fid: float
    kid_mean: float
    kid_std: float
    kid_subset_size: int


def fid_kid(real: torch.Tensor, fake: torch.Tensor, *, kid_subset_size: int | None = None, kid_subsets: int = 100,
            seed: int = 0) -> FIDScore:
    """FID and KID (torchmetrics) between two feature matrices ``[N, D]``.

    KID's subset size is ``min(1000, N_real, N_fake)`` unless given: the default 1000 fails on small sets.

    >>> x = torch.randn(200, 16, dtype=torch.float64)
    >>> round(fid_kid(x, x).fid, 6)
    0.0
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise UserError(f"features must be [N, D] with the same D but are {tuple(real.shape)} and {tuple(fake.shape)}.")
    n = min(len(real), len(fake))
    if n < 2:
        raise UserError(f"FID needs at least 2 real and 2 generated images but got {len(real)} and {len(fake)}.")
    d = real.shape[1]
    real, fake = real.double().cpu(), fake.double().cpu()
    fid = FrechetInceptionDistance(feature=_Precomputed(d), normalize=True)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    subset = min(kid_subset_size or 1000, n)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=_Precomputed(d), subsets=kid_subsets, subset_size=subset, normalize=True)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global RNG: make it reproducible
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return FIDScore(float(fid.compute()), float(kid_mean), float(kid_std), subset)


def _extract(extractor: Callable, batches: Iterator[torch.Tensor]) -> torch.Tensor:
    feats = [extractor(x).detach().double().cpu() for x in batches]
    return torch.cat(feats) if feats else torch.zeros(0, 0, dtype=torch.float64)


def compute_fid(
    build: str | os.PathLike,
    real: str | torch.utils.data.Dataset,
    *,
    root: str | None = None,
    split: str = "train",
    features: str | nn.Module | Callable = "inception",
    methods: Sequence[str] | None = None,
    inception_weights: str | os.PathLike | None = None,
    max_images: int | None = None,
    sample_seed: int = 0,
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    device: str | torch.device = "auto",
    batch_size: int = 64,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> FIDResult:
    """FID and KID of each method's images against real images (paper Tables 3 and 5).

    Real images are resized (shorter side) and center-cropped to the build's image size, so both sets enter the
    feature extractor alike. Real features are extracted once and shared by every method. Writes ``eval/fid.json``
    and ``eval/fid.csv``.

    Args:
        build: the build directory.
        real: the real dataset by name (with `root`, `split`) or a torchvision-style dataset returning PIL images.
        root, split: for a named `real`.
        features: ``"inception"`` (standard FID Inception-v3, weights from a local file), ``"guide"`` (the build's
            guide), ``"judge"`` (the judge of the last `evaluate_judge`), any classifier source, a loaded classifier
            (its `features`), or any module/callable mapping images in [0, 1] to ``[B, D]``.
        methods: methods to score (default: all in the build).
        inception_weights: path of torch-fidelity's Inception weights file (for ``features="inception"``).
        max_images: use at most this many images per set: a seeded sample spread evenly over the classes
            (`synthaug.datasets.fewshot.stratified_indices`), the same for every method.
        sample_seed: seed of that sample.
        kid_subset_size: KID subset size (default ``min(1000, real, fake)``).
        kid_subsets: KID subsets.
        device, batch_size: feature extraction.
        out: result folder (default ``BUILD/eval``).
        progress: progress bars.

    >>> result = compute_fid("out/digits", "digits", features="judge")
    >>> print(format_table(result))
    """
    require("torchmetrics", "FID and KID (`synthaug fid`, `compute_fid`)")  # before any image is read
    view = open_build(build)
    methods = view.select_methods(methods)
    if max_images is not None and max_images < 2:
        raise UserError(f"`max_images` must be >= 2 (FID needs a covariance) but is {max_images}.")

    # 1. The feature space.
    extractor = _resolve_features(view, features, inception_weights, device)

    # 2. Real features, once.
    real_name = real if isinstance(real, str) else type(real).__name__
    real_ds = get_dataset(real, root, check_split(real, split)) if isinstance(real, str) else real
    size = view.image_size
    real_idx = list(range(len(real_ds)))
    if max_images is not None:
        real_idx = stratified_indices(targets_of(real_ds), max_images, sample_seed)
    real_feats = _extract(extractor, _real_batches(real_ds, real_idx, size, batch_size, progress))

    # 3. Each method's features, then FID/KID against the real ones.
    rows = []
    for m in methods:
        method_rows = view.rows([m])
        if max_images is not None:
            keep = stratified_indices([int(r["class_index"]) for r in method_rows], max_images, sample_seed)
            method_rows = [method_rows[i] for i in keep]
        fake = _extract(extractor, (x for _, x in iter_image_batches(view, method_rows, batch_size, size=size,
                                                                     progress=progress, desc=f"fid {m}")))
        score = fid_kid(real_feats, fake, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets)
        rows.append(FIDRow(method=m, fake_images=len(fake), real_images=len(real_feats), fid=score.fid,
                           kid_mean=score.kid_mean, kid_std=score.kid_std, kid_subset_size=score.kid_subset_size))

    out_dir = Path(out) if out is not None else view.root / EVAL_DIR
    result = FIDResult(build=str(view.root), real=real_name, features=extractor.name, feature_dim=int(real_feats.shape[1]),
                       image_size=list(size), rows=rows)
    # One file per feature space: Inception's is fid.json, a classifier's fid_{its name}.json.
    stem = "fid" if extractor.name == "inception" else "fid_" + re.sub(r"[^A-Za-z0-9_.-]+", "-", extractor.name)
    result.files = {"result": str(out_dir / f"{stem}.json"), "csv": str(out_dir / f"{stem}.csv")}
    write_csv(out_dir / f"{stem}.csv", [dataclasses.asdict(r) for r in rows],
              [f.name for f in dataclasses.fields(FIDRow)])
    write_text(out_dir / f"{stem}.json", dumps(result.to_dict(), indent=2) + "\n")
    return result


def _resolve_features(view: BuildView, features, inception_weights, device) -> FeatureExtractor:
    if isinstance(features, FeatureExtractor):
        return features
    if isinstance(features, nn.Module):
        return classifier_extractor(features)
    if callable(features) and not isinstance(features, str):
        return FeatureExtractor(features, getattr(features, "__name__", "custom"), torch.device("cpu"))
    if features == "inception":
        return inception_extractor(inception_weights, device)
    source = features
    if features == "guide":
        source = view.config.get("guide")
        if not source:
            raise UserError(f"`features='guide'`: the build at {view.root} records no guide in config.yaml; "
                            "pass the guide's classifier source instead.")
    elif features == "judge":
        judge_json = view.root / EVAL_DIR / "judge.json"
        if not judge_json.is_file():
            raise UserError(f"`features='judge'`: no judge evaluation at {judge_json}: run `synthaug evaluate "
                            f"{view.root} --judge SOURCE` first, or pass the judge's classifier source.")
        source = json.loads(judge_json.read_text())["judge"]

    return classifier_extractor(load_classifier(source, device=resolve_device(device)), name=source)


def _real_batches(dataset, indices: Sequence[int], size: tuple[int, int], batch_size: int,
                  progress: bool) -> Iterator[torch.Tensor]:
    from tqdm.auto import tqdm

    batch = []
    for i in tqdm(indices, desc="fid real", disable=not progress, leave=False):
        img = dataset[i][0]
        if not hasattr(img, "convert"):
            raise UserError(f"The real dataset returns {type(img).__name__}, not PIL images: build it with "
                            "transform=None.")
        batch.append(image_to_tensor(resize_center_crop(img.convert("RGB"), size)))
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)
