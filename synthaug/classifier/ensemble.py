"""Guide ensembles: several guides that steer a DCT token together (``guide: "A,B"``), so a token must convince all
of them — one weak guide's blind spot is no longer enough to fool the loss.

`GuideEnsemble` is a `Classifier` whose logits are the mean of its members' log-probabilities: its softmax is the
normalised geometric mean of the members' probabilities (a product of experts), and its cross-entropy to class c,
DCT's loss, is the mean of the members' cross-entropies plus ``log Z`` (``Z = sum_k prod_g p_g(k)^(1/G) <= 1``), which is
small when they agree. Everything that reads a guide's probabilities — the index's ``guide_prob`` / soft labels,
``min_confidence``, the stopping rules, the trust check — reads that one ensemble probability: a class is likely only
where every member finds it likely. Each member keeps its own preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import UserError
from .base import Classifier


class _Members(nn.Module):
    """The members' forward, as the wrapped model of the ensemble (raw images in, mean log-probabilities out)."""

    def __init__(self, members: Sequence[Classifier]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.num_classes = members[0].num_classes

    def forward(self, images: Tensor) -> Tensor:
        return torch.stack([m(images).float().log_softmax(-1) for m in self.members]).mean(0)


class GuideEnsemble(Classifier):
    """Several frozen guides as one `Classifier` (see the module docstring).

    Args:
        members: guides with the same labels, in the same order; none multi-label.

    >>> ens = GuideEnsemble([load_classifier("digits-guide"), load_classifier("guides/k3")])  # doctest: +SKIP
    >>> ens.predict(images).sum(-1)  # doctest: +SKIP
    tensor([1.0000, 1.0000])
    """

    def __init__(self, members: Sequence[Classifier]):
        members = list(members)
        if len(members) < 2:
            raise UserError(f"a guide ensemble needs at least 2 guides but got {len(members)}: pass 'A,B'.")
        first = members[0]
        for m in members[1:]:
            if m.labels != first.labels:
                raise UserError(f"the guides of an ensemble must have the same labels in the same order, but "
                                f"{m.source!r} has {m.num_classes} ({m.labels[:3]}...) and {first.source!r} "
                                f"{first.num_classes} ({first.labels[:3]}...): pass guides of one label set.")
        if any(m.multi_label for m in members):
            raise UserError("a guide ensemble steers class tokens; a multi-label guide's outputs are attributes: "
                            "pass single-label guides.")
        super().__init__(_Members(members), first.labels, first.data_config,
                         source=",".join(m.source for m in members),
                         trained_on="; ".join(f"{m.source}: {m.trained_on}" for m in members), kind="ensemble")
        self.members = self.model.members

    def preprocess(self, images: Tensor) -> Tensor:
        """Each member preprocesses for itself: the ensemble hands it float images in [0, 1] on its device."""
        if images.ndim != 4:
            raise ValueError(f"`images` must be a batch [B, C, H, W] but has shape {tuple(images.shape)}.")
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        return images.to(device=self.device, dtype=torch.float32)

    def features(self, images: Tensor) -> Tensor:
        """Every member's penultimate features, each L2-normalised, side by side (the trust check's guide space)."""
        return torch.cat([nn.functional.normalize(m.features(images), dim=-1) for m in self.members], dim=-1)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # what `classify` casts images to: each member casts to its own
