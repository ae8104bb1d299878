"""Fit a few-shot guide: a linear or cosine-prototype head on a frozen backbone's features of k real images per class.

`fit_guide` is what ``synthaug fit-guide`` and ``synthaug build --guide fit`` run. The backbone stays frozen; the head
is fitted on the L2-normalised features of the shots and of shifted copies of them (light augmentation). Which
features (`probe.FEATURES`) and how strong the regularisation are chosen by leave-one-out on the shots alone: fold j
holds out the j-th shot of every class, so each shot is predicted once by a head that never saw it while every class
keeps k - 1 shots (the score is accuracy, ties broken by log-loss, which decides how calibrated the probabilities
are that DCT's loss, the confidence filter and soft labels read). With one shot per class nothing can be held out:
the defaults (pooled features, the middle strength) are used and the estimate is reported as unavailable.

The logistic head minimises ``mean CE + strength / 2 * ||W||^2`` with full-batch L-BFGS in float64 (deterministic on
one machine); the prototype head is the class means of the normalised features, logits ``scale * cos``, with
`scale` chosen like the strength.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..atomic import write_text
from ..errors import UserError
from ..layout import GUIDE_RECORD_FILE
from .base import Classifier, eval_transform
from .probe import DIGITS_CLIP, FAMILY_FEATURES, Backbone, ProbeModel, load_backbone, write_probe

log = logging.getLogger(__name__)


HEADS = ("linear", "prototype")


# Candidate regularisation strengths (linear head) and logit scales (prototype head), chosen from by leave-one-out.
STRENGTHS = (1e-4, 1e-3, 1e-2, 1e-1)
SCALES = (10.0, 20.0, 50.0, 100.0)


@dataclass(frozen=True)
class FitRecord:
    """What ``guide.json`` holds: how a few-shot guide was fitted, and how good leave-one-out says it is.

    Attributes:
        backbone: the backbone source as given; family: ``clip`` / ``transformers`` / ``timm``.
        head: ``linear`` or ``prototype``; features: the features the head reads; strength: the L2 strength
            (linear) or logit scale (prototype).
        shots: real images per class; shots_seed: the seed that drew them; dataset, split: where from;
            indices: their dataset indices (ascending), paths: their sample paths or ids where the dataset has them.
        augment: shifted copies per shot the head was fitted on (besides the shot itself).
        loo_accuracy: leave-one-out accuracy of the whole fit over all shots, nested (each held-out shot's features
            and strength chosen on the other shots alone; None with one shot per class); loo_per_class: the same per
            class name; selected_loo_accuracy: the chosen setting's own leave-one-out accuracy (the best of all
            candidates, so optimistic); candidates: every setting tried, with its leave-one-out accuracy and log-loss.
        train_accuracy: the fitted head on its own shots.
        labels: the class names, index-aligned with the outputs.
    """

    backbone: str
    family: str
    head: str
    features: str
    strength: float
    shots: int
    shots_seed: int
    dataset: str
    split: str
    indices: list[int]
    paths: list[str]
    augment: int
    loo_accuracy: float | None
    loo_per_class: dict[str, float] | None
    candidates: list[dict[str, Any]]
    train_accuracy: float
    labels: list[str]
    format_version: int = 1
    why_no_loo: str | None = None
    selected_loo_accuracy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """Leave-one-out accuracy per class and overall, as `synthaug fit-guide` prints it."""
        what = (f"{self.head} head on {self.backbone} ({self.family}, {self.features} features, "
                f"{'strength' if self.head == 'linear' else 'scale'} {self.strength:g}), {self.shots} shots per "
                f"class (seed {self.shots_seed}), {self.augment} shifted copies each")
        if self.loo_accuracy is None:
            return f"{what}\nleave-one-out: not available ({self.why_no_loo})"
        worst = sorted(self.loo_per_class.items(), key=lambda kv: kv[1])
        rows = "\n".join(f"  {name:<30} {100 * acc:5.1f}%" for name, acc in worst)
        return f"{what}\nleave-one-out accuracy {100 * self.loo_accuracy:.1f}% (worst class first):\n{rows}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, allow_nan=False) + "\n"

    @classmethod
    def read(cls, directory: str | os.PathLike) -> FitRecord:
        """A guide folder's record; one line naming the file when it is missing or damaged."""
        path = Path(directory) / GUIDE_RECORD_FILE
        try:
            data = json.loads(path.read_text())
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"{path} is missing or damaged ({type(e).__name__}): fit the guide again with "
                            f"`synthaug fit-guide ... --overwrite`.") from None


# --------------------------------------------------------------------------------------------------------------------
# Steps of a fit
# --------------------------------------------------------------------------------------------------------------------
def _to_tensors(images: Sequence[Any]) -> list[Tensor]:
    """PIL images or ``[C, H, W]`` tensors in [0, 1] (or uint8) -> float ``[3, H, W]`` tensors (sizes may differ:
    `_features` preprocesses image by image)."""
    import numpy as np

    out = []
    for im in images:
        if isinstance(im, Tensor):
            t = im.float() / 255.0 if im.dtype == torch.uint8 else im.float()
        else:
            t = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append(t if t.shape[0] == 3 else t.expand(3, -1, -1))
    return out


def _shift(x: Tensor, dy: int, dx: int) -> Tensor:
    """`x` moved by (dy, dx) pixels, the uncovered border filled with the edge's values (no black bars on photos)."""
    h, w = x.shape[-2:]
    p = max(abs(dy), abs(dx))
    if p == 0:
        return x
    padded = F.pad(x[None], (p, p, p, p), mode="replicate")[0]
    return padded[:, p - dy : p - dy + h, p - dx : p - dx + w]


def augmented(images: list[Tensor], copies: int, seed: int) -> tuple[list[Tensor], list[int]]:
    """Each image followed by `copies` shifted copies (up to 1/16 of its side in each direction, seeded), and the
    index of the source image of each."""
    g = torch.Generator().manual_seed(int(seed))
    out, source = [], []
    for i, im in enumerate(images):
        out.append(im)
        source.append(i)
        limit = max(1, round(min(im.shape[-2:]) / 16))
        for _ in range(copies):
            dy, dx = (int(v) for v in torch.randint(-limit, limit + 1, (2,), generator=g))
            out.append(_shift(im, dy, dx))
            source.append(i)
    return out, source


@torch.no_grad()
def _features(backbone: Backbone, data_config: dict[str, Any], images: list[Tensor], device: torch.device,
              batch_size: int = 64) -> dict[str, Tensor]:
    """Every feature kind of `images`, L2-normalised, float64 on the CPU."""
    param = next(backbone.parameters())
    chunks: dict[str, list[Tensor]] = {}
    for i in range(0, len(images), batch_size):
        x = torch.cat([eval_transform(im[None].to(device), data_config) for im in images[i : i + batch_size]])
        for kind, f in backbone.all_features(x.to(param.dtype)).items():
            chunks.setdefault(kind, []).append(F.normalize(f.float(), dim=-1).double().cpu())
    return {k: torch.cat(v) for k, v in chunks.items()}


def fit_logistic(x: Tensor, y: Tensor, num_classes: int, strength: float) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression, ``mean CE + strength/2 ||W||^2``, full-batch L-BFGS in float64."""
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * strength * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def fit_prototype(x: Tensor, y: Tensor, num_classes: int, scale: float) -> tuple[Tensor, Tensor]:
    """Cosine prototypes: the normalised class means, times `scale`; no bias."""
    protos = torch.stack([x[y == c].mean(0) for c in range(num_classes)])
    return scale * F.normalize(protos, dim=-1), torch.zeros(num_classes, dtype=x.dtype)


def _fit(head: str, x: Tensor, y: Tensor, num_classes: int, strength: float) -> tuple[Tensor, Tensor]:
    return (fit_logistic if head == "linear" else fit_prototype)(x, y, num_classes, strength)


def _cv_probs(head: str, feats: Tensor, y: Tensor, src: Tensor, rank: Tensor, num_classes: int, strength: float,
              use: Tensor) -> Tensor:
    """Held-out probabilities ``[n_shots, C]`` of the shots in `use` (rows of the others stay 0), fold by fold: fold
    j holds out the j-th shot of every class with its augmented copies, and a head fitted on the other used shots
    predicts it."""
    probs = torch.zeros(len(rank), num_classes, dtype=torch.float64)
    is_original = torch.ones(len(src), dtype=torch.bool)
    is_original[1:] = src[1:] != src[:-1]
    for j in sorted(set(rank[use].tolist())):
        held = use & (rank == j)
        train = use[src] & ~held[src]
        w, b = _fit(head, feats[train], y[train], num_classes, strength)
        rows = held[src] & is_original
        probs[src[rows]] = (feats[rows] @ w.T + b).softmax(-1)
    return probs


def _choose(head: str, feats: dict[str, Tensor], y: Tensor, y_shots: Tensor, src: Tensor, rank: Tensor,
            num_classes: int, kinds: Sequence[str], grid: Sequence[float], use: Tensor) -> list[dict[str, Any]]:
    """Every candidate setting scored by leave-one-out on the shots in `use`, the chosen one first: the most
    accurate, then the best calibrated (log-loss), then the stronger regularisation (smaller logit scale)."""
    out = []
    for kind in kinds:
        for strength in grid:
            probs = _cv_probs(head, feats[kind], y, src, rank, num_classes, strength, use)
            acc, nll = _score(probs[use], y_shots[use])
            out.append({"features": kind, "strength": strength, "loo_accuracy": acc, "loo_nll": nll, "_probs": probs})
    out.sort(key=lambda c: (round(c["loo_accuracy"], 9), -round(c["loo_nll"], 9),
                            c["strength"] if head == "linear" else -c["strength"]), reverse=True)
    return out


def _score(probs: Tensor, targets: Tensor) -> tuple[float, float]:
    acc = float((probs.argmax(-1) == targets).double().mean())
    nll = float(-probs[torch.arange(len(targets)), targets].clamp_min(1e-12).log().mean())
    return acc, nll


# --------------------------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------------------------
def fit_guide(
    images: Sequence[Any],
    targets: Sequence[int],
    labels: Sequence[str],
    out: str | os.PathLike | None = None,
    *,
    backbone: str = "digits",
    head: str = "linear",
    features: str | None = None,
    strength: float | None = None,
    augment: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    shots_info: dict[str, Any] | None = None,
    trained_on: str | None = None,
    overwrite: bool = False,
) -> tuple[Classifier, FitRecord]:
    """Fit a few-shot guide on a frozen backbone from k labelled images per class, and save it to `out`.

    Args:
        images: the shots (PIL images or ``[3, H, W]`` tensors in [0, 1]).
        targets: each shot's class index into `labels`; every class needs the same number k >= 1 of shots.
        labels: class names, the guide's outputs.
        out: a directory to write the guide to (`synthaug.classifier.probe`'s format, loadable with
            ``load_classifier(out)`` and ``--guide out``); None: nothing is written.
        backbone: `probe.load_backbone`'s source (``"digits"``: the embedded world's CLIP image tower).
        head: ``"linear"`` (L2-regularised logistic regression) or ``"prototype"`` (cosine class means).
        features: fix the feature kind; None: chosen by leave-one-out among the backbone's kinds.
        strength: fix the L2 strength (linear head) or logit scale (prototype head); None: chosen by leave-one-out
            among `STRENGTHS` / `SCALES`. Leave-one-out picks for accuracy on the shots alone, which favours the
            weakest penalty (the sharpest decision surface); a stronger one can be what a steered token fools less.
        augment: shifted copies of each shot to fit on (0: none).
        seed: seeds the augmentation.
        device: where the backbone runs.
        shots_info: provenance recorded in ``guide.json``: ``shots_seed``, ``dataset``, ``split``, ``indices``,
            ``paths``.
        trained_on: the guide's note; default: "few-shot probe: k images per class of DATASET/SPLIT".
        overwrite: replace an existing guide folder at `out` (a folder that is not one is never replaced).

    Returns:
        ``(classifier, record)``: the fitted guide as a `Classifier` and what ``guide.json`` records.

    >>> from synthaug.datasets import Digits, few_shot_indices
    >>> ds = Digits(split="train"); idx = few_shot_indices(ds.targets, 3, seed=0)
    >>> guide, record = fit_guide([ds[i][0] for i in idx], [ds.targets[i] for i in idx], ds.classes)
    >>> record.loo_accuracy is not None
    True
    """
    started = time.perf_counter()
    # 1. Check inputs
    if head not in HEADS:
        raise UserError(f"`head` must be one of {', '.join(HEADS)} but is {head!r}.")
    if isinstance(augment, bool) or not isinstance(augment, int) or not 0 <= augment <= 64:
        raise UserError(f"`augment` must be an integer in 0..64 (shifted copies per shot) but is {augment!r}.")
    labels = [str(n) for n in labels]
    if len(labels) < 2:
        raise UserError(f"a guide needs at least 2 classes but the dataset has {len(labels)}: pass a labelled "
                        f"dataset with 2 or more classes.")
    y_shots = torch.as_tensor([int(t) for t in targets], dtype=torch.long)
    if len(images) != len(y_shots) or len(y_shots) == 0:
        raise UserError(f"`images` and `targets` must be non-empty and of one length, but have {len(images)} and "
                        f"{len(y_shots)}.")
    counts = torch.bincount(y_shots, minlength=len(labels))
    if len(counts) > len(labels) or int(counts.min()) < 1 or int(counts.min()) != int(counts.max()):
        raise UserError(f"every class needs the same number k >= 1 of shots, but the counts per class are "
                        f"{counts.tolist()}: draw k images of every class (few_shot_indices).")
    k = int(counts[0])
    if out is not None:
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (
                overwrite and (out / GUIDE_RECORD_FILE).is_file()):
            raise UserError(f"`out` {str(out)!r} exists and is not empty: pass an empty or new folder, or "
                            f"--overwrite to replace a guide fitted there before." if not overwrite else
                            f"`out` {str(out)!r} is not a guide folder (no {GUIDE_RECORD_FILE}): synthaug replaces only "
                            f"what it wrote; pass a new folder.")
    if strength is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float))
                                 or not math.isfinite(strength) or strength <= 0):
        raise UserError(f"`strength` must be a finite number > 0 (the L2 strength of a linear head, the logit scale "
                        f"of a prototype head) or None (chosen by leave-one-out) but is {strength!r}.")
    if features is not None and features not in ("pooled", "projected", "patch_mean"):
        raise UserError(f"`features` must be pooled, projected or patch_mean but is {features!r}.")
    dev = torch.device(device)
    bb, data_config = load_backbone(backbone, local_files_only=True)
    bb.to(dev)
    kinds = FAMILY_FEATURES[bb.family] if features is None else (features,)
    if features is not None and features not in FAMILY_FEATURES[bb.family]:
        raise UserError(f"`features` {features!r}: a {bb.family} backbone gives "
                        f"{', '.join(FAMILY_FEATURES[bb.family])}.")

    # 2. Features of the shots and their shifted copies (computed once; every candidate reuses them)
    batch, source = augmented(_to_tensors(images), augment, seed)
    feats = _features(bb, data_config, batch, dev)
    src = torch.as_tensor(source)
    y = y_shots[src]
    # fold of each shot: its rank within its class (the j-th shot of every class is held out together)
    rank = torch.zeros(len(y_shots), dtype=torch.long)
    for c in range(len(labels)):
        idx = (y_shots == c).nonzero().flatten()
        rank[idx] = torch.arange(len(idx))

    # 3. Leave-one-out over the candidate settings; the estimate a user reads is the whole procedure's (nested:
    #    each held-out fold's setting chosen on the other folds alone), since the chosen setting's own score is the
    #    best of many on few images and so optimistic
    if strength is not None:  # fixed: the only candidate
        grid = (float(strength),)
    else:
        grid = STRENGTHS if head == "linear" else SCALES
    default = (features or "pooled", float(grid[0]) if strength is not None
               else float(STRENGTHS[len(STRENGTHS) // 2 - 1]) if head == "linear" else float(SCALES[1]))
    candidates: list[dict[str, Any]] = []
    why = selected_acc = None
    every = torch.ones(len(y_shots), dtype=torch.bool)
    is_original = torch.ones(len(src), dtype=torch.bool)
    is_original[1:] = src[1:] != src[:-1]  # a shot's first row is the shot itself, its shifted copies follow
    if k >= 2:
        candidates = _choose(head, feats, y, y_shots, src, rank, len(labels), kinds, grid, every)
        kind, strength = candidates[0]["features"], float(candidates[0]["strength"])
        selected_acc = float(candidates[0]["loo_accuracy"])
        nested = torch.zeros(len(y_shots), len(labels), dtype=torch.float64)
        for j in range(k):
            inner = rank != j
            pick = (_choose(head, feats, y, y_shots, src, rank, len(labels), kinds, grid, inner)[0] if k >= 3
                    else {"features": default[0], "strength": default[1]})  # one shot left per class: no choice
            train, rows = inner[src], ~inner[src] & is_original
            w, b = _fit(head, feats[pick["features"]][train], y[train], len(labels), float(pick["strength"]))
            nested[src[rows]] = (feats[pick["features"]][rows] @ w.T + b).softmax(-1)
        pred = nested.argmax(-1)
        loo_acc = float((pred == y_shots).double().mean())
        loo_per_class = {labels[c]: float((pred[y_shots == c] == c).double().mean()) for c in range(len(labels))}
        if k == 2:
            why = "two shots per class: the held-out estimate uses the default setting (one shot left to choose on)"
    else:
        why = "one shot per class: nothing can be held out without removing a class"
        kind, strength = default
        loo_acc, loo_per_class = None, None
    for c in candidates:
        c.pop("_probs")

    # 4. The head on every shot, and the guide
    w, b = _fit(head, feats[kind], y, len(labels), strength)
    train_pred = (feats[kind] @ w.T + b).argmax(-1)
    train_acc = float((train_pred[is_original] == y_shots).double().mean())
    model = ProbeModel(Backbone(bb.model, bb.family, kind), w.float(), b.float(), labels).to(dev)
    info = dict(shots_info or {})
    note = trained_on or (f"few-shot probe: {k} images per class of {info.get('dataset', 'the user')}"
                          f"{'/' + str(info['split']) if info.get('split') else ''} "
                          f"(shots_seed {info.get('shots_seed', 'unknown')})")
    guide = Classifier(model, labels, data_config, source=str(out) if out is not None else "fitted probe",
                       trained_on=note, kind="probe")
    record = FitRecord(
        backbone=str(backbone), family=bb.family, head=head, features=kind, strength=strength, shots=k,
        shots_seed=int(info.get("shots_seed", 0)), dataset=str(info.get("dataset", "")),
        split=str(info.get("split", "")), indices=[int(i) for i in info.get("indices", [])],
        paths=[str(p) for p in info.get("paths", [])], augment=augment, loo_accuracy=loo_acc,
        loo_per_class=loo_per_class, candidates=candidates, train_accuracy=train_acc, labels=labels, why_no_loo=why,
        selected_loo_accuracy=selected_acc)
    if out is not None:
        _write_guide(out, model, data_config, record, backbone, note)
    log.info("fitted a %s probe on %s (%s features, %s %g) from %d shots per class in %.1f s: leave-one-out %s",
             head, backbone, kind, "strength" if head == "linear" else "scale", strength, k,
             time.perf_counter() - started, "n/a (one shot per class)" if loo_acc is None else f"{100 * loo_acc:.1f}%")
    return guide, record


def _write_guide(out: Path, model: ProbeModel, data_config: dict[str, Any], record: FitRecord, backbone: str,
                 note: str) -> None:
    """Write the folder beside `out` and rename it into place: a guide folder is complete or absent."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    source_dir = _source_dir(backbone)
    write_probe(tmp, model, data_config, source=backbone, source_dir=source_dir, trained_on=note)
    write_text(tmp / GUIDE_RECORD_FILE, record.to_json())
    old = None
    if out.exists():  # checked by fit_guide: an empty folder or a guide folder with --overwrite
        old = out.parent / f".old-{out.name}.{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def _source_dir(backbone: str) -> str | None:
    """The local folder a backbone was read from (its preprocessor_config.json is copied), or None."""
    if backbone == "digits":
        return str(DIGITS_CLIP)
    p = Path(backbone).expanduser()
    if p.is_dir():
        return str(p)
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(backbone, "preprocessor_config.json")
        return str(Path(hit).parent) if isinstance(hit, str) else None
    except (ImportError, OSError, ValueError):
        return None


def default_backbone(dataset: str, clip_model: str | None = None) -> str:
    """The backbone a few-shot guide is fitted on by default: `clip_model` when given (a build passes the CLIP
    paired with its diffusion model), else the embedded CLIP on the digits world and OpenAI's CLIP ViT-L/14 (Stable
    Diffusion 1.x's text tower's image side) elsewhere."""
    if clip_model:
        return clip_model
    return "digits" if dataset == "digits" else "openai/clip-vit-large-patch14"


def fit_dataset_guide(
    dataset: Any,
    out: str | os.PathLike | None,
    *,
    shots: int,
    shots_seed: int = 0,
    backbone: str = "digits",
    head: str = "linear",
    strength: float | None = None,
    dataset_name: str = "",
    split: str = "",
    classes: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
) -> tuple[Classifier, FitRecord]:
    """`fit_guide` on the user's k images per class of a torchvision-style dataset: ``few_shot_indices(
    dataset.targets, shots, shots_seed)``, the same images ``SynthAugDataset(shots=k, seed=shots_seed)`` mixes in.

    Args:
        dataset: has ``classes``, ``targets`` and ``dataset[i] -> (image, target)``.
        classes: fit on these class indices only (a build's selection), outputs in their order; None: every class.
        the rest: `fit_guide`'s.

    >>> from synthaug.datasets import Digits
    >>> guide, record = fit_dataset_guide(Digits(split="train"), "guides/k3", shots=3)  # doctest: +SKIP
    """
    from ..datasets.fewshot import few_shot_indices, sample_paths

    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise UserError(f"`shots` must be an integer >= 1 (real images per class the guide is fitted on) but is "
                        f"{shots!r}.")
    targets = list(getattr(dataset, "targets", None) or [])
    names = list(getattr(dataset, "classes", None) or [])
    if not targets or len(names) < 2:
        raise UserError(f"`dataset` {dataset_name or type(dataset).__name__!r} has no labels (classes and targets): "
                        f"a guide is fitted on labelled images; pass a labelled dataset.")
    keep = list(range(len(names))) if classes is None else [int(c) for c in classes]
    position = {c: i for i, c in enumerate(keep)}
    chosen = [i for i in few_shot_indices(targets, shots, shots_seed, allow_fewer=True) if targets[i] in position]
    for c in keep:  # few_shot_indices names a short class only among those present: say it for the selection
        if sum(targets[i] == c for i in chosen) < shots:
            raise UserError(f"`shots` is {shots} but class {c} ({names[c]!r}) has fewer images in split "
                            f"{split or 'train'!r}: use shots <= its count.")
    images = [dataset[i][0] for i in chosen]
    return fit_guide(images, [position[targets[i]] for i in chosen], [names[c] for c in keep], out,
                     backbone=backbone, head=head, strength=strength, device=device, overwrite=overwrite,
                     shots_info={"shots_seed": shots_seed, "dataset": dataset_name, "split": split,
                                 "indices": chosen, "paths": sample_paths(dataset, chosen)})
