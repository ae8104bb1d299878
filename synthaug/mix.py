"""Synthetic + real training data as one map-style dataset (torchvision conventions).

Consumes a build directory (``index.parquet`` + ``shards/``) and, optionally, a real dataset from
`synthaug.datasets`, and produces `SynthAugDataset`: ``(image, target)`` items, attributes `classes`,
`class_to_idx`, `samples`, `targets`, three mixing modes, and per-epoch draws that are the same in every DataLoader
worker for the same seed and epoch. Synthetic images are read with one positioned read from their tar (offset/size
from the index) — no extraction, no scan.

Which synthetic images: the build's own method by default (`synthaug.index.train_methods`, the ``train`` split; the
``--baseline`` plain-prompt images only when asked), per-class methods (``class_methods``), a guide-confidence
threshold (``min_confidence``) and a per-class cap that keeps the first or the guide's surest images
(``synthetic_per_class``, ``rank``). ``targets="soft"``: the guide's recorded probabilities for synthetic items,
one-hot for real ones.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.context
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from torchvision.datasets import VisionDataset

from .datasets.fewshot import few_shot_indices, targets_of
from .errors import UserError
from .index import load_index, train_methods
from .layout import CLASSES_FILE, KNOWN_METHODS, SHARDS_DIR, read_config, resume_command, shard_name
from .names import normalize_name
from .shards import ShardReader

logger = logging.getLogger(__name__)

MODES = ("concat", "replace", "ratio")

TARGETS = ("hard", "soft")  # what an item's target is: the class index, or a probability vector over the classes

RANKS = ("index", "confidence")  # which synthetic images of a class a per-class cap keeps first


class Source(NamedTuple):
    """Where item `i` comes from in the current epoch."""

    kind: str  # "real" | "synthetic"
    index: int  # index into the real dataset, or row of `SynthAugDataset.synthetic`
    target: int


class _SharedEpoch:
    """An epoch counter shared with DataLoader workers, so `set_epoch` in the main process reaches persistent workers.

    Backed by shared memory that forked or spawned workers inherit; pickled any other way (deepcopy, Ray) it turns
    into a plain private value, because shared memory cannot travel there.
    """

    def __init__(self, value: int = 0) -> None:
        self._shared = multiprocessing.RawValue("q", value)
        self._value: int | None = None

    @property
    def value(self) -> int:
        return self._shared.value if self._shared is not None else self._value

    @value.setter
    def value(self, v: int) -> None:
        if self._shared is not None:
            self._shared.value = v
        else:
            self._value = v

    def __getstate__(self) -> dict[str, Any]:
        if self._shared is not None and multiprocessing.context.get_spawning_popen() is not None:
            return {"_shared": self._shared, "_value": None}
        return {"_shared": None, "_value": self.value}


def _classes_of(real: Any) -> list[str]:
    classes = getattr(real, "classes", None)
    if classes is None and hasattr(real, "dataset"):
        classes = getattr(real.dataset, "classes", None)
    if classes is None:
        raise UserError(f"`real` ({type(real).__name__}) has no `classes`: class names are needed to check that "
                        "real and synthetic class indices agree.")
    return [str(c) for c in classes]


class SynthAugDataset(VisionDataset):
    """Synthetic images from a synthaug build, mixed with (a few-shot subset of) a real dataset.

    Modes:
        ``"concat"``: the union — every selected real image and every selected synthetic image, once per epoch.
        ``"replace"`` (DA-Fusion style): the real images only, but item ``i`` serves, with probability `p`, a random
            synthetic image of the same class instead (classes without synthetic images always serve the real one).
        ``"ratio"``: every real image plus synthetic images drawn afresh each epoch, class-balanced, so that they
            make a fraction `p` of the epoch.

    For few-shot training, ``mode="ratio", p=0.5`` measured best on the digits world (synthetic images lifted every k
    there, where ``"concat"`` with 100 synthetic per class let them swamp 9 real ones; RESULTS.md "Making the tokens
    help"); ``min_confidence=0.9`` lifted plain-prompt and DCT images further, to a tie between them. ``"concat"`` is
    the paper's Table 2 protocol and stays the default here.

    Draws depend only on ``(seed, epoch, item)``: the same in every DataLoader worker and on every rerun. Call
    `set_epoch` before each epoch (``"replace"``/``"ratio"``); it reaches persistent workers too.

    Args:
        root: the build directory (``index.parquet``, ``shards/``, ``classes.json``).
        real: a real dataset with `classes` and `targets` (from `synthaug.datasets`, torchvision, or a Subset of
            one), given *without* a transform — `transform` here applies to real and synthetic images alike.
            None: synthetic images only.
        shots: real images per class, drawn with `shots_seed` (else `seed`; `synthaug.datasets.few_shot_indices`).
            ``"build"`` (the default): the build's own ``shots``, drawn with its ``shots_seed`` — the user's k real
            images every stage of the build read (MC-TI, a fitted guide, the trust check, real starts); None = all of
            them; 0 = none (the classes of `real` still define the labels).
        transform: applied to every PIL image (RGB).
        target_transform: applied to every int target.
        seed: seeds the few-shot draw and the per-epoch draws.
        shots_seed: seeds the few-shot draw instead of `seed`: several seeds of training on the same k real images
            (e.g. the ones a few-shot guide was trained on); with ``shots="build"``: the build's own by default.
        synthetic_per_class: keep at most this many synthetic images per class (lowest sample index first, so a cap
            of 50 on a 100-per-class build equals a 50-per-class build).
        mode: ``"concat"``, ``"replace"`` or ``"ratio"``.
        p: ``"replace"``: probability that a real item serves a synthetic image; ``"ratio"``: the synthetic fraction
            of each epoch (in [0, 1)).
        methods: keep only these generation methods (``dct``, ``sd``, ``ti``, ``mcti``). None (the default): the
            build's own method only (its ``train`` split, `synthaug.index.train_methods`: the plain-prompt ``sd``
            images of ``--baseline`` are there to compare against, not to train on); ``"all"``: every method in the
            build; ``["sd"]`` or ``["dct", "sd"]`` ask for the baseline images by name.
        min_confidence: keep only synthetic images whose guide probability is at least this (images without one
            are dropped).
        class_methods: per-class methods that replace `methods` for the classes named (build class names or
            indices), e.g. ``{"four": ["dct"], "nine": ["dct"]}`` with ``methods=["sd"]``: token images only for the
            classes whose plain prompts fail, plain-prompt images for the rest.
        rank: which synthetic images of a class `synthetic_per_class` keeps: ``"index"`` (the lowest sample indices,
            the default) or ``"confidence"`` (the ones the guide is surest of — a per-class share instead of one
            probability threshold for every class; images without a guide probability come last).
        check_classes: refuse real and synthetic class lists whose names disagree at the same index.
        check_sha256: verify each synthetic image's bytes against the index on every read.
        class_map: build class index -> real target, when the build's classes are not the real dataset's (a CUB
            build with iNat179 real images, `synthaug.evaluate.names.map_classes`); synthetic images of build classes
            it leaves out are dropped. It replaces the name check.
        targets: ``"hard"``: every target is the class index. ``"soft"``: a float32 tensor of class probabilities —
            the guide's soft label for a synthetic image (distillation through images: the probabilities the build
            recorded for its top classes and the target, the rest of the mass spread evenly over the other classes),
            one-hot for a real image. Train with ``torch.nn.functional.cross_entropy(logits, target)``, which takes
            probabilities. Needs a build that recorded them (``guide_soft_probs`` in the index).
        temperature: ``"soft"`` only: each synthetic label becomes ``p ** (1 / temperature)``, renormalised; 1 keeps
            the guide's probabilities, above 1 softens them, below 1 sharpens them towards the guide's top class.

    >>> from synthaug.datasets import CUB200
    >>> ds = SynthAugDataset("out/cub", real=CUB200("data/CUB_200_2011"), shots=5, mode="concat")  # doctest: +SKIP
    >>> image, target = ds[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | Path,
        real: Any | None = None,
        *,
        shots: int | str | None = "build",
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        seed: int = 0,
        synthetic_per_class: int | None = None,
        mode: str = "concat",
        p: float = 0.5,
        methods: Iterable[str] | None = None,
        min_confidence: float | None = None,
        check_classes: bool = True,
        check_sha256: bool = False,
        class_map: Mapping[int, int] | None = None,
        shots_seed: int | None = None,
        targets: str = "hard",
        temperature: float = 1.0,
        class_methods: Mapping[str | int, str | Iterable[str]] | None = None,
        rank: str = "index",
    ) -> None:
        super().__init__(str(root), transform=transform, target_transform=target_transform)
        # 1. Check the arguments before touching any data.
        if mode not in MODES:
            raise UserError(f"`mode` must be one of {', '.join(MODES)} but is {mode!r}.")
        if not 0.0 <= p <= 1.0 or (mode == "ratio" and p >= 1.0):
            valid = "[0, 1)" if mode == "ratio" else "[0, 1]"
            raise UserError(f"`p` must be in {valid} for mode={mode!r} but is {p!r}.")
        if synthetic_per_class is not None and synthetic_per_class < 0:
            raise UserError(f"`synthetic_per_class` must be >= 0 (or None for all) but is {synthetic_per_class!r}.")
        if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
            raise UserError(f"`min_confidence` must be in [0, 1] (or None) but is {min_confidence!r}.")
        if targets not in TARGETS:
            raise UserError(f"`targets` must be one of {', '.join(TARGETS)} but is {targets!r}.")
        if rank not in RANKS:
            raise UserError(f"`rank` must be one of {', '.join(RANKS)} but is {rank!r}.")
        if class_methods is not None and not isinstance(class_methods, Mapping):
            raise UserError(f"`class_methods` must be a mapping of class name (or index) to methods, e.g. "
                            f"{{'nine': ['dct']}}, but is {class_methods!r}.")
        class_methods = {c: [m] if isinstance(m, str) else list(m) for c, m in (class_methods or {}).items()}
        for c, ms in class_methods.items():
            bad = [m for m in ms if m not in KNOWN_METHODS]
            if bad or not ms:
                raise UserError(f"`class_methods` {c!r}: methods must be a non-empty list among "
                                f"{', '.join(KNOWN_METHODS)} but are {ms!r}.")
        if isinstance(temperature, (bool, np.bool_)) or not (isinstance(temperature, numbers.Real)
                                                             and np.isfinite(temperature) and temperature > 0):
            raise UserError(f"`temperature` must be a finite number > 0 (not a bool) but is {temperature!r}: 1 keeps "
                            "the guide's probabilities.")
        if methods is not None and not (isinstance(methods, str) and methods == "all"):
            methods = [methods] if isinstance(methods, str) else list(methods)
            bad = [m for m in methods if m not in KNOWN_METHODS]
            if bad:
                raise UserError(f"`methods` must be among {', '.join(KNOWN_METHODS)} (or \"all\") but contains "
                                f"{bad!r}.")
        self.mode, self.p, self.seed, self.shots = mode, float(p), int(seed), shots
        self.rank = rank
        self.min_confidence = min_confidence
        self.synthetic_per_class = synthetic_per_class
        self.check_sha256 = check_sha256
        self.target_kind, self.temperature = targets, float(temperature)
        self.real = real
        if real is not None and transform is not None and getattr(real, "transform", None) is not None:
            warnings.warn("`real` has its own transform and SynthAugDataset applies `transform` again to real "
                          "images: build `real` with transform=None.", stacklevel=2)

        # 2. Synthetic rows: filter by method and confidence, then cap per class.
        table = load_index(root)
        if methods is None:
            methods = train_methods(root)
        if methods == "all":
            methods = None
        self.methods = methods  # the methods kept; None: every method of the build
        columns = ["key", "class_index", "class_name", "method", "index", "guide_prob", "shard", "offset", "size",
                   "sha256", "image_format"] + (["guide_soft_classes", "guide_soft_probs"] if targets == "soft" else [])
        rows = table.select(columns).to_pydict()
        available = sorted(set(rows["method"]))
        keep = np.ones(table.num_rows, dtype=bool)
        method_col = np.asarray(rows["method"], dtype=object)
        if methods is not None:
            keep &= np.isin(method_col, methods)
        if class_methods:
            per_class = self._class_methods(class_methods, rows)
            missing = sorted({m for ms in per_class.values() for m in ms} - set(available))
            if missing:
                raise UserError(f"`class_methods` asks for methods {missing!r} but the build has {available}: name "
                                f"methods the build made (a plain-prompt `sd` needs a --baseline build).")
            cls_col = np.asarray(rows["class_index"], dtype=np.int64)
            for c, ms in per_class.items():
                here = cls_col == c
                keep[here] = np.isin(method_col[here], ms)
        if min_confidence is not None:
            gp = np.array([np.nan if v is None else v for v in rows["guide_prob"]], dtype=np.float64)
            keep &= np.nan_to_num(gp, nan=-1.0) >= min_confidence
        sel = np.flatnonzero(keep)
        cls_all = np.asarray(rows["class_index"], dtype=np.int64)
        idx_all = np.asarray(rows["index"], dtype=np.int64)
        # lowest sample index first, then method: a cap keeps the first images of every method in turn (or the
        # guide's surest first, with rank="confidence")
        if rank == "confidence":
            conf = np.nan_to_num(np.array([np.nan if v is None else v for v in rows["guide_prob"]], dtype=np.float64),
                                 nan=-np.inf)
            order = sorted(sel.tolist(), key=lambda r: (cls_all[r], -conf[r], idx_all[r], rows["method"][r]))
        else:
            order = sorted(sel.tolist(), key=lambda r: (cls_all[r], idx_all[r], rows["method"][r]))
        if synthetic_per_class is not None:
            taken: dict[int, int] = {}
            capped = []
            for r in order:
                c = int(cls_all[r])
                if taken.get(c, 0) < synthetic_per_class:
                    taken[c] = taken.get(c, 0) + 1
                    capped.append(r)
            order = capped
        if class_map is not None:
            order = [r for r in order if int(cls_all[r]) in class_map]
        order = np.asarray(order, dtype=np.int64)
        self.synthetic = {k: [rows[k][r] for r in order] for k in ("key", "class_index", "class_name", "method",
                                                                   "index", "guide_prob", "sha256")}
        self._format = [rows["image_format"][r] for r in order]
        self._shard = np.asarray(rows["shard"], dtype=np.int64)[order] if len(order) else np.zeros(0, np.int64)
        self._offset = np.asarray(rows["offset"], dtype=np.int64)[order] if len(order) else np.zeros(0, np.int64)
        self._size = np.asarray(rows["size"], dtype=np.int64)[order] if len(order) else np.zeros(0, np.int64)
        self._syn_class = cls_all[order] if len(order) else np.zeros(0, np.int64)
        if class_map is not None:
            self._syn_class = np.asarray([class_map[int(c)] for c in self._syn_class], dtype=np.int64)
        if real is None and len(order) == 0:
            raise UserError(f"No synthetic images in {root} match methods={methods!r}, "
                            f"min_confidence={min_confidence!r} (the build has methods {available}): relax the "
                            "filters or pass a real dataset.")
        self._by_class: dict[int, np.ndarray] = {
            int(c): np.flatnonzero(self._syn_class == c) for c in np.unique(self._syn_class)
        }

        # 3. Classes: the real dataset's, checked against the build's names at the same index.
        syn_names = self._synthetic_class_names(Path(root), table)
        if real is not None:
            self.classes = _classes_of(real)
            if check_classes and class_map is None:
                self._check_alignment(syn_names)
        else:
            n = max(syn_names) + 1 if syn_names else 0
            self.classes = [syn_names.get(i, f"class {i}") for i in range(n)]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        # 4. Real items: all of them, or `shots` per class (the build's own k by default).
        if shots == "build" and real is not None:
            built = read_config(root, what="root", missing_ok=True)  # a folder of shards alone: no k recorded
            shots = built.get("shots")
            if shots_seed is None:
                shots_seed = built.get("shots_seed")
        elif isinstance(shots, str) and shots != "build":
            raise UserError(f"`shots` must be an integer >= 0, None (all real images) or 'build' (the build's own k) "
                            f"but is {shots!r}.")
        self.shots = shots if real is not None else None
        if real is None:
            self._real_index = np.zeros(0, dtype=np.int64)
            self._real_targets = np.zeros(0, dtype=np.int64)
        else:
            real_targets = targets_of(real)
            chosen = (list(range(len(real_targets))) if shots is None
                      else few_shot_indices(real_targets, shots, seed if shots_seed is None else shots_seed))
            self._real_index = np.asarray(chosen, dtype=np.int64)
            self._real_targets = np.asarray([real_targets[i] for i in chosen], dtype=np.int64)
        n_real, n_syn = len(self._real_index), len(self._syn_class)
        if mode in ("replace", "ratio") and n_real == 0:
            raise UserError(f"mode={mode!r} mixes synthetic images into real ones, but there are no real images "
                            f"(real={'None' if real is None else type(real).__name__}, shots={shots!r}): pass a "
                            "real dataset and shots > 0, or use mode='concat'.")
        if mode in ("replace", "ratio") and n_syn == 0 and p > 0:
            logger.warning("no synthetic images selected: mode=%r serves real images only", mode)
        self._n_ratio = round(n_real * self.p / (1.0 - self.p)) if mode == "ratio" and n_syn else 0

        # 5. Soft labels: one probability vector per synthetic row, over this dataset's classes.
        self._soft = (self._soft_labels(rows, order, class_map, Path(root)) if targets == "soft"
                      else np.zeros((0, 0), np.float32))
        self._epoch = _SharedEpoch(0)
        self._plan_cache: tuple[int, np.ndarray] | None = None
        self._reader = ShardReader(root)

    # ----------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _class_methods(class_methods: dict[Any, list[str]], rows: dict[str, list]) -> dict[int, list[str]]:
        """`class_methods` keyed by build class index; a name or index the build does not have is refused."""
        by_name = {normalize_name(n): int(c) for c, n in zip(rows["class_index"], rows["class_name"])}
        indices = set(by_name.values())
        out = {}
        for c, ms in class_methods.items():
            if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
                found = int(c) if int(c) in indices else None
            else:
                found = by_name.get(normalize_name(str(c)))
            if found is None:
                raise UserError(f"`class_methods` names class {c!r}, which the build has no images of: use a build "
                                f"class name or index (e.g. {next(iter(by_name), 'zero')!r}).")
            out[found] = ms
        return out

    def _synthetic_class_names(self, root: Path, table: Any) -> dict[int, str]:
        """index -> name: classes.json when present (every class of the build), else the names in the index."""
        path = root / CLASSES_FILE
        if path.is_file():
            try:
                return {int(c["index"]): str(c["name"]) for c in json.loads(path.read_text())}
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{path} is malformed ({e}): rerun `synthaug build` to write it again.") from None
        idx = table.column("class_index").to_pylist()
        names = table.column("class_name").to_pylist()
        return dict(zip(idx, names))

    def _check_alignment(self, syn_names: dict[int, str]) -> None:
        used = sorted(set(self._syn_class.tolist()))
        bad = []
        for c in used:
            real_name = self.classes[c] if c < len(self.classes) else None
            if real_name is None or normalize_name(real_name) != normalize_name(syn_names.get(c, "")):
                bad.append(f"{c}: synthetic {syn_names.get(c)!r} vs real {real_name!r}")
        if bad:
            raise UserError(f"Class indices of {self.root} and the real dataset disagree ({len(bad)} classes; "
                            f"{'; '.join(bad[:3])}): build from the same dataset and class list, or pass "
                            "check_classes=False if the names differ only in wording.")

    def _soft_labels(self, rows: dict[str, list], order: np.ndarray, class_map: Mapping[int, int] | None,
                     root: Path) -> np.ndarray:
        """(synthetic rows, classes) float32: the stored guide probabilities, the rest spread evenly, tempered."""
        n_classes = len(self.classes)
        soft = np.zeros((len(order), n_classes), dtype=np.float64)
        for j, r in enumerate(order.tolist()):
            classes, probs = rows["guide_soft_classes"][r], rows["guide_soft_probs"][r]
            if classes is None or probs is None:
                raise UserError(
                    f"targets='soft' needs the guide's probabilities of every synthetic image, but "
                    f"{rows['key'][r]!r} in {root} has none (a build made before synthaug recorded them, or without "
                    f"a guide): rebuild it with `{resume_command(root)} --overwrite`, or "
                    "use targets='hard'.")
            stored = np.zeros(n_classes, dtype=bool)
            for c, pr in zip(classes, probs):
                t = class_map.get(int(c)) if class_map is not None else int(c)
                if t is not None and 0 <= t < n_classes:
                    soft[j, t] += pr
                    stored[t] = True
            rest = max(0.0, 1.0 - float(soft[j].sum()))
            if (~stored).any():
                soft[j, ~stored] = rest / int((~stored).sum())
        # p ** (1/T) renormalised is the softmax of log(p) / T: taken in log space, shifted so that each row's
        # largest entry is exactly 0, it neither underflows to all zeros (NaN after renormalising) for a small T nor
        # overflows for a large one
        logp = np.log(np.clip(soft, 1e-12, None))
        with np.errstate(over="ignore"):  # -inf for a class far below the top at a tiny T: exp makes it 0
            tempered = np.exp((logp - logp.max(axis=1, keepdims=True)) / self.temperature)
        return (tempered / tempered.sum(axis=1, keepdims=True)).astype(np.float32)

    def target_vector(self, src: Source) -> Any:
        """The soft target of an item's `Source`: the synthetic row's guide label, or one-hot for a real image."""
        import torch

        if src.kind == "synthetic":
            return torch.from_numpy(self._soft[src.index].copy())
        one_hot = torch.zeros(len(self.classes), dtype=torch.float32)
        one_hot[src.target] = 1.0
        return one_hot

    # ----------------------------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the per-epoch draw (``"replace"``, ``"ratio"``); shared with running DataLoader workers."""
        self._epoch.value = int(epoch)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def _ratio_plan(self) -> np.ndarray:
        """Synthetic rows of this epoch's ratio part: balanced over classes, each class drawn without replacement
        (cycling through fresh permutations when it has too few images), shuffled."""
        epoch = self.epoch
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, epoch, 1])
        classes = sorted(self._by_class)
        n = self._n_ratio
        extra = set(rng.permutation(len(classes))[: n % len(classes)].tolist()) if classes else set()
        parts = []
        for k, c in enumerate(classes):
            need = n // len(classes) + (1 if k in extra else 0)
            pool = self._by_class[c]
            draws = [rng.permutation(pool) for _ in range(-(-need // len(pool)))] if need else []
            parts.append(np.concatenate(draws)[:need] if draws else np.zeros(0, np.int64))
        plan = rng.permutation(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        self._plan_cache = (epoch, plan)
        return plan

    def __len__(self) -> int:
        if self.mode == "concat":
            return len(self._real_index) + len(self._syn_class)
        if self.mode == "replace":
            return len(self._real_index)
        return len(self._real_index) + self._n_ratio

    def source(self, index: int) -> Source:
        """Where item `index` comes from in the current epoch (real index or synthetic row) and its target."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} items")
        index %= n
        n_real = len(self._real_index)
        if index < n_real:
            target = int(self._real_targets[index])
            if self.mode == "replace" and target in self._by_class:
                rng = np.random.default_rng([self.seed, self.epoch, index])
                if rng.random() < self.p:
                    pool = self._by_class[target]
                    return Source("synthetic", int(pool[rng.integers(len(pool))]), target)
            return Source("real", int(self._real_index[index]), target)
        row = index - n_real if self.mode == "concat" else int(self._ratio_plan()[index - n_real])
        return Source("synthetic", row, int(self._syn_class[row]))

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        src = self.source(index)
        if src.kind == "real":
            img, _ = self.real[src.index]
            if getattr(img, "mode", "RGB") != "RGB":  # PIL in another mode; tensors pass through untouched
                img = img.convert("RGB")
        else:
            img = self.load_synthetic(src.index)
        target = self.target_vector(src) if self.target_kind == "soft" else src.target
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def load_synthetic(self, row: int) -> Any:
        """The PIL image (RGB) of synthetic row `row`: one positioned read from its tar, then decode."""
        return self._reader.read_image(
            int(self._shard[row]), int(self._offset[row]), int(self._size[row]),
            sha256=self.synthetic["sha256"][row] if self.check_sha256 else None,
            key=self.synthetic["key"][row], image_format=self._format[row],
        )

    @property
    def targets(self) -> list[int]:
        """Target of every item in the current epoch (the class never changes under ``"replace"``)."""
        if self.mode == "ratio":
            plan = self._ratio_plan()
            return self._real_targets.tolist() + self._syn_class[plan].tolist()
        if self.mode == "replace":
            return self._real_targets.tolist()
        return self._real_targets.tolist() + self._syn_class.tolist()

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(location, target)`` per item: the real file path (when the real dataset has one) or
        ``shards/dct-00003.tar#dct-c017-s00042`` for a synthetic image (under ``"replace"``: the real item)."""
        real_samples = getattr(self.real, "samples", None) if self.real is not None else None
        out = []
        for i, t in zip(self._real_index.tolist(), self._real_targets.tolist()):
            out.append((str(real_samples[i][0]) if real_samples else f"real:{i}", t))
        if self.mode == "replace":
            return out
        rows = range(len(self._syn_class)) if self.mode == "concat" else self._ratio_plan().tolist()
        for r in rows:
            name = shard_name(int(self._shard[r]), self.synthetic["method"][r])
            out.append((f"{SHARDS_DIR}/{name}.tar#{self.synthetic['key'][r]}", int(self._syn_class[r])))
        return out

    def extra_repr(self) -> str:
        if self.real is None:
            real = "none"
        else:
            which = "all" if self.shots is None else f"{self.shots} per class"
            real = f"{len(self._real_index)} ({which} of {type(self.real).__name__})"
        methods = ", ".join(sorted(set(self.synthetic["method"]))) or "none"
        return "\n".join([
            f"Mode: {self.mode}" + (f" (p={self.p})" if self.mode != "concat" else ""),
            f"Real: {real}",
            f"Synthetic: {len(self._syn_class)} images in {len(self._by_class)} classes (methods: {methods})",
            f"Classes: {len(self.classes)}",
        ] + ([f"Targets: soft (temperature {self.temperature:g})"] if self.target_kind == "soft" else []))


__all__ = ["MODES", "RANKS", "TARGETS", "Source", "SynthAugDataset"]
