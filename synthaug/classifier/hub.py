"""Hugging Face Hub lookups for classifiers: known model ids, cached files, offline errors.

Errors are `SourceError`s: the caller that knows which argument named the model adds it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import SourceError, first_line

# Hub models whose loading needs more than the stock class, and what each was trained on.
# "mean": an MAE ViT whose head sits on mean-pooled patch tokens, LayerNorm applied *after* pooling (the reference
# code's `vitmae.CustomViTForImageClassification`), not on the stock HF ViT's normed CLS token.
KNOWN_MODELS: dict[str, dict[str, str | None]] = {
    "vesteinn/vit-mae-cub": {
        "pooling": "mean",
        "trained_on": "the FULL CUB-200-2011 train split (MAE ViT fine-tuned on all 5,994 training images): "
        "few-shot results guided by it are not leak-free",
    },
    "vesteinn/vit-mae-inat21": {
        "pooling": "mean",
        "trained_on": "the FULL iNaturalist 2021 train split (MAE ViT fine-tuned on all ~2.7M training images): "
        "few-shot results on iNat guided by it are not leak-free",
    },
    "google/vit-large-patch16-224": {
        "pooling": None,
        "trained_on": "ImageNet-21k pre-training, then the full ImageNet-1k train split",
    },
}


def known_model(hub_id: str) -> dict[str, str | None]:
    """KNOWN_MODELS entry of a hub id (``@revision`` ignored), or of a path that ends in one; else {}."""
    hub_id = hub_id.split("@")[0].rstrip("/")
    return next((v for k, v in KNOWN_MODELS.items() if hub_id == k or hub_id.endswith("/" + k)), {})


def check_hub_id(hub_id: str) -> None:
    if hub_id.startswith((".", "/", "~")) or hub_id.split("@")[0].count("/") != 1:
        raise SourceError("neither an existing directory nor a hub id 'ORG/NAME': check the path.")


def not_cached(what: str) -> SourceError:
    return SourceError(
        f"{what} is not on this machine and the hub is offline (HF_HUB_OFFLINE=1 or "
        f"local_files_only): download it first on a machine with network, or pass a local directory."
    )


def hub_file(repo_id: str, filename: str, local_files_only: bool, required: bool = True) -> str | None:
    """A file of a hub repo (``repo@revision`` allowed), from the cache when offline; None if optional and absent."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo, _, revision = repo_id.partition("@")
    try:
        return hf_hub_download(repo, filename, revision=revision or None, local_files_only=local_files_only)
    except LocalEntryNotFoundError:  # offline and not cached (a subclass of EntryNotFoundError: caught first)
        if not required:
            return None
        raise not_cached(f"{repo}/{filename}") from None
    except EntryNotFoundError:
        if not required:
            return None
        raise SourceError(f"the hub repo {repo!r} has no {filename}.") from None
    except OSError as e:  # repository not found, gated, network down
        raise SourceError(f"could not be fetched ({first_line(e)}): check the id, log in for gated models, or pass a "
                          f"local directory.") from None


def hub_config(repo_id: str, local_files_only: bool) -> dict[str, Any]:
    return read_json(Path(hub_file(repo_id, "config.json", local_files_only)))  # type: ignore[arg-type]


def custom_code(config: Any) -> str | None:
    """What a model folder's ``config.json`` / ``tokenizer_config.json`` asks transformers to import from the folder
    itself (its ``auto_map``, e.g. ``"AutoModel: modeling_x.Net"``), or None. synthaug never runs such code: every
    transformers load passes ``trust_remote_code=False``, and a folder that needs it is refused before loading."""
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not auto_map:
        return None
    if isinstance(auto_map, dict):
        return ", ".join(f"{k}: {v}" for k, v in list(auto_map.items())[:2])
    return str(auto_map)[:80]


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SourceError(f"{path} is unreadable ({first_line(e)}): re-save the model.") from None
