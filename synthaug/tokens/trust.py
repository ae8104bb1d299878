"""A per-class trust check of a learned class token, from the user's own k real images of the class.

A guide can be confidently wrong about a class (a few-shot guide, or one trained on other data); then its token pulls
the class's images towards the guide's mistake, and nothing in the token's own training tells. With only the k real
images of every class, two questions can be asked:

1. Does the guide recognise the class's real images? (its top-1 on them)
2. Do the token's images land nearer the class's real images than the plain prompt's images on the same seeds do?
   In a feature space — the guide's (the head's input) or CLIP's image tower (`dct.trust_features`) — each image goes
   to the class whose real images' mean feature is nearest (cosine); the check counts how many of the token's images
   go to their own class, and the same for the plain prompt's. The guide's space can be fooled as the guide is: a
   token that satisfies a weak guide lands "on the class" there while an independent judge disagrees; CLIP's image
   tower did not steer the token.

The token is trusted when the guide gets at least half of the class's real images right and the token's images land
on the class at least as often as the plain prompt's. `dct.trust` decides what a build does with a distrusted token:
``warn`` (log it) or ``fallback`` (generate that class with the plain prompt instead, and record that).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import write_text
from ..layout import kept_verdict, trust_path
from .clip import default_clip_model, image_features, load_clip

logger = logging.getLogger(__name__)

TRUST_MODES = ("off", "warn", "fallback")

MIN_GUIDE_ACCURACY = 0.5  # the guide must recognise at least half of the class's real images


@dataclass(frozen=True)
class TrustVerdict:
    """The trust check of one class token (`check_token_trust`)."""

    trusted: bool
    guide_real_accuracy: float  # the guide's top-1 on the class's k real images
    token_on_class: float  # share of the token's check images nearest (guide features) to the class's real images
    plain_on_class: float  # the same for the plain prompt's images on the same seeds
    real_images: int  # k: the class's real images the check used
    images: int  # check images per prompt
    reason: str  # why not trusted ("" when trusted)
    features: str = "guide"  # the feature space of question 2: "guide" or "clip"
    settings_sha256: str = ""  # what the check ran with (a build's `trust_settings_sha256`); "" when not recorded

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrustVerdict:
        """The verdict a `to_json` wrote, checked field by field.

        Raises:
            ValueError: the text is not such a verdict (not JSON, a field missing, or of the wrong type: the string
                ``"false"`` where ``trusted`` must be a bool is damage, not a verdict), naming the field.
        """
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"not JSON ({e})") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> TrustVerdict:
        """`from_json` of parsed JSON (extra keys, such as ``classes.json``'s ``fallback``, are ignored)."""
        if not isinstance(data, dict):
            raise ValueError(f"not a JSON object but {type(data).__name__}")  # noqa: TRY004 (damage, one kind)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                if f.default is dataclasses.MISSING:
                    raise ValueError(f"field {f.name!r} is missing")
                continue
            values[f.name] = _checked_field(f.name, data[f.name])
        return cls(**values)

    def describe(self) -> str:
        """One line: the verdict and its numbers."""
        verdict = "trusted" if self.trusted else f"NOT trusted ({self.reason})"
        return (f"{verdict}: guide {100 * self.guide_real_accuracy:.0f}% on {self.real_images} real images; "
                f"token images on the class {100 * self.token_on_class:.0f}% vs plain "
                f"{100 * self.plain_on_class:.0f}% of {self.images} ({self.features} features)")


_BOOL_FIELDS = frozenset({"trusted"})
_SHARE_FIELDS = frozenset({"guide_real_accuracy", "token_on_class", "plain_on_class"})  # floats in [0, 1]
_COUNT_FIELDS = frozenset({"real_images", "images"})


def _checked_field(name: str, value: Any) -> Any:
    """One field of a verdict file, its type checked (bool is an int in Python: it is refused as a number)."""
    if name in _BOOL_FIELDS:
        ok = isinstance(value, bool)
    elif name in _SHARE_FIELDS:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
        value = float(value) if ok else value
    elif name in _COUNT_FIELDS:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    else:
        ok = isinstance(value, str)
    if not ok:
        kind = ("a bool" if name in _BOOL_FIELDS else "a number in [0, 1]" if name in _SHARE_FIELDS
                else "a count >= 0" if name in _COUNT_FIELDS else "a string")
        raise ValueError(f"field {name!r} must be {kind} but is {value!r}")
    return value


def read_verdict(path: str | os.PathLike) -> TrustVerdict:
    """A ``tokens/NNN_trust.json`` file's verdict.

    Raises:
        ValueError: the file cannot be read or is not a verdict (`TrustVerdict.from_json`), naming what is wrong.
    """
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"unreadable: {e}") from None
    return TrustVerdict.from_json(text)


def trust_settings_sha256(*, generate: Any, shots: int, shots_seed: int, images: int, seed: int,
                          features: str = "guide") -> str:
    """A fingerprint of everything a build's trust check depends on besides the token and the guide: the
    `GenerateConfig` it generates with, which real images it reads (`shots` per class drawn with `shots_seed`), how
    many check images and their base seed, and the feature space (``"guide"``, or ``"clip:<model>"``). A kept verdict
    is reused only while this is unchanged."""
    settings = {"generate": dataclasses.asdict(generate), "shots": int(shots), "shots_seed": int(shots_seed),
                "images": int(images), "seed": int(seed), "features": str(features)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def trust_seed(seed: int, class_index: int) -> int:
    """The check images' base seed: its own namespace, so they are none of the build's images."""
    digest = hashlib.sha256(f"synthaug-trust:{int(seed)}:{int(class_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _pixels(images: Sequence[Any]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
                            ).permute(0, 3, 1, 2)


@torch.no_grad()
def check_token_trust(
    pipe: Any,
    guide: Any,
    *,
    generate: Callable[..., Sequence[Any]],
    class_index: int,
    label: str,
    token: str,
    real_images: Mapping[int, Sequence[Any]],
    config: Any,
    images: int = 8,
    seed: int = 0,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    features_name: str = "guide",
) -> TrustVerdict:
    """Check one class token against the k real images of every class (see the module docstring).

    Args:
        pipe: the pipeline, with `token` already added.
        guide: the `Classifier` that steered the token (its `features` are the feature space).
        generate: makes the check images as the build does, ``generate(pipe, class_index=, label=, token=, indices=,
            config=)`` -> items with an ``.image`` (`synthaug.generation.generate`, which sits above this package).
        class_index, label: the class.
        token: the class token.
        real_images: class index -> its k real PIL images (every class: the neighbours are needed too).
        config: the `GenerateConfig` the build generates with (prompt, steps, guidance, size).
        images: check images per prompt (token and plain, on the same seeds).
        seed: base seed (the build's `dct.seed`); the check images' seeds are hashed from it and the class.
        features: the feature space of question 2, images ``[N, 3, H, W]`` in [0, 1] -> ``[N, D]``; None: the
            guide's (``guide.features``). E.g. CLIP's image tower: ``lambda x: image_features(clip, x)``.
        features_name: what the verdict records as its feature space.

    >>> from synthaug.generation import generate
    >>> verdict = check_token_trust(pipe, guide, generate=generate, class_index=3, label="three",
    ...                             token="<synthaug-003>", real_images=by_class, config=GenerateConfig())  # doctest: +SKIP
    """
    if class_index not in real_images or not real_images[class_index]:
        raise ValueError(f"no real images of class {class_index} for the trust check")
    param = next(iter(guide.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    classes = sorted(real_images)
    own = _pixels(real_images[class_index]).to(device, dtype)
    accuracy = float((guide(own).argmax(-1) == class_index).float().mean())
    embed = guide.features if features is None else features

    def feats_of(pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(embed(pixels.to(device, dtype)).float(), dim=-1)

    centroids = torch.stack([feats_of(_pixels(real_images[c])).mean(0) for c in classes])
    centroids = torch.nn.functional.normalize(centroids, dim=-1)
    gen = dataclasses.replace(config, seed=trust_seed(seed, class_index))

    def on_class(tok: str | None) -> float:
        made = generate(pipe, class_index=class_index, label=label, token=tok, indices=range(images), config=gen)
        nearest = (feats_of(_pixels([m.image for m in made])) @ centroids.T).argmax(-1)
        return float((nearest == classes.index(class_index)).float().mean())

    token_share, plain_share = on_class(token), on_class(None)
    reasons = []
    if accuracy < MIN_GUIDE_ACCURACY:
        reasons.append(f"the guide recognises {100 * accuracy:.0f}% of the class's real images")
    if token_share < plain_share:
        reasons.append(f"the token's images land on the class less often than the plain prompt's "
                       f"({100 * token_share:.0f}% vs {100 * plain_share:.0f}%)")
    return TrustVerdict(trusted=not reasons, guide_real_accuracy=accuracy, token_on_class=token_share,
                        plain_on_class=plain_share, real_images=len(real_images[class_index]), images=images,
                        reason="; ".join(reasons), features=features_name)


def kept_or_checked(out: str | os.PathLike, job: Any, models: dict[str, Any], config: Any, *,
                    real_images: Callable[[], dict[int, list[Any]]], generate: Callable) -> TrustVerdict:
    """``dct.trust`` in a build: the class token's verdict, checked once and kept in ``tokens/NNN_trust.json``. A kept
    verdict checked with other settings (``generate.*``, the real images it read) is checked again: a build whose
    config changed before any image was made keeps its tokens, not its verdicts.

    `job`: the class job (``class_index``, ``name``, ``token``); `models`: the worker's (``pipe``, ``guide``), where
    the real images (`real_images`, called once: every class's k) and a CLIP are kept for the next class; `config`:
    the `BuildConfig`; `generate`: `synthaug.generation.generate`.
    """
    cfg = config
    space, clip_source = "guide", None
    if cfg.dct.trust_features == "clip":  # default_clip_model may read the model's config: only when asked
        clip_source = cfg.mcti.clip_model if cfg.mcti.clip_model is not None else default_clip_model(cfg.model)
        space = f"clip:{clip_source or 'digits'}"
    settings = trust_settings_sha256(generate=cfg.generate, shots=cfg.shots, shots_seed=cfg.shots_seed,
                                     images=cfg.dct.trust_images, seed=cfg.dct.seed, features=space)
    kept, problem = kept_verdict(out, job.class_index, read_verdict)
    if kept is not None and kept.settings_sha256 == settings:
        return kept
    if kept is not None:
        logger.info("class %d (%s): its trust verdict was checked with other settings; checking again",
                    job.class_index, job.name)
    elif problem != "missing":  # damage is redone, never retried as it is
        logger.warning("class %d (%s): its trust verdict %s is %s; checking again", job.class_index, job.name,
                       trust_path(out, job.class_index), problem)
    if "real_by_class" not in models:
        models["real_by_class"] = real_images()
    features = None
    if cfg.dct.trust_features == "clip":  # only its image tower is read: no pairing with the text encoder needed
        if "trust_clip" not in models:
            models["trust_clip"] = load_clip(clip_source, device=models["pipe"].device)
        clip = models["trust_clip"]

        def features(pixels):
            return image_features(clip, pixels)

    verdict = check_token_trust(models["pipe"], models["guide"], class_index=job.class_index, label=job.name,
                                token=job.token, real_images=models["real_by_class"], config=cfg.generate,
                                images=cfg.dct.trust_images, seed=cfg.dct.seed, features=features,
                                features_name=cfg.dct.trust_features, generate=generate)
    verdict = dataclasses.replace(verdict, settings_sha256=settings)
    write_text(trust_path(out, job.class_index), verdict.to_json() + "\n")
    (logger.info if verdict.trusted else logger.warning)("class %d (%s) trust check: %s", job.class_index,
                                                          job.name, verdict.describe())
    return verdict


__all__ = ["MIN_GUIDE_ACCURACY", "TRUST_MODES", "TrustVerdict", "check_token_trust", "kept_or_checked", "read_verdict",
           "trust_seed", "trust_settings_sha256"]
