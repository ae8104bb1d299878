"""Class names: the form a prompt shows (`clean_class_name`) and the key that compares names across sources
(`normalize_name`). Every stage that matches a build's classes to a dataset, a guide or a judge uses this key."""

from __future__ import annotations

import re

_NUMBER_PREFIX = re.compile(r"^\s*\d+\s*[.\-_:)]+\s*")  # "001.", "3 - ", "12_", "7)"


def clean_class_name(name: str) -> str:
    """A class name fit for a prompt: drop a numeric ``001.`` prefix, underscores to spaces, collapse whitespace.

    >>> clean_class_name("001.Black_footed_Albatross")
    'Black footed Albatross'
    """
    name = re.sub(r"^\d+[.]", "", str(name).strip())
    return " ".join(name.replace("_", " ").split())


def normalize_name(name: str) -> str:
    """The key two names must share to denote the same class.

    Ignores a numbered prefix (``001.``, ``3 - ``), case, a possessive ``'s``, punctuation (``_``, ``-``, ``'``) and
    grey/gray.

    >>> normalize_name("001.Black_footed_Albatross")
    'black footed albatross'
    >>> normalize_name("Brewer's Blackbird") == normalize_name("Brewer_Blackbird")
    True
    """
    s = _NUMBER_PREFIX.sub("", str(name)).lower()
    s = re.sub(r"['\u2019]s\b", "", s)
    s = re.sub(r"[\W_]+", " ", s)
    s = re.sub(r"\bgrey\b", "gray", s)
    return " ".join(s.split())


__all__ = ["clean_class_name", "normalize_name"]
