"""Per-step progress of token learning: a tqdm bar, or a callable fed one dict per iteration.

`learn_dct_token` and `learn_dct_tokens` take ``progress=True`` (a bar per class, its postfix the loss, the batch
accuracy and the stop rules' state) or a callable; a build's worker passes a callable that turns each iteration into a
``"step"`` progress event, which the driver's `Tracker` shows on its class bar (`step_postfix`). No torch here: the
driver formats events without importing the learners.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def progress_bar(progress: bool | Callable[[dict], None], total: int, label: str,
                 class_index: int | None = None) -> StepProgress | None:
    """A token's per-step progress (`StepProgress`), or None where `progress` is off."""
    return StepProgress(progress, total, label, class_index) if progress else None


class StepProgress:
    """Where one token's per-step progress goes: a tqdm bar (``progress=True``), or a callable that takes every
    iteration's dict (a build's worker turns it into a progress event for the driver's bars)."""

    def __init__(self, progress: bool | Callable[[dict], None], total: int, label: str, class_index: int | None):
        self.sink = progress if callable(progress) else None
        self.total, self.label, self.class_index, self.bar = total, label, class_index, None
        if self.sink is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"DCT {label}", unit="step")

    def update(self, entry: dict, keeper: Any) -> None:
        """Report iteration ``entry["step"]`` (its history entry) and `keeper`'s ``state()`` after it."""
        self.total = max(self.total, entry["step"] + 1)  # past max_steps: `extend_steps` is extending the run
        info = {"class_index": self.class_index, "label": self.label, "step": entry["step"], "total": self.total,
                "loss": entry["loss"], "accuracy": entry["accuracy"], "val_accuracy": entry.get("val_accuracy"),
                "state": keeper.state()}
        if self.sink is not None:
            self.sink(info)
            return
        self.bar.set_postfix_str(step_postfix(info), refresh=False)
        if self.bar.total is not None and self.bar.n >= self.bar.total:
            self.bar.total = self.bar.n + 1
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def step_postfix(info: dict) -> str:
    """One iteration's `StepProgress` dict as a progress bar's postfix: loss, batch accuracy, the stop rules' state."""
    text = f"loss {info['loss']:.3f}, acc {info['accuracy']:.2f}"
    return f"{text}, {info['state']}" if info.get("state") else text


def bar_update(bar: StepProgress | None, entry: dict, keeper: Any) -> None:
    """`StepProgress.update` where progress is on."""
    if bar is not None:
        bar.update(entry, keeper)
