"""What the CLI subcommands run besides `build`: learn tokens, generate to a folder, classify images, inspect a build."""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .atomic import atomic_write, write_bytes, write_text
from .classifier.load import load_classifier
from .classifier.source import check_label_agreement, declared_labels, declared_multi_label
from .config import from_dict
from .datasets.base import class_aliases
from .datasets.catalog import get_dataset
from .datasets.fewshot import shots_by_class
from .datasets.select import select_classes
from .errors import UserError, write_errors
from .generation import generate, real_start_images
from .index import load_index
from .index import verify as verify_shards
from .layout import (
    ALL_TOKENS_FILE,
    CLASSES_FILE,
    EXPORT_DIR,
    FAILURES_FILE,
    FINAL_FILES,
    GUIDE_RECORD_FILE,
    PLAN_FILE,
    TOKENS_DIR,
    ClassJob,
    check_export_dest,
    class_token_files,
    done_shards,
    fits_guide,
    fitted_guide_dir,
    kept_verdict,
    legacy_build_error,
    read_config,
    read_plan,
    read_shots,
    resume_command,
    sample_key,
    shard_done,
    shard_name,
    token_done,
    token_path,
    token_string,
    trust_path,
)
from .models import load_diffusion
from .reshard import RESHARD_FILE, default_dest, verify_export
from .shards import OPTIONAL_COLUMNS, encode_image
from .target import GuideTarget, check_label_free, parse_guide_target
from .token_methods import get_method
from .tokens.clip import classify, load_clip
from .tokens.dct import TokenResult, learn_dct_token
from .tokens.io import (
    add_tokens,
    int_or_none,
    load_tokens,
    save_token,
    save_tokens,
    token_metadata,
    token_metadata_or_empty,
    token_updates,
)
from .tokens.text import token_name
from .tokens.trust import TrustVerdict, read_verdict

if TYPE_CHECKING:
    import torch


@dataclass
class InspectResult:
    """What a build folder holds (`inspect`).

    Attributes:
        out: the build directory.
        config: the build's resolved config (``config.yaml``) as a nested dict.
        classes: per selected class: ``index``, ``name``, ``token``, ``token_done``, ``images`` ({method: count}),
            ``shards_done``, ``shards`` (planned), and token ``steps`` / ``stop_reason`` where the token exists, and
            ``trust`` (the ``dct.trust`` verdict: ``trusted``, its numbers, ``fallback``) where it was checked.
        counts: ``{method: {class_index: images on disk}}``.
        images: images on disk; `images_expected`: images the plan makes.
        shards_done / shards_expected: finished shards / planned shards.
        tokens_done: class tokens on disk.
        complete: every shard and token done and the index merged.
        failures: the entries of ``failures.json`` (empty when there is none).
        problems: `synthaug.index.verify` lines (only with ``verify=True``; empty when all is well).
        verified: whether `problems` was computed.
        shots: ``shots.json``: the user's k real images per class the build read (None in older builds).
        attempts: with ``generate.keep_confidence``: ``{method: (images kept, seeds tried)}`` over the finished
            shards (a class's seeds tried: its last kept image's seed index + 1), per class in `classes` too.
        guide_fit: ``guide/guide.json`` of a ``guide: fit`` build: how its guide was fitted, its leave-one-out
            accuracy per class (None otherwise).
    """

    out: Path
    config: dict[str, Any]
    classes: list[dict[str, Any]]
    counts: dict[str, dict[int, int]]
    images: int
    images_expected: int
    shards_done: int
    shards_expected: int
    tokens_done: int
    complete: bool
    failures: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    verified: bool = False
    shots: dict[str, Any] | None = None
    guide_fit: dict[str, Any] | None = None
    attempts: dict[str, tuple[int, int]] | None = None

    @property
    def ok(self) -> bool:
        """True for a complete build without failures (and, when verified, without problems)."""
        return self.complete and not self.failures and not self.problems

    def summary(self) -> str:
        """A short human-readable report (what `synthaug inspect` prints)."""
        cfg = self.config
        methods = sorted({m for c in self.classes for m in c["images"]})
        lines = [
            (f"{self.out}: {'complete' if self.complete else 'INCOMPLETE'} — method {cfg.get('method')}"
             f"{' + sd baseline' if cfg.get('baseline') else ''}, model {cfg.get('model')}, guide {cfg.get('guide')}"),
            (f"classes {len(self.classes)}, tokens {self.tokens_done}/{len(self.classes)}, shards "
             f"{self.shards_done}/{self.shards_expected}, images {self.images}/{self.images_expected}"),
        ]
        header = f"{'class':>6}  {'name':<28} {'token':<6} " + " ".join(f"{m:>6}" for m in methods) + "  steps  stop"
        lines.append(header)
        for c in self.classes:
            lines.append(
                f"{c['index']:>6}  {str(c['name'])[:28]:<28} {'yes' if c['token_done'] else 'no':<6} "
                + " ".join(f"{c['images'].get(m, 0):>6}" for m in methods)
                + f"  {'' if c.get('steps') is None else c['steps']:>5}  {c.get('stop_reason') or ''}"
            )
        if self.shots:
            lines.append(f"the user's real images: {self.shots.get('shots')} per class of "
                         f"{self.shots.get('dataset')}/{self.shots.get('split')} (shots_seed "
                         f"{self.shots.get('shots_seed')}; {len(self.shots.get('indices') or [])} images, "
                         f"shots.json)")
        fit = self.guide_fit
        if fit:
            loo = fit.get("loo_accuracy")
            lines.append(f"fitted guide (guide/): {fit.get('head')} head on {fit.get('backbone')} "
                         f"({fit.get('features')} features), leave-one-out "
                         + ("n/a (one shot per class)" if loo is None else f"{100 * loo:.1f}%"))
            per = fit.get("loo_per_class") or {}
            worst = sorted(per.items(), key=lambda kv: kv[1])[:5]
            if worst:
                lines.append("  worst classes by leave-one-out: " + ", ".join(f"{n} {100 * a:.0f}%" for n, a in worst))
        if self.attempts:
            threshold = (self.config.get("generate") or {}).get("keep_confidence")
            lines.append(f"generate.keep_confidence {threshold}: generations per kept image "
                         + ", ".join(f"{m} {tried / max(kept, 1):.2f} ({kept} of {tried})"
                                     for m, (kept, tried) in sorted(self.attempts.items())))
        checked = [c for c in self.classes if c.get("trust")]
        if checked:
            lines.append(f"trust check (dct.trust={cfg.get('dct', {}).get('trust')}):")
        for c in checked:
            t = TrustVerdict(**{k: v for k, v in c["trust"].items() if k != "fallback"})
            lines.append(f"{c['index']:>6}  {str(c['name'])[:28]:<28} {t.describe()}"
                         + ("; generated with the plain prompt" if c["trust"].get("fallback") else ""))
        for f in self.failures:
            lines.append(f"FAILED class {f['class_index']} ({f.get('name')}) after {f.get('attempts')} attempt(s): "
                         f"{f.get('error', '').splitlines()[0] if f.get('error') else ''}")
        if self.verified:
            lines.append("verify: OK" if not self.problems else f"verify: {len(self.problems)} problem(s)")
            lines.extend(f"  {p}" for p in self.problems)
        if not self.complete and not self.failures:
            lines.append(f"resume with: {resume_command(self.out)}")
        return "\n".join(_printable(line) for line in lines)


def _printable(text: str) -> str:
    """`text` with every control character (a terminal escape sequence's ESC included) shown as its escape code:
    class names and metadata come from files and must not drive the user's terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


# --------------------------------------------------------------------------------------------------------------------
# inspect and export
# --------------------------------------------------------------------------------------------------------------------
def _open_build(out: str | os.PathLike) -> tuple[Path, dict[str, Any], list[ClassJob]]:
    out = Path(out).expanduser()
    config = read_config(out)
    if (legacy := legacy_build_error(out)) is not None:
        raise legacy
    planned = read_plan(out)
    if planned is None:
        raise UserError(f"`out` {str(out)!r} has no readable {PLAN_FILE} (the build never got past validation): "
                        f"run `{resume_command(out)}`.")
    return out, config, list(planned.jobs)


def _listed_classes(out: Path) -> list[int] | None:
    """The class indices ``classes.json`` lists (written from the plan when the build finished), or None."""
    try:
        return sorted(int(c["index"]) for c in json.loads((out / CLASSES_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def inspect(out: str | os.PathLike, *, verify: bool = False) -> InspectResult:
    """What a build folder holds: per class and method counts, tokens, config, failures; optionally verified.

    Reads ``config.yaml``, ``plan.json``, the shard stats files and the token files' headers — no dataset, no model.

    Args:
        out: the build directory.
        verify: also check every shard and image against its recorded size and sha256 (`synthaug.index.verify`).

    >>> result = inspect("out/digits", verify=True)  # doctest: +SKIP
    >>> print(result.summary())  # doctest: +SKIP
    """
    out, config, jobs = _open_build(out)
    counts: dict[str, dict[int, int]] = {}
    classes = []
    shards_done = tokens_done = images = images_expected = shards_expected = 0
    damaged: list[str] = []  # files a resume redoes, named by `verify`
    for j in jobs:
        per: Counter[str] = Counter()
        done_here = 0
        for t in j.shards:
            shards_expected += 1
            images_expected += t.size
            if shard_done(out, t.shard_id, t.method):
                per[t.method] += t.size
                done_here += 1
            counts.setdefault(t.method, {}).setdefault(j.class_index, 0)
        for m, n in per.items():
            counts[m][j.class_index] = n
        has_token = token_done(out, j.class_index)
        meta = token_metadata_or_empty(token_path(out, j.class_index)) if has_token else {}
        tokens_done += has_token
        shards_done += done_here
        images += sum(per.values())
        classes.append({"index": j.class_index, "name": j.name, "token": j.token, "token_done": has_token,
                        "images": {m: per.get(m, 0) for m in sorted({t.method for t in j.shards})},
                        "shards_done": done_here, "shards": len(j.shards), "steps": int_or_none(meta.get("steps")),
                        "updates": token_updates(meta),
                        "stop_reason": meta.get("stop_reason") or None})
        verdict, why = kept_verdict(out, j.class_index, read_verdict)
        if why is not None and why != "missing":  # damaged: the resume checks the class's token again
            damaged.append(f"{TOKENS_DIR}/{trust_path(out, j.class_index).name}: {why}; resume with "
                           f"{resume_command(out)} to check the class's token again.")
        elif verdict is not None:
                classes[-1]["trust"] = {**json.loads(verdict.to_json()),
                                        "fallback": (config.get("dct") or {}).get("trust") == "fallback"
                                        and not verdict.trusted}
    failures: list[dict[str, Any]] = []
    if (out / FAILURES_FILE).is_file():
        with contextlib.suppress(OSError, ValueError):
            failures = json.loads((out / FAILURES_FILE).read_text()).get("failed", [])
    complete = (shards_done == shards_expected and tokens_done == len(jobs)
                and all((out / f).is_file() for f in FINAL_FILES) and _listed_classes(out) == [j.class_index
                                                                                            for j in jobs])
    problems: list[str] = []
    if verify:

        problems = verify_shards(out) + damaged
        if (default_dest(out) / RESHARD_FILE).is_file():  # the export of its images, where `export` puts it
            problems += verify_export(default_dest(out))
        planned = {(t.shard_id, t.method) for j in jobs for t in j.shards}
        stray = sorted(set(done_shards(out).items()) - planned)
        problems += [f"{shard_name(*s)}: not in this build's plan (left from another config?); delete its files."
                     for s in stray]
    attempts = None
    if (config.get("generate") or {}).get("keep_confidence") is not None and shards_done:
        attempts = _attempts(out, classes)
    guide_fit = None
    record = fitted_guide_dir(out) / GUIDE_RECORD_FILE
    if config.get("guide") == "fit" and record.is_file():
        with contextlib.suppress(OSError, ValueError):
            guide_fit = json.loads(record.read_text())
    return InspectResult(out=out, config=config, classes=classes, counts=counts, images=images,
                         images_expected=images_expected, shards_done=shards_done, shards_expected=shards_expected,
                         tokens_done=tokens_done, complete=complete, failures=failures, problems=problems,
                         verified=verify, shots=read_shots(out), guide_fit=guide_fit, attempts=attempts)


def _attempts(out: Path, classes: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """``generate.keep_confidence``: images kept and seeds tried per method (and per class, into `classes`), from
    the finished shards' rows (a row's ``index`` is its seed index)."""
    rows = load_index(out).select(["class_index", "method", "index"]).to_pylist()
    per: dict[tuple[int, str], list[int]] = {}
    for r in rows:
        per.setdefault((int(r["class_index"]), r["method"]), []).append(int(r["index"]))
    by_class = {c["index"]: c for c in classes}
    total: dict[str, tuple[int, int]] = {}
    for (c, m), idx in sorted(per.items()):
        kept, tried = len(idx), max(idx) + 1
        if c in by_class:
            by_class[c].setdefault("attempts", {})[m] = (kept, tried)
        k, t = total.get(m, (0, 0))
        total[m] = (k + kept, t + tried)
    return total


def _own_guide(config) -> str:
    """The guide of `learn` / `generate`, which have no build folder for ``guide: fit`` to fit into."""
    if fits_guide(config):
        raise UserError("`guide` 'fit' fits a guide into a build folder, and this command makes none: fit one with "
                        "`synthaug fit-guide --dataset D --shots K --out DIR` and pass --guide DIR.")
    return config.guide


# --------------------------------------------------------------------------------------------------------------------
# `synthaug learn`: tokens for a few classes, without images
# --------------------------------------------------------------------------------------------------------------------
def learn_tokens(config, *, out: str | os.PathLike, progress: bool = True) -> list:
    """Learn the class tokens of the config's selected classes with its ``method`` (DCT, TI, MC-TI: any registered
    `synthaug.token_methods.TokenMethod`) and write them to `out` — what `synthaug learn` runs.

    Writes ``{class:03d}.safetensors`` per class (the same files `synthaug build` writes under ``tokens/``) and
    ``tokens.safetensors`` with all of them. A class whose file exists is loaded, not learned again (read back as a
    `TokenResult`). The method's inputs are checked before any model loads (its k real images: ``shots`` /
    ``shots_seed``, read from the dataset's split; a CLIP); the guide loads only for a guide-steered method.

    With ``config.guide_target = "attribute:NAME[=0|1]"`` (``--guide-target``; DCT) it learns one attribute token
    instead, steered by the multi-label guide's output NAME, and writes ``attribute-NAME-1.safetensors`` (token
    ``<synthaug-NAME-1>``; the file's metadata records the target); the dataset and class selection are not used,
    and the prompts (``dct.prompts``, ``generate.prompt``) must have no ``{label}``.

    >>> results = learn_tokens(load_config(overrides={"classes": "seven"}), out="tokens/")
    >>> ti = learn_tokens(load_config(overrides={"classes": "seven", "method": "ti"}), out="ti-tokens/")
    >>> attr = learn_tokens(load_config(overrides={"guide": "digits-attr-guide",
    ...                                            "guide_target": "attribute:closed_loop=1",
    ...                                            "dct.prompts": ["A photo of {token}"],
    ...                                            "generate.prompt": "A photo of {token}"}), out="tokens/")
    """
    target = parse_guide_target(config.guide_target)
    if not target.is_class:
        return [_learn_attribute_token(config, target, Path(out), progress)]
    method = get_method(config.method)
    dataset = get_dataset(config.dataset, config.root, config.split)
    names = [str(c) for c in dataset.classes]
    selected = select_classes(dataset, config.classes)
    method.check(config, dataset=dataset, class_names=names, selected=selected)
    out = Path(out)
    pipe = load_diffusion(config.model, device=config.device, dtype=config.dtype, scheduler=config.scheduler,
                          timestep_spacing=config.timestep_spacing, channels_last=config.channels_last)
    models: dict[str, Any] = {"pipe": pipe, "guide": None}
    if method.steered:
        models["guide"] = guide = load_classifier(_own_guide(config), device=pipe.device,
                                                  trained_on=config.guide_trained_on)
        check_label_agreement(class_aliases(dataset), labels=guide.labels, count=guide.num_classes, what="guide",
                              source=config.guide, dataset=config.dataset)
    if method.shots is not None:
        models["shots"] = shots_by_class(dataset, config.shots, config.shots_seed,
                                         None if method.shots == "all" else selected)
    models.update(method.prepare(config, models))
    results = []
    for c in selected:
        path = out / f"{c:03d}.safetensors"
        if path.is_file():
            results.append(_saved_token(path, c, names[c]))
            continue
        result = method.learn(config, models, ClassJob(c, names[c], token_string(c), ()), progress)
        method.save(result, path)
        results.append(result)
    save_tokens(results, out / ALL_TOKENS_FILE, {"model_id": config.model})
    return results


def _saved_token(path: Path, class_index: int | None = None, label: str | None = None) -> TokenResult:
    """A token file `synthaug learn` wrote, read back as the `TokenResult` it saved (class index and label from its
    metadata unless given; ``seconds`` 0: nothing was learned now)."""
    meta = token_metadata(path)
    (token, emb), = load_tokens(path).items()
    kept = ("model_id", "guide", "guide_trained_on") + (("target",) if "target" in meta else ())
    return TokenResult(token=token, class_index=int(meta.get("class_index", 0)) if class_index is None else class_index,
                       label=meta.get("label", "") if label is None else label, embedding=emb,
                       steps=int(meta.get("steps", 0)), stop_reason=meta.get("stop_reason", ""),
                       best_step=int(meta.get("best_step", 0)), history=json.loads(meta.get("history", "[]")),
                       seconds=0.0, unet_evals=int(meta.get("unet_evals", 0)),
                       metadata={k: meta.get(k) for k in kept}, updates=int(meta.get("updates", 0)))


def _learn_attribute_token(config, target: GuideTarget, out: Path, progress: bool) -> TokenResult:
    """`learn_tokens` for an attribute target: the guide's labels, kind and the prompts are checked before any model
    loads (where the guide's config file is on this machine), then the one token is learned, or loaded if its file
    exists."""
    labels, _ = declared_labels(_own_guide(config))
    multi_label = declared_multi_label(config.guide)
    if labels is not None and multi_label is not None:
        target.output_index(labels, multi_label=multi_label, source=config.guide)
    check_label_free((*config.dct.prompts, *([config.generate.prompt] if config.dct.select == "val" else [])), target)
    path = out / f"attribute-{target.stem}.safetensors"
    if path.is_file():
        return _saved_token(path)
    pipe = load_diffusion(config.model, device=config.device, dtype=config.dtype, scheduler=config.scheduler,
                          timestep_spacing=config.timestep_spacing, channels_last=config.channels_last)
    guide = load_classifier(_own_guide(config), device=pipe.device, trained_on=config.guide_trained_on)
    result = learn_dct_token(pipe, guide, config=config.dct, progress=progress, val_prompt=config.generate.prompt,
                             target=target)
    save_token(result, path)
    return result


# --------------------------------------------------------------------------------------------------------------------
# `synthaug classify`: a build's tokens as a CLIP classifier (Eq. 6)
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ClassifyResult:
    """Per-image class probabilities under a build's tokens."""

    names: list[str]  # image ids (file names, or dataset sample ids)
    labels: list[str]  # class names, the columns of `probs`
    probs: torch.Tensor  # [N, K]
    targets: list[int] | None  # ground truth when the images came from a dataset

    @property
    def predictions(self) -> list[int]:
        return self.probs.argmax(-1).tolist()

    @property
    def accuracy(self) -> float | None:
        if self.targets is None:
            return None
        return sum(int(p == t) for p, t in zip(self.predictions, self.targets)) / max(1, len(self.targets))

    def summary(self) -> str:
        lines = [f"{n}\t{self.labels[p]}\t{float(self.probs[i, p]):.3f}"
                 for i, (n, p) in enumerate(zip(self.names[:20], self.predictions[:20]))]
        if len(self.names) > 20:
            lines.append(f"... {len(self.names) - 20} more")
        if self.accuracy is not None:
            lines.append(f"accuracy {self.accuracy:.3%} on {len(self.names)} images ({len(self.labels)} classes)")
        return "\n".join(lines)


def classify_images(build: str | os.PathLike, *, images: str | None = None, root: str | None = None,
                    split: str = "test", device: str = "auto", batch_size: int = 64) -> ClassifyResult:
    """Classify images with a TI/MC-TI build's tokens (Eq. 6) — what `synthaug classify` runs.

    Args:
        build: a build directory (``config.yaml`` + ``tokens/``) made with ``--method ti|mcti`` (DCT tokens work too).
        images: an image folder, or a dataset name (default: the build's dataset, `split`, with accuracy).
        root: the dataset root when `images` is a dataset name.
        split: the dataset split.

    >>> classify_images("out/digits-mcti").accuracy  # doctest: +SKIP
    """
    from PIL import Image

    out = Path(build)
    cfg = from_dict(read_config(out, what="build"))
    classes = json.loads((out / CLASSES_FILE).read_text()) if (out / CLASSES_FILE).is_file() else []
    files = class_token_files(out)
    if not files:
        raise UserError(f"`build` {str(build)!r} has no learned tokens under tokens/: run `synthaug build` first.")
    tokens: dict[str, torch.Tensor] = {}
    for f in files:
        tokens.update(load_tokens(f))
    by_token = {c.get("token"): c.get("name") for c in classes}
    labels = [by_token.get(t, t) for t in tokens]
    targets = None
    if images is not None and Path(images).is_dir():
        paths = sorted(p for p in Path(images).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if not paths:
            raise UserError(f"`--images` {images!r} holds no .png/.jpg/.webp files: pass an image folder.")
        names, pil = [str(p.relative_to(images)) for p in paths], [Image.open(p).convert("RGB") for p in paths]
    else:
        ds = get_dataset(images or cfg.dataset, root or cfg.root, split)
        pil, ys = zip(*(ds[i] for i in range(len(ds))))
        pil, names = list(pil), [str(s[0]) for s in ds.samples]
        # Columns are the build's tokens; map dataset targets onto them (a build may cover a subset of classes).
        col = {int(token_name_index): j for j, token_name_index in enumerate(
            int(t.strip("<>").rsplit("-", 1)[-1]) for t in tokens)}
        keep = [i for i, y in enumerate(ys) if int(y) in col]
        pil, names, targets = [pil[i] for i in keep], [names[i] for i in keep], [col[int(ys[i])] for i in keep]
    pipe = load_diffusion(cfg.model, device=device, dtype="float32")
    clip = load_clip(cfg.mcti.clip_model, pipe)
    probs = classify(clip, tokens, pil, scale=cfg.mcti.scale, text_encoder=pipe.text_encoder,
                     tokenizer=pipe.tokenizer, batch_size=batch_size)
    return ClassifyResult(names=names, labels=labels, probs=probs.cpu(), targets=targets)


def generate_to_folder(config, *, tokens: str | None, dest: str, progress: bool = True) -> int:
    """Generate ``config.per_class`` PNGs for the selected classes into `dest` — what `synthaug generate` runs.

    With `tokens` (a token file or the folder `synthaug learn` wrote) the images use each class's token; with
    ``config.baseline`` (or without tokens) the plain prompt on the same seeds is generated too. Files are
    ``{dest}/{key}.png`` with keys as in the build format, plus ``metadata.jsonl`` (one row per image).

    An attribute token file (``attribute-NAME-V.safetensors`` from ``synthaug learn --guide-target``) makes
    ``config.per_class`` images of that token (keys ``dct-NAME-V-s00000``...) and, with ``config.baseline``, the
    plain prompt on the same seeds (``sd-NAME-V-s00000``...); ``generate.prompt`` must have no ``{label}``. The
    dataset and class selection are not used. (`synthaug generate --tokens FILE` sets ``config.guide_target`` from
    the file, which lets ``baseline`` pass with a prompt that names no class.)

    >>> generate_to_folder(load_config(overrides={"classes": "seven", "per_class": 8}), tokens="tokens/", dest="imgs")
    """
    if (Path(dest) / "metadata.jsonl").exists():  # an earlier run's images: never overwritten
        raise UserError(f"`--dest` {str(dest)!r} already holds metadata.jsonl (images of an earlier `synthaug "
                        f"generate`), which this run would overwrite: pass a new or empty folder, or move it away.")
    if tokens is not None and Path(tokens).is_file():
        target = token_metadata(Path(tokens)).get("target")
        if target and target != "class":
            return _generate_attribute(config, Path(tokens), parse_guide_target(target, "--tokens"), Path(dest),
                                       progress)
    dataset = get_dataset(config.dataset, config.root, config.split)
    names = [str(c) for c in dataset.classes]
    selected = select_classes(dataset, config.classes)
    loaded: dict = {}
    if tokens is not None:
        p = Path(tokens)
        loaded = load_tokens(p / ALL_TOKENS_FILE if p.is_dir() else p)
        missing = [c for c in selected if token_name(c) not in loaded]
        if missing:
            raise UserError(f"`--tokens` {tokens!r} has no token for class {missing[0]} ({names[missing[0]]!r}): "
                            f"learn it with `synthaug learn --classes {missing[0]}` or select other --classes.")
    pipe = load_diffusion(config.model, device=config.device, dtype=config.dtype, scheduler=config.scheduler,
                          timestep_spacing=config.timestep_spacing, channels_last=config.channels_last)
    guide = load_classifier(_own_guide(config), device=pipe.device, trained_on=config.guide_trained_on)
    add_tokens(pipe, loaded)
    starts = real_start_images(dataset, config.shots, config.shots_seed, selected) if config.generate.init == "real" else {}
    dest = Path(dest)
    rows = []
    for c in selected:
        variants = ([token_name(c)] if loaded else []) + ([None] if config.baseline or not loaded else [])
        for token in variants:
            method = "sd" if token is None else config.method
            for im in generate(pipe, class_index=c, label=names[c], token=token, indices=range(config.per_class),
                               config=config.generate, method=method, classifier=guide, init_images=starts.get(c),
                               progress=progress):
                rows.append(_save_png(dest, sample_key(im.method, c, im.index), im))
    write_text(dest / "metadata.jsonl", "\n".join(rows) + "\n")
    return len(rows)


def _save_png(dest: Path, key: str, im, **extra: str) -> str:
    """Write one generated image as ``dest/{key}.png`` (atomically); its ``metadata.jsonl`` row."""
    with atomic_write(dest / f"{key}.png") as f:
        f.write(encode_image(im.image, "png", 95))
    row = {k: v for k, v in asdict(im).items() if k != "image" and not (k in OPTIONAL_COLUMNS and v is None)}
    return json.dumps({"key": key, **extra, **row}, sort_keys=True)


def _generate_attribute(config, path: Path, target: GuideTarget, dest: Path, progress: bool) -> int:
    """`generate_to_folder` for an attribute token: image i of every variant on seed
    ``image_seed(generate.seed, 0, i)``, as `pipelines/reproduce_attributes.py` judges them."""
    check_label_free((config.generate.prompt, *config.generate.prompts), target)
    if config.generate.init == "real":
        raise UserError(f"`generate.init` 'real' starts each image from its class's real images, and the attribute "
                        f"token {target} has no class: set generate.init=noise.")
    loaded = load_tokens(path)
    if len(loaded) != 1:
        raise UserError(f"`--tokens` {str(path)!r} holds {len(loaded)} tokens; an attribute token file holds one: "
                        "pass the file `synthaug learn --guide-target` wrote.")
    (token, _), = loaded.items()
    pipe = load_diffusion(config.model, device=config.device, dtype=config.dtype, scheduler=config.scheduler,
                          timestep_spacing=config.timestep_spacing, channels_last=config.channels_last)
    add_tokens(pipe, loaded)
    rows = []
    for tok in [token] + ([None] if config.baseline else []):
        method = "sd" if tok is None else "dct"
        for im in generate(pipe, class_index=0, label="", token=tok, indices=range(config.per_class),
                           config=config.generate, method=method, progress=progress):
            rows.append(_save_png(dest, f"{method}-{target.stem}-s{im.index:05d}", im, target=str(target)))
    write_text(dest / "metadata.jsonl", "\n".join(rows) + "\n")
    return len(rows)


EXPORT_FORMATS = ("a1111", "diffusers")


def _class_token(path: Path, job: ClassJob) -> torch.Tensor:
    """The embedding of a class's token file, checked to hold one token: the one the build gave that class."""
    tokens = load_tokens(path)
    if len(tokens) != 1:
        shown = ", ".join(repr(t) for t in list(tokens)[:3]) + (", ..." if len(tokens) > 3 else "")
        raise UserError(f"Token file {str(path)!r} holds {len(tokens)} tokens ({shown}); a class token file holds one: "
                        f"delete it and resume the build to learn it again.")
    (token, embedding), = tokens.items()
    expected = token_string(job.class_index)
    if token != expected:
        raise UserError(f"Token file {str(path)!r} holds token {token[:60]!r} but class {job.class_index}'s token is "
                        f"{expected!r}: the file was not written by this build; delete it and resume the build.")
    return embedding


def export_tokens(out: str | os.PathLike, format: str = "a1111", dest: str | os.PathLike | None = None) -> list[Path]:
    """Write a build's class tokens in another tool's format, one file per class.

    Formats:
        ``"a1111"``: Stable Diffusion web UI embeddings, ``{dest}/synthaug-000.pt`` holding
        ``{"string_to_token": {"*": 265}, "string_to_param": {"*": tensor[n, dim]}, "name", "step",
        "sd_checkpoint", "sd_checkpoint_name"}`` (the web UI's own save format; diffusers'
        ``load_textual_inversion`` reads it too). The file name is the prompt word in the web UI.
        ``"diffusers"``: ``{dest}/synthaug-000.safetensors`` (``{token: tensor[n, dim]}`` plus metadata), for
        ``pipe.load_textual_inversion(path)``.

    Args:
        out: the build directory.
        format: ``"a1111"`` or ``"diffusers"``.
        dest: destination folder; default ``out/export/{format}``.

    Returns:
        The files written, by class index.

    >>> paths = export_tokens("out/digits", format="a1111")  # doctest: +SKIP
    """
    if format not in EXPORT_FORMATS:
        raise UserError(f"`format` must be one of {', '.join(EXPORT_FORMATS)} but is {format!r}.")
    out, _, jobs = _open_build(out)
    present = [j for j in jobs if token_done(out, j.class_index)]
    if not present:
        raise UserError(f"`out` {str(out)!r} has no learned tokens yet under {out / TOKENS_DIR}: run or resume the "
                        f"build first (`{resume_command(out)}`).")
    default = out / EXPORT_DIR / format
    dest = check_export_dest(out, dest if dest is not None else default, str(default))
    # Every token is read and checked before anything is written: a damaged later class leaves no partial export.
    embeddings = {j.class_index: _class_token(token_path(out, j.class_index), j) for j in present}
    with write_errors(f"`dest` {str(dest)!r}", "pass --dest a folder you can write to (and with free space)"):
        return _write_export(out, format, dest, present, embeddings)


def _write_export(out: Path, format: str, dest: Path, present: list[ClassJob], embeddings: dict) -> list[Path]:
    import io

    import torch

    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for j in present:
        src = token_path(out, j.class_index)
        embedding = embeddings[j.class_index]
        stem = token_string(j.class_index).strip("<>")  # from the class index: no file's content names a path
        if format == "diffusers":
            path = dest / f"{stem}.safetensors"
            write_bytes(path, src.read_bytes())
        else:
            meta = token_metadata_or_empty(src)
            data = {"string_to_token": {"*": 265}, "string_to_param": {"*": embedding.contiguous()},  # [n, dim]
                    "name": stem, "step": int_or_none(meta.get("steps")) or 0, "sd_checkpoint": None,
                    "sd_checkpoint_name": meta.get("model_id")}
            buf = io.BytesIO()
            torch.save(data, buf)
            path = dest / f"{stem}.pt"
            write_bytes(path, buf.getvalue())
        written.append(path)
    return written
