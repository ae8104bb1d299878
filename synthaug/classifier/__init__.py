"""Classifiers: a timm / transformers / torchvision model or a local checkpoint -> a frozen, differentiable `Classifier`.

`load_classifier` takes a classifier *source* string (timm name, ``hf-hub:`` id, transformers id, torchvision name,
local directory, ``ARCH@checkpoint`` file, or the embedded ``digits-guide`` / ``digits-judge`` / ``digits-attr-guide``)
and returns a `Classifier`: an `nn.Module` that maps images in [0, 1] to logits, with its `labels`, `multi_label`
(sigmoid attribute outputs rather than softmax classes), its `data_config` (the model's
own eval preprocessing), a differentiable `preprocess` built from torch ops, penultimate `features`, and a
`trained_on` note. `source` reads a source string without loading it (`parse_source`, `declared_labels`,
`check_label_agreement`). One module per source: `from_timm`, `from_transformers`, `from_torchvision`, `from_checkpoint`.

The wrapped model is frozen (``eval()``, ``requires_grad_(False)``, and it stays in eval mode even if a parent calls
``.train()``), yet gradients flow to the *input images*: DCT backpropagates the guide's cross-entropy through the
decoded image into a token.

Nothing here downloads when offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``): weights that are not on disk
give a one-line `UserError` naming `classifier`, the value and the fix, never a hub stack trace.

The modules: `base` (the wrapper, eval preprocessing; `multi_label` when a config declares ``problem_type:
multi_label_classification``); `load` (source strings: `LOADERS`, a source kind -> its loader; the source named in
an error once, there); `source` (a source string read without loading: kind, declared labels, label agreement with a
dataset); one file per source: `from_timm`, `from_transformers`, `from_torchvision`, `from_checkpoint`; `hub`
(cached hub files, offline errors); `probe` (a few-shot guide: a linear head on a frozen CLIP / transformers / timm
backbone's features, `ProbeModel`, its folder format and loader, `load_backbone`); `fit` (k real images per class
-> a fitted probe folder: `fit_guide`, `fit_dataset_guide`, features and strength by leave-one-out on the shots,
`FitRecord` = ``guide.json``); `ensemble` (``"A,B"`` -> `GuideEnsemble`, the mean of the members' log-probabilities).
"""

from .base import Classifier, MeanPoolViT, eval_transform
from .hub import KNOWN_MODELS
from .load import load_classifier
from .source import (
    EMBEDDED_CLASSIFIERS,
    PREFIXES,
    ClassifierSource,
    check_label_agreement,
    declared_labels,
    declared_multi_label,
    parse_source,
    same_source,
)

__all__ = [
    "EMBEDDED_CLASSIFIERS",
    "KNOWN_MODELS",
    "PREFIXES",
    "Classifier",
    "ClassifierSource",
    "MeanPoolViT",
    "check_label_agreement",
    "declared_labels",
    "declared_multi_label",
    "eval_transform",
    "load_classifier",
    "parse_source",
    "same_source",
]
