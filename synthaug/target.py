"""Guide targets: what a DCT token steers the guide classifier towards, read from a string without loading anything.

Two kinds, one string each (the ``guide_target`` config key, ``--guide-target`` on the command line, the ``target``
argument of `synthaug.tokens.learn_dct_token`):

- ``"class"`` (the default, also ``None``): the class token of the paper's main method. The guide is single-label
  (softmax); the loss is the cross-entropy to class c; an image counts as correct when its argmax is c.
- ``"attribute:NAME[=0|1]"``: an attribute token (the paper's "Face attributes"). The guide is multi-label (one
  independent sigmoid output per attribute, as a transformers model with ``problem_type="multi_label_classification"``);
  the loss is the binary cross-entropy of output NAME (looked up in the guide's labels) towards 1 (``=1``, the
  default: has the attribute) or 0 (``=0``: lacks it); an image counts as correct when the sigmoid probability of the
  wanted value is above 0.5. An attribute token has no class label: its prompts are templates such as
  ``"A photo of {token}"``.

>>> parse_guide_target("attribute:closed_loop")
GuideTarget(attribute='closed_loop', value=1)
>>> str(parse_guide_target("attribute:closed_loop=0")), parse_guide_target(None).is_class
('attribute:closed_loop=0', True)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import UserError
from .names import normalize_name

MULTI_LABEL = "multi_label_classification"  # transformers' `problem_type` of a sigmoid-per-output head

SYNTAX = "'class' (the default) or 'attribute:NAME[=0|1]', e.g. 'attribute:closed_loop=1'"


@dataclass(frozen=True)
class GuideTarget:
    """What the guide is steered towards: its class (``attribute`` None) or one attribute output towards `value`.

    Build one with `parse_guide_target`; ``str(target)`` gives the string back (what token files record).
    """

    attribute: str | None = None  # the guide output's name (one of its labels); None: the class target
    value: int = 1  # attribute targets: 1 = has the attribute, 0 = lacks it

    @property
    def is_class(self) -> bool:
        return self.attribute is None

    def __str__(self) -> str:
        return "class" if self.attribute is None else f"attribute:{self.attribute}={self.value}"

    @property
    def stem(self) -> str:
        """A file-name and token-safe form of an attribute target: ``"closed_loop-1"``."""
        if self.attribute is None:
            raise ValueError("a class target has no attribute stem: its files are named by the class index")
        return f"{re.sub(r'[^0-9A-Za-z_.]+', '_', self.attribute).strip('_') or 'attribute'}-{self.value}"

    @property
    def token(self) -> str:
        """The default token string of an attribute target: ``"<synthaug-closed_loop-1>"``."""
        return f"<synthaug-{self.stem}>"

    def output_index(self, labels: Sequence[str], *, multi_label: bool, source: str, what: str = "guide",
                     arg: str = "guide_target") -> int:
        """The index of the attribute's output among the guide's `labels` (exact name first, then the cleaned name,
        `normalize_name`). Raises `UserError` for a single-label guide or a name the guide does not have."""
        if self.attribute is None:
            raise ValueError("a class target has no attribute output: pass the class index")
        if not multi_label:
            raise UserError(
                f"`{arg}` {str(self)!r} needs a multi-label guide (one sigmoid output per attribute, config "
                f"problem_type {MULTI_LABEL!r}) but `{what}` {source!r} is single-label (softmax over "
                f"{len(labels)} classes): pass a multi-label guide such as 'digits-attr-guide', or drop guide_target "
                f"to learn class tokens.")
        names = [str(n) for n in labels]
        if self.attribute in names:
            return names.index(self.attribute)
        keys = [normalize_name(n) for n in names]
        key = normalize_name(self.attribute)
        if key in keys:
            return keys.index(key)
        shown = ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")
        raise UserError(f"`{arg}` names attribute {self.attribute!r}, which `{what}` {source!r} does not have: "
                        f"pass one of its outputs: {shown}.")


CLASS = GuideTarget()


def check_label_free(templates: Sequence[str], target: GuideTarget) -> None:
    """Refuse a prompt template with a ``{label}`` placeholder for an attribute token, which has no class label."""
    for p in templates:
        if "{label}" in p:
            raise UserError(f"Prompt template {p!r} has a {{label}} placeholder, but attribute token {str(target)!r} "
                            f"has no class label: use a template without it, e.g. 'A photo of {{token}}' (in "
                            f"dct.prompts and generate.prompt), or pass a label.")


def parse_guide_target(target: str | GuideTarget | None, what: str = "guide_target") -> GuideTarget:
    """Read a guide target string (None or ``"class"``: the class target). Raises `UserError` in one line.

    >>> parse_guide_target("attribute:straight_stroke=0").value
    0
    """
    if target is None or isinstance(target, GuideTarget):
        return target or CLASS
    if not isinstance(target, str):
        raise UserError(f"`{what}` must be {SYNTAX} but is {target!r}.")
    text = target.strip()
    if text == "class":
        return CLASS
    kind, colon, rest = text.partition(":")
    if kind.strip() != "attribute" or not colon:
        raise UserError(f"`{what}` must be {SYNTAX} but is {target!r}.")
    name, eq, value = rest.partition("=")
    name = name.strip()
    if not name:
        raise UserError(f"`{what}` {target!r} names no attribute: pass 'attribute:NAME[=0|1]', e.g. "
                        f"'attribute:closed_loop=1'.")
    if eq and value.strip() not in ("0", "1"):
        raise UserError(f"`{what}` {target!r} asks attribute {name!r} for {value.strip()!r}, but an attribute is 0 or "
                        f"1: pass 'attribute:{name}=1' (has it) or 'attribute:{name}=0' (lacks it).")
    return GuideTarget(name, int(value) if eq else 1)


__all__ = ["CLASS", "MULTI_LABEL", "GuideTarget", "check_label_free", "parse_guide_target"]
