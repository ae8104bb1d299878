"""Table 2: a timm classifier trained on k real images per class plus synthetic ones, tested on the real test split."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..atomic import write_text
from ..datasets.catalog import check_split, default_test_split, get_dataset
from ..errors import UserError
from ..index import BuildView, method_sort_key, open_build
from ..jsonfmt import dumps
from ..layout import EVAL_DIR
from ..mix import MODES, RANKS, TARGETS, SynthAugDataset
from ..models import resolve_device
from ..names import normalize_name
from .judge import write_csv
from .names import map_build_classes, resolve_class_map

log = logging.getLogger(__name__)

REAL_ONLY = "real"  # the downstream baseline trained on real images alone

LINEAR = "linear"  # `arch` of the second learner: multinomial logistic regression on the normalised pixels


# --------------------------------------------------------------------------------------------------------------------
# Table 2: downstream few-shot training
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class CellResult:
    """One trained classifier: (method, k real per class, seed) -> accuracy on the real test split."""

    method: str  # a build method, or "real" for real images only
    shots: int
    seed: int
    top1: float
    top5: float
    test_images: int
    train_real: int
    train_synthetic: int
    real_indices_sha256: str  # identical across methods at a given (k, seed): the same real images for all
    steps: int
    seconds: float
    pretrained: bool  # whether pretrained weights were loaded (from a local file; the protocol names which)
    protocol: dict[str, Any]


@dataclass
class DownstreamRow:
    """Mean ± std over seeds of one (method, k)."""

    method: str
    shots: int
    seeds: int
    top1_mean: float
    top1_std: float  # sample standard deviation (ddof=1); 0 with one seed
    top5_mean: float
    top5_std: float


@dataclass
class DownstreamResult:
    """Table 2 (`train_downstream`)."""

    build: str
    real: str
    arch: str
    synthetic_per_class: int
    rows: list[DownstreamRow]
    cells: list[CellResult]
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Transformed(torch.utils.data.Dataset):
    """A torchvision-style dataset whose PIL images get `transform` (the test split, left untouched)."""

    def __init__(self, dataset, transform: Callable) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        img, target = self.dataset[i]
        if not hasattr(img, "convert"):
            raise UserError(f"The real test dataset returns {type(img).__name__}, not PIL images: build it with "
                            "transform=None; train_downstream applies its own eval transform.")
        return self.transform(img.convert("RGB")), target


class _InfiniteSampler(torch.utils.data.Sampler):
    """Seeded permutations back to back: every step gets a full batch, whatever the size of the training set."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(self.n, generator=g).tolist()


def _local_pretrained_file(arch: str) -> str | None:
    """A pretrained checkpoint of timm `arch` that is already on disk (HF cache or torch hub cache), or None."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except RuntimeError:  # unknown tag or architecture: let create_model report it
        return None
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for name in names:
            hit = try_to_load_from_cache(cfg.hf_hub_id, name)
            if isinstance(hit, str):
                return hit
    if cfg.url:
        p = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if p.is_file():
            return str(p)
    return None


def _pretrained_file(arch: str, num_classes: int, arch_kwargs: Mapping[str, Any], pretrained: bool | str
                     ) -> str | None:
    """The checkpoint `pretrained` resolves to on this machine (never a download), or None: from scratch.

    "auto" takes weights already on disk when they fit the model (custom widths do not), True requires them, a path
    is that file.
    """
    import timm

    if arch == LINEAR:
        if pretrained is True or (isinstance(pretrained, str) and pretrained != "auto"):
            raise UserError(f"`pretrained` is {pretrained!r} but arch='linear' (logistic regression on pixels) has no "
                            "pretrained weights: pass pretrained=false or 'auto'.")
        return None
    if isinstance(pretrained, str) and pretrained != "auto":
        return pretrained  # checked to be a file by DownstreamConfig.validate
    if pretrained is False:
        return None
    file = _local_pretrained_file(arch)
    if file is None:
        if pretrained is True:
            raise UserError(
                f"`pretrained` is true but no weights for {arch!r} are on this machine: download them where a hub is "
                "reachable (timm.create_model(arch, pretrained=True) fills the HF cache) and copy the cache, or pass "
                "the checkpoint path as `pretrained`."
            )
        return None
    if pretrained == "auto":
        try:  # weights of another shape (custom widths) do not fit: train from scratch, and record that
            timm.create_model(arch, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay={"file": file},
                              **arch_kwargs)
        except RuntimeError as e:
            log.warning("pretrained weights for %s do not fit (%s); training from scratch", arch, e)
            return None
    return file


def build_model(arch: str, num_classes: int, arch_kwargs: Mapping[str, Any], weights: str | None,
                image_size: int | None = None) -> nn.Module:
    """timm model with a fresh `num_classes` head, from the local checkpoint `weights` or from scratch; for
    ``arch="linear"`` one linear layer over the RGB pixels at `image_size` (multinomial logistic regression)."""
    import timm

    if arch == LINEAR:
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, num_classes))
    try:
        if weights is not None:
            return timm.create_model(arch, pretrained=True, num_classes=num_classes,
                                     pretrained_cfg_overlay={"file": weights}, **arch_kwargs)
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **arch_kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(f"`arch` {arch!r} is not a timm model: see timm.list_models(), e.g. 'resnet18'.") from None
        raise


def default_arch(image_size: int) -> tuple[str, dict[str, Any]]:
    """A CNN sized for the images: small widths for digit-sized images (seconds per cell on a CPU)."""
    if image_size <= 64:
        return "resnet10t", {"channels": (16, 32, 64, 128), "stem_width": 8}
    return "resnet50", {}


def _transforms(image_size: int, mean, std, *, hflip: bool):
    from torchvision import transforms as T

    pad = max(1, image_size // 8)
    train = [T.Resize(image_size), T.CenterCrop(image_size),
             T.RandomCrop(image_size, padding=pad, padding_mode="edge")]
    if hflip:  # off by default: a mirrored digit (or text) is another class
        train.append(T.RandomHorizontalFlip())
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    test = [T.Resize(image_size), T.CenterCrop(image_size)]
    return T.Compose(train + norm), T.Compose(test + norm)


@dataclass(frozen=True)
class DownstreamConfig:
    """How Table 2 trains and tests (`train_downstream`). Every field has the paper's default or a measured one.

    What a cell's result depends on is its *protocol* (`DownstreamConfig.protocol`): a finished cell resumes only under
    the same protocol. `methods`, `include_real`, `shots`, `seeds`, `device` and `num_workers` choose which cells run
    and where, not what a cell is.

    Attributes:
        train_split, test_split: splits of a named real dataset; None: ``train`` and the dataset's test split
            (``test``, or ``val`` for iNat 2021 and ImageNet, which have no test split).
        methods: build methods to train with (default: all in the index); "dct+sd": one cell of both methods' images
            together (`synthetic_per_class` of them per class, the lowest sample index first, the methods in turn).
        include_real: also train on real images alone (method "real"; k = 0 is skipped for it).
        shots: real images per class, k.
        seeds: a number of seeds (0..n-1) or a list; each seed fixes the real subset, init and data order.
        shots_seed: draw the k real images per class with this seed in every cell (None: with the cell's seed).
            Fixed, the seeds vary only the training: the protocol of a user who has exactly those k images and a
            guide trained on them.
        synthetic_per_class: synthetic images per class per method (None: all in the build).
        mode, p: how real and synthetic images are mixed (`SynthAugDataset`): ``"concat"`` (every image, drawn
            uniformly), ``"ratio"`` (synthetic images make a fraction `p` of each epoch, redrawn every epoch) or
            ``"replace"`` (each real item serves a synthetic image of its class with probability `p`). Cells without
            real images (k = 0) train on synthetic images alone in every mode.
        min_confidence: keep only synthetic images whose stored guide probability is at least this.
        class_methods: per-class methods replacing a cell's method for the classes named (`SynthAugDataset`'s
            ``class_methods``: ``{"nine": ["dct"]}`` in an ``sd`` cell: token images for "nine" alone).
        rank: which images `synthetic_per_class` keeps per class: ``"index"`` (the first) or ``"confidence"`` (the
            guide's surest; `SynthAugDataset`'s ``rank``).
        targets: ``"hard"`` (class indices, cross-entropy) or ``"soft"``: synthetic images train towards the guide's
            recorded probabilities and real ones towards their one-hot label (soft cross-entropy; `SynthAugDataset`'s
            ``targets="soft"``).
        temperature: ``"soft"`` only: the guide's probabilities raised to ``1 / temperature`` and renormalised.
        class_map: build class -> real class when the names differ (`synthaug.evaluate.names.resolve_class_map`
            forms; ``"inat179"`` for a CUB build tested on iNat179). Default: matched by name, or through the
            CUB -> iNat map when the real dataset is the iNat179 subset. Build classes without a real class are left
            out of the synthetic images.
        arch: timm architecture (default: a small ResNet for images <= 64 px, else resnet50), or ``"linear"``:
            multinomial logistic regression on the normalised RGB pixels at `image_size`, trained by the same loop
            (the second learner of Table 2: the sign of a difference between synthetic sets can depend on the
            learner).
        arch_kwargs: extra `timm.create_model` kwargs (e.g. ``{"channels": (16, 32, 64, 128)}``).
        pretrained: "auto" (weights already on disk if any, else from scratch), True (require them), False, or a
            checkpoint path. Nothing is ever downloaded. The protocol records the weights actually loaded.
        image_size: training resolution (default: the build's image height).
        steps: optimizer steps per cell (default: 10 epochs of N synthetic images per class, at least 200).
        epochs: alternatively, epochs of each cell's own training set (ignored when `steps` is given).
        batch_size, lr, weight_decay: AdamW with linear warm-up (5%) and cosine decay.
        hflip: random horizontal flips (off: wrong for digits and text).
        device: "auto", "cpu", "cuda", ...
        num_workers: DataLoader workers.
    """

    train_split: str | None = None
    test_split: str | None = None
    methods: Sequence[str] | None = None
    include_real: bool = True
    shots: Sequence[int] = (0, 3, 9, 15)
    seeds: int | Sequence[int] = 3
    shots_seed: int | None = None
    synthetic_per_class: int | None = 100
    mode: str = "concat"
    p: float = 0.5
    min_confidence: float | None = None
    class_methods: Mapping[str, Sequence[str]] | None = None
    rank: str = "index"
    targets: str = "hard"
    temperature: float = 1.0
    class_map: Any = None
    arch: str | None = None
    arch_kwargs: Mapping[str, Any] | None = None
    pretrained: bool | str = "auto"
    image_size: int | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    hflip: bool = False
    device: str | torch.device = "auto"
    num_workers: int = 0

    def validate(self) -> None:
        """Every rule that needs no data; raises `UserError` naming the field."""
        seeds = list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)
        if not seeds:
            raise UserError("`seeds` must name at least one seed (or a count >= 1), e.g. 3.")
        shots = list(self.shots)
        if not shots or any(int(k) < 0 for k in shots):
            raise UserError(f"`shots` must be a non-empty list of integers >= 0 but is {shots!r}: e.g. 0,3,9,15.")
        for name in ("batch_size", "lr"):
            if getattr(self, name) <= 0:
                raise UserError(f"`{name}` must be > 0 but is {getattr(self, name)!r}.")
        for name in ("steps", "epochs"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"`{name}` must be > 0 but is {getattr(self, name)!r}.")
        if self.synthetic_per_class is not None and self.synthetic_per_class < 0:
            raise UserError(f"`synthetic_per_class` must be >= 0 (or None for all) but is "
                            f"{self.synthetic_per_class!r}.")
        if self.mode not in MODES:
            raise UserError(f"`mode` must be one of {', '.join(MODES)} but is {self.mode!r}.")
        if not 0.0 <= self.p < 1.0:
            raise UserError(f"`p` must be in [0, 1) but is {self.p!r}: the synthetic share of the training images.")
        if self.min_confidence is not None and not 0.0 <= self.min_confidence <= 1.0:
            raise UserError(f"`min_confidence` must be in [0, 1] (or None) but is {self.min_confidence!r}.")
        if self.targets not in TARGETS:
            raise UserError(f"`targets` must be one of {', '.join(TARGETS)} but is {self.targets!r}.")
        if self.rank not in RANKS:
            raise UserError(f"`rank` must be one of {', '.join(RANKS)} but is {self.rank!r}.")
        if self.class_methods is not None and not isinstance(self.class_methods, Mapping):
            raise UserError(f"`class_methods` must be a mapping of class name to methods, e.g. {{nine: [dct]}}, but "
                            f"is {self.class_methods!r}.")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise UserError(f"`temperature` must be a finite number > 0 but is {self.temperature!r}: 1 keeps the "
                            "guide's probabilities.")
        if isinstance(self.pretrained, str) and self.pretrained != "auto" and not Path(self.pretrained).is_file():
            raise UserError(f"`pretrained` {self.pretrained!r} is not a file: pass a timm checkpoint path, 'auto' "
                            "or false.")


@dataclass(frozen=True)
class _Protocol:
    """What a cell's result depends on, resolved (`arch`, `image_size`, `steps`, the weights loaded, the data)."""

    arch: str
    arch_kwargs: dict[str, Any]
    pretrained: str | None  # "sha256:<16 hex>" of the weights loaded, or None (from scratch)
    image_size: int
    steps: int | None
    epochs: float | None
    batch_size: int
    lr: float
    weight_decay: float
    hflip: bool
    synthetic_per_class: int | None
    mode: str
    p: float
    min_confidence: float | None
    real: str
    train_split: str | None
    test_split: str | None
    train_size: int
    test_size: int
    class_map: dict[str, int] | None  # build class name -> real class index, when not the same classes
    shots_seed: int | None = None  # the k real images drawn with this seed in every cell; None: the cell's seed
    targets: str = "hard"  # "soft": the guide's recorded probabilities as the synthetic images' targets
    temperature: float = 1.0
    class_methods: dict[str, list[str]] | None = None  # per-class methods replacing the cell's
    rank: str = "index"  # "confidence": a per-class cap keeps the guide's surest images

    def as_dict(self) -> dict[str, Any]:
        """The JSON a cell stores. Settings at their long-standing defaults (concat mixing, no filter, the same
        classes) add no key, so cells trained before those options existed still resume."""
        d = dataclasses.asdict(self)
        if self.mode == "concat":
            del d["mode"], d["p"]
        for key in ("min_confidence", "class_map", "shots_seed", "class_methods"):
            if d[key] is None:
                del d[key]
        if self.rank == "index":
            del d["rank"]
        if self.targets == "hard":
            del d["targets"], d["temperature"]
        return json.loads(json.dumps(d, default=str))


def _upgrade_protocol(stored: dict[str, Any], used_pretrained: bool) -> dict[str, Any]:
    """A protocol saved before the weights were recorded: "auto"/False that loaded nothing is exactly None now."""
    legacy = isinstance(stored.get("pretrained"), bool) or stored.get("pretrained") == "auto"
    return {**stored, "pretrained": None} if legacy and not used_pretrained else stored


def _resolve_real(real, root, split: str, argument: str):
    """A named dataset at a split it has (else refused naming the valid ones), or the dataset given."""
    if isinstance(real, str):
        return get_dataset(real, root, check_split(real, split, argument))
    return real


def _protocol_key(protocol: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(protocol, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _weights_id(file: str | None) -> str | None:
    if file is None:
        return None
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()[:16]


def _real_class_map(view: BuildView, real_train, class_map, real_name: str) -> dict[int, int] | None:
    """Build class index -> real target, or None when both have the same classes in the same order."""
    real_classes = [str(c) for c in getattr(real_train, "classes", [])]
    if not real_classes:
        return None
    if class_map is None and getattr(real_train, "cub_index", None) is not None:
        class_map = "inat179"  # the iNat179 subset: CUB names reach iNat's through the shipped map
    names_map, _ = resolve_class_map(class_map)
    if names_map is None and all(int(c["index"]) < len(real_classes) and normalize_name(real_classes[int(c["index"])])
                                 == normalize_name(c["name"]) for c in view.classes):
        return None  # the dataset the build was made from: class c is real class c
    mapping = map_build_classes(view.classes, real_classes, names_map)
    if mapping.unmapped:
        log.info("%d build classes have no real class and contribute no synthetic images: %s",
                 len(mapping.unmapped), ", ".join(mapping.unmapped[:10]) + (" ..." if len(mapping.unmapped) > 10
                                                                           else ""))
    return mapping.build_to_judge


def train_downstream(
    build: str | os.PathLike,
    real: str | torch.utils.data.Dataset,
    config: DownstreamConfig | None = None,
    *,
    root: str | None = None,
    test: str | torch.utils.data.Dataset | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    **overrides: Any,
) -> DownstreamResult:
    """Train classifiers on k real + N synthetic images per class and test them on real images (paper Table 2).

    For every method in the build (and, with `include_real`, real images alone) x every k in `shots` x every seed,
    a timm classifier is trained on `SynthAugDataset` (k real images per class, the same k for every method at a given
    seed, plus `synthetic_per_class` images of that method) and tested on the real test split. Every cell is saved
    as ``eval/downstream/cells/{method}-k{k}-s{seed}.json`` the moment it finishes, and skipped when present: an
    interrupted run resumes. Summary: ``eval/downstream.json`` and ``eval/downstream.csv``.

    All cells take the same number of optimizer steps (`steps`): with 30 real images or 1,150 mixed ones, a fixed
    epoch count would hand the bigger sets 30x the compute and confound data with training time.

    Args:
        build: the build directory.
        real: the real dataset, by name (`synthaug.datasets.get_dataset`, with `root`; ``"inat179"`` for the paper's
            iNat179 rows) or as a torchvision-style dataset returning PIL images (transform=None) with `targets`.
        config: a `DownstreamConfig` (default: its defaults).
        root: dataset root for a named `real`.
        test: the real test set (name or dataset); default: `real` at `config.test_split`.
        out: result folder (default ``BUILD/eval``).
        progress: progress bars.
        **overrides: `DownstreamConfig` fields, replacing those of `config` (``shots=[0, 3], seeds=3``).

    >>> result = train_downstream("out/digits", "digits", shots=[0, 3, 9], seeds=3)
    >>> print(format_table(result))
    """
    from tqdm.auto import tqdm

    # 1. Check inputs.
    fields = {f.name for f in dataclasses.fields(DownstreamConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"`train_downstream` got unknown settings {', '.join(unknown)}: use DownstreamConfig's "
                        f"fields ({', '.join(sorted(fields))}).")
    cfg = dataclasses.replace(config or DownstreamConfig(), **overrides)
    cfg.validate()
    view = open_build(build)
    methods = view.select_methods(cfg.methods)
    seeds = list(range(cfg.seeds)) if isinstance(cfg.seeds, int) else [int(s) for s in cfg.seeds]
    shots = [int(k) for k in cfg.shots]
    real_name = real if isinstance(real, str) else type(real).__name__
    test_default = default_test_split(real) if isinstance(real, str) else "test"
    train_split = cfg.train_split or "train"
    test_split = cfg.test_split or (default_test_split(test) if isinstance(test, str) else test_default)
    real_train = _resolve_real(real, root, train_split, "train_split")
    real_test = _resolve_real(test if test is not None else real, root, test_split, "test_split")
    class_to_real = _real_class_map(view, real_train, cfg.class_map, real_name)
    num_classes = len(getattr(real_train, "classes", None) or view.classes)  # the real labels define the head
    names = {int(c["index"]): c["name"] for c in view.classes}
    image_size = cfg.image_size or view.image_size[0]
    arch, arch_kwargs = cfg.arch, dict(cfg.arch_kwargs or {})
    if arch is None:
        arch, default_kwargs = default_arch(image_size)
        arch_kwargs = {**default_kwargs, **arch_kwargs}
    dev = resolve_device(cfg.device)
    n_syn = cfg.synthetic_per_class
    if n_syn is None:
        counts = Counter(zip(view.index.column("method").to_pylist(), view.index.column("class_index").to_pylist()))
        n_syn = max(counts.values()) if counts else 0
    steps = cfg.steps
    if steps is None and cfg.epochs is None:
        # 10 epochs of a 100-per-class synthetic set (at least 200 steps), independent of `shots` and `seeds`, so
        # that adding a k or a seed later resumes instead of invalidating the finished cells.
        steps = max(200, math.ceil(10 * num_classes * max(n_syn, 15) / cfg.batch_size))
    weights = _pretrained_file(arch, num_classes, arch_kwargs, cfg.pretrained)
    protocol = _Protocol(
        arch=arch, arch_kwargs=arch_kwargs, pretrained=_weights_id(weights), image_size=image_size, steps=steps,
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, hflip=cfg.hflip,
        synthetic_per_class=cfg.synthetic_per_class, mode=cfg.mode, p=cfg.p, min_confidence=cfg.min_confidence,
        real=real_name, train_split=train_split, test_split=test_split, train_size=len(real_train),
        test_size=len(real_test),
        class_map=None if class_to_real is None else {names[b]: r for b, r in sorted(class_to_real.items())},
        shots_seed=cfg.shots_seed, targets=cfg.targets, temperature=float(cfg.temperature),
        class_methods=None if not cfg.class_methods else {str(c): [m] if isinstance(m, str) else list(m)
                                                          for c, m in sorted(cfg.class_methods.items(), key=str)},
        rank=cfg.rank,
    )
    stored_protocol = protocol.as_dict()
    out_dir = Path(out) if out is not None else view.root / EVAL_DIR
    cell_dir = out_dir / "downstream" / "cells"

    # 2. The cells: (method, k, seed), real-only without k = 0 (nothing to train on).
    plan = [(m, k, s) for m in ([REAL_ONLY] if cfg.include_real else []) + methods for k in shots for s in seeds
            if not (m == REAL_ONLY and k == 0)]
    cells: list[CellResult] = []
    bar = tqdm(plan, desc="downstream", disable=not progress)
    for method, k, seed in bar:
        bar.set_postfix_str(f"{method} k={k} seed={seed}")
        path = cell_dir / f"{method}-k{k}-s{seed}.json"
        if path.is_file():
            cell = CellResult(**json.loads(path.read_text()))
            old = _upgrade_protocol(cell.protocol, cell.pretrained)
            if old != stored_protocol:
                differ = sorted(key for key in set(old) | set(stored_protocol) if old.get(key) !=
                                stored_protocol.get(key))
                raise UserError(
                    f"{path} was trained with other settings ({', '.join(differ)} differ): pass another `out` "
                    f"or delete {cell_dir} to start over."
                )
            cells.append(dataclasses.replace(cell, protocol=stored_protocol))
            continue
        cell = _train_cell(view, real_train, real_test, method, k, seed, protocol=protocol, weights=weights,
                           num_classes=num_classes, class_to_real=class_to_real, device=dev,
                           num_workers=cfg.num_workers, progress=progress)
        write_text(path, dumps(dataclasses.asdict(cell), indent=2, default=str) + "\n")
        cells.append(cell)

    # 3. Mean ± std over seeds.
    rows = _summarise(cells)
    result = DownstreamResult(build=str(view.root), real=real_name, arch=arch, synthetic_per_class=n_syn, rows=rows,
                              cells=cells)
    result.files = {"result": str(out_dir / "downstream.json"), "csv": str(out_dir / "downstream.csv"),
                    "cells": str(cell_dir)}
    write_csv(out_dir / "downstream.csv", [dataclasses.asdict(r) for r in rows],
              [f.name for f in dataclasses.fields(DownstreamRow)])
    write_text(out_dir / "downstream.json", dumps(result.to_dict(), indent=2, default=str) + "\n")
    return result


def _summarise(cells: list[CellResult]) -> list[DownstreamRow]:
    groups: dict[tuple[str, int], list[CellResult]] = defaultdict(list)
    for c in cells:
        groups[(c.method, c.shots)].append(c)

    def std(xs):
        return float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0

    rows = []
    for (m, k), items in sorted(groups.items(), key=lambda kv: (method_sort_key(kv[0][0]), kv[0][1])):
        t1, t5 = [c.top1 for c in items], [c.top5 for c in items]
        rows.append(DownstreamRow(method=m, shots=k, seeds=len(items), top1_mean=float(np.mean(t1)), top1_std=std(t1),
                                  top5_mean=float(np.mean(t5)), top5_std=std(t5)))
    return rows


def _real_indices(dataset) -> list[int]:
    """The real-dataset indices a `SynthAugDataset` serves (its few-shot subset), from its public `source`."""
    return sorted(src.index for src in map(dataset.source, range(len(dataset))) if src.kind == "real")


def _train_cell(view: BuildView, real_train, real_test, method: str, k: int, seed: int, *, protocol: _Protocol,
                weights: str | None, num_classes: int, class_to_real: dict[int, int] | None, device: torch.device,
                num_workers: int, progress: bool, dataset_cls=SynthAugDataset) -> CellResult:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    pr = protocol
    batch_size, steps, epochs, mode = pr.batch_size, pr.steps, pr.epochs, pr.mode
    # 1. Model first, under the seed: the init depends only on (arch, seed), not on the method.
    torch.manual_seed(seed)
    model = build_model(pr.arch, num_classes, pr.arch_kwargs, weights, pr.image_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
    train_tf, test_tf = _transforms(pr.image_size, mean, std, hflip=pr.hflip)

    # 2. Data: the real subset is a function of (k, seed) only (or of k, with `shots_seed`), so every method sees the
    #    same real images.
    #    (real images with k = 0 still define the label set, checked against the build's classes.)
    #    Mixing modes that redraw synthetic images per epoch ("ratio", "replace") need real images to mix with;
    #    without them (k = 0, or real-only) every mode is the plain union.
    real_only = method == REAL_ONLY
    if k == 0 or real_only:
        mode = "concat"
    train_set = dataset_cls(view.root, real=real_train, shots=k, transform=train_tf,
                            methods=[] if real_only else method.split("+"),
                            synthetic_per_class=0 if real_only else pr.synthetic_per_class, seed=seed, mode=mode,
                            p=pr.p, min_confidence=None if real_only else pr.min_confidence, class_map=class_to_real,
                            shots_seed=pr.shots_seed, targets=pr.targets, temperature=pr.temperature,
                            class_methods=None if real_only else pr.class_methods, rank=pr.rank)
    n_train = len(train_set)
    if n_train == 0:
        raise UserError(f"No training images for method {method!r} with k={k}: the build has none of that method.")
    real_idx = _real_indices(train_set)
    n_real = len(real_idx)
    n_steps = steps if steps is not None else max(1, math.ceil(epochs * n_train / batch_size))

    def batches():
        """Training batches forever. "concat": seeded permutations back to back (full batches across epochs).
        Per-epoch modes: one loader per epoch after `set_epoch`, so the draws are the same with any worker count."""
        kwargs = {"batch_size": batch_size, "num_workers": num_workers, "pin_memory": device.type == "cuda",
                  "drop_last": False, "persistent_workers": False}
        if mode == "concat":
            yield from torch.utils.data.DataLoader(train_set, sampler=_InfiniteSampler(n_train, seed),
                                                   generator=torch.Generator().manual_seed(seed), **kwargs)
            return
        for epoch in itertools.count():
            train_set.set_epoch(epoch)
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
            yield from torch.utils.data.DataLoader(train_set, sampler=order.tolist(), **kwargs)

    # 3. Train: AdamW, 5% linear warm-up, cosine decay; bf16 autocast on CUDA.
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=pr.lr, weight_decay=pr.weight_decay)
    warm = max(1, n_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / n_steps))))
    amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
    it = batches()
    bar = tqdm(range(n_steps), desc=f"{method} k={k} s={seed}", leave=False, disable=not progress)
    for _ in bar:
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    it.close()
    del it

    # 4. Test on the real test split.
    top1, top5 = _test(model, _Transformed(real_test, test_tf), batch_size=max(batch_size, 128), device=device,
                       num_workers=num_workers, amp=amp, amp_dtype=amp_dtype)
    return CellResult(
        method=method, shots=k, seed=seed, top1=top1, top5=top5, test_images=len(real_test), train_real=n_real,
        train_synthetic=n_train - n_real, real_indices_sha256=hashlib.sha256(
            json.dumps(sorted(real_idx)).encode()).hexdigest(),
        steps=n_steps, seconds=round(time.perf_counter() - t0, 2), pretrained=weights is not None,
        protocol=protocol.as_dict(),
    )


@torch.inference_mode()
def _test(model: nn.Module, dataset, *, batch_size: int, device: torch.device, num_workers: int, amp: bool,
          amp_dtype: torch.dtype) -> tuple[float, float]:
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    hit1 = hit5 = n = 0
    for x, y in loader:
        x, y = x.to(device), torch.as_tensor(y).to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            logits = model(x).float()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hit1 += int((top[:, 0] == y).sum())
        hit5 += int((top == y[:, None]).any(-1).sum())
        n += len(y)
    return hit1 / max(n, 1), hit5 / max(n, 1)
