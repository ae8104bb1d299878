"""Saving, loading and exporting tokens in diffusers' textual-inversion safetensors format, and adding them to a pipeline."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..atomic import write_bytes
from ..errors import UserError
from ..jsonfmt import dumps
from .dct import TokenResult
from .text import token_name, vector_ids, vector_names

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline


# --------------------------------------------------------------------------------------------------------------------
# Adding tokens to a pipeline, and token files (diffusers textual-inversion format)
# --------------------------------------------------------------------------------------------------------------------
def add_tokens(pipe: StableDiffusionPipeline, tokens: dict[str, torch.Tensor]) -> None:
    """Add tokens to the pipeline's tokenizer and set their text-encoder rows; every other row stays bit-identical.

    A token of ``[n, dim]`` with n > 1 is added as diffusers' ``load_textual_inversion`` adds a multi-vector token:
    as ``token``, ``token_1``, ... ``token_{n-1}``, which the pipeline spells in place of ``token`` in a prompt.

    A token the tokenizer already holds as an added token gets its row overwritten (so re-adding is safe); a token
    that is an ordinary vocabulary word is refused. New rows are sized with ``mean_resizing=False`` and then set,
    and the global RNG is left untouched (resizing draws random initial rows).

    >>> add_tokens(pipe, load_tokens("out/digits/tokens/tokens.safetensors"))
    >>> pipe("A photo of <synthaug-003> three").images[0]
    """
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    weight = text_encoder.get_input_embeddings().weight
    dim = weight.shape[-1]
    rows = {}
    for token, emb in tokens.items():
        if not isinstance(token, str) or not token or token != token.strip():
            raise UserError(f"Token {token!r} must be a non-empty string without surrounding spaces.")
        if token in tokenizer.get_vocab() and token not in tokenizer.get_added_vocab():
            raise UserError(
                f"Token {token!r} is already a word of the tokenizer's vocabulary: adding it would overwrite that word. "
                f"Rename it, e.g. {token_name(0)!r}."
            )
        emb = torch.as_tensor(emb)
        if emb.dim() == 1:
            emb = emb[None]
        if emb.dim() != 2 or emb.shape[-1] != dim or emb.shape[0] < 1:
            raise UserError(
                f"Token {token!r} has an embedding of shape {tuple(emb.shape)} but this text encoder takes [n, {dim}]: "
                f"the token was learned for a different model; learn it again for this one."
            )
        names = vector_names(token, emb.shape[0])
        stale = len(vector_ids(tokenizer, token)) if token in tokenizer.get_added_vocab() else 0
        if stale > len(names):
            raise UserError(f"Token {token!r} is in the tokenizer with {stale} vectors, and the new one has "
                            f"{len(names)}: the pipeline would spell it with the old extra vectors. Load it into a "
                            f"freshly loaded pipeline.")
        rows.update(zip(names, emb))
    new = [t for t in rows if t not in tokenizer.get_added_vocab()]
    if new:
        tokenizer.add_tokens(new)
    if len(tokenizer) > weight.shape[0]:
        requires_grad = weight.requires_grad
        devices = [weight.device] if weight.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        weight = text_encoder.get_input_embeddings().weight
        weight.requires_grad_(requires_grad)
    with torch.no_grad():
        for token, emb in rows.items():
            weight[tokenizer.convert_tokens_to_ids(token)] = emb.to(device=weight.device, dtype=weight.dtype)


def token_updates(meta: dict) -> int | None:
    """Optimizer updates a token file's token took: its ``updates`` (DCT), or for TI/MC-TI, whose ``steps`` are
    updates, those; None when the file does not say (a DCT token file written before ``updates`` was recorded, whose
    ``steps`` count measurements: one more than its updates when the last measurement stopped training)."""
    if meta.get("updates") not in (None, ""):
        return int_or_none(meta.get("updates"))
    if meta.get("method") in ("ti", "mcti"):
        return int_or_none(meta.get("steps"))
    return None


def save_token(result: TokenResult, path: str | os.PathLike) -> None:
    """Write one token as diffusers' ``learned_embeds.safetensors`` (``{token: [n, dim]}``, n = 1 but for a
    multi-vector token) with string metadata.

    Atomic; the same result gives the same bytes. Loadable by stock diffusers: ``pipe.load_textual_inversion(path)``.

    >>> save_token(result, "out/digits/tokens/003.safetensors")
    """
    meta = {
        "format": "diffusers-textual-inversion", "token": result.token, "class_index": str(result.class_index),
        "label": result.label, "steps": str(result.steps), "updates": str(result.updates),
        "stop_reason": result.stop_reason,
        "best_step": str(result.best_step), "unet_evals": str(result.unet_evals),
        "model_id": str(result.metadata.get("model_id", "unknown")),
        "guide": str(result.metadata.get("guide", "unknown")),
        "guide_trained_on": str(result.metadata.get("guide_trained_on", "unknown")),
        "scheduler": str(result.metadata.get("scheduler", "")),
        "config": json.dumps(result.metadata.get("config", {}), sort_keys=True),
        "history": dumps(result.history),
        "tokens": json.dumps([result.token]),
    }
    if result.metadata.get("target"):  # attribute tokens: "attribute:NAME=V" (class tokens' files are as before)
        meta["target"] = str(result.metadata["target"])
    if result.metadata.get("batched_with"):  # dct.classes_per_batch: the classes it shared UNet calls with
        meta["batched_with"] = json.dumps(list(result.metadata["batched_with"]))
    _write({result.token: result.embedding}, path, meta)


def save_tokens(
    results: list[TokenResult] | list[Any] | dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict | None = None,
) -> None:
    """Write many tokens into one safetensors file ``{token: [1, dim], ...}`` (e.g. ``tokens/tokens.safetensors``).

    Stock diffusers takes a multi-token file in one call as tensors:
    ``sd = load_tokens(path); pipe.load_textual_inversion(list(sd.values()), token=list(sd))`` — or use
    ``add_tokens(pipe, load_tokens(path))``.

    >>> save_tokens(results, "out/digits/tokens/tokens.safetensors", {"model_id": "digits"})
    """
    meta: dict[str, str] = {"format": "diffusers-textual-inversion"}
    if isinstance(results, dict):
        tensors = dict(results)
    else:
        tensors = {}
        for r in results:
            if r.token in tensors:
                raise UserError(f"`results` holds token {r.token!r} twice: pass one result per class.")
            tensors[r.token] = r.embedding
        meta["classes"] = json.dumps([
            {"token": r.token, "class_index": r.class_index, "label": r.label, "steps": r.steps,
             "stop_reason": getattr(r, "stop_reason", None), "best_step": getattr(r, "best_step", None),
             "model_id": r.metadata.get("model_id"),
             "guide": r.metadata.get("guide"), "guide_trained_on": r.metadata.get("guide_trained_on")}
            for r in results
        ])
    if not tensors:
        raise UserError("`results` is empty: there are no tokens to save.")
    meta["tokens"] = json.dumps(list(tensors))
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else dumps(v, sort_keys=True, default=str)
    _write(tensors, path, meta)


def load_tokens(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a token file (one or many tokens; a directory means its ``learned_embeds.safetensors``).

    Returns:
        ``{token: fp32 tensor [n, dim]}`` in file order (n = 1 but for multi-vector tokens).

    >>> tokens = load_tokens("out/digits/tokens/003.safetensors")
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = _token_file(path)
    try:
        raw = load_file(str(p), device="cpu")
        order = json.loads(token_metadata(p).get("tokens", "[]"))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"Token file {str(path)!r} is not a valid safetensors file ({e}): write it again.") from None
    if not isinstance(order, list) or not all(isinstance(t, str) for t in order):
        order = []  # the order is a convenience; a file that garbles it still loads, sorted by token
    names = [t for t in order if t in raw] + sorted(t for t in raw if t not in order)
    out = {}
    for token, emb in ((t, raw[t]) for t in names):
        if emb.dim() == 1:
            emb = emb[None]
        if emb.dim() != 2 or emb.shape[0] < 1:
            raise UserError(
                f"Token {token!r} in {str(path)!r} has shape {tuple(emb.shape)}; textual-inversion tokens are "
                f"[n, dim] (n vectors): write it again with save_token or load it with pipe.load_textual_inversion."
            )
        out[token] = emb.float()
    return out


def token_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a token file (steps, stop reason, guide, model id, config...).

    >>> token_metadata("out/digits/tokens/003.safetensors")["stop_reason"]
    'all_correct'
    """
    from safetensors import SafetensorError, safe_open

    p = _token_file(path)
    try:
        with safe_open(str(p), framework="np") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"Token file {str(path)!r} is not a valid safetensors file ({e}): write it again.") from None


def _token_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "learned_embeds.safetensors"
    if not p.is_file():
        raise UserError(
            f"Token file {str(path)!r} does not exist: learn the tokens first (synthaug learn) or pass the path of "
            f"a .safetensors file written by save_token / save_tokens."
        )
    return p


def _write(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Serialize a safetensors file by hand, with a sorted header: `safetensors.torch.save` orders the metadata by a
    per-process random hash, so the same tokens would give different bytes on every run (a build promises: same config
    and seeds -> identical bytes). The layout is the format's own: u64 header length, JSON header, raw little-endian
    data.
    """
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for token, emb in tensors.items():
        emb = torch.as_tensor(emb).detach().to("cpu", torch.float32)
        rows = emb.reshape(emb.shape[0] if emb.dim() == 2 else 1, -1)  # [n, dim]: n vectors (1 for a [dim] tensor)
        data = rows.numpy().astype("<f4").tobytes()
        header[token] = {"dtype": "F32", "shape": list(rows.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the reference writer pads the header to 8 bytes, keeping the data aligned
    write_bytes(path, struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def int_or_none(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def token_metadata_or_empty(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, or {} for a file that is missing or not valid safetensors.

    Read by safetensors itself (numpy framework: no torch tensors are made), which refuses headers that claim more
    bytes than it allows.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return {str(k): str(v) for k, v in (f.metadata() or {}).items()}
    except (SafetensorError, OSError, ValueError):
        return {}
