"""Class tokens in the text encoder: token names, prompts, tokenizing, encoding, and splicing learned vectors in.

One implementation for every way a token is trained or used (DCT, TI/MC-TI, CLIP classification): prompts are
tokenized exactly as `StableDiffusionPipeline.encode_prompt` does at inference, and a learned vector enters the text
encoder through `splice_tokens`, never through the embedding matrix.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import UserError
from ..layout import token_string

if TYPE_CHECKING:
    from transformers import CLIPTokenizer


def token_name(class_index: int) -> str:
    """The token string of a class: ``"<synthaug-007>"``; unlike a word, it can never collide with the vocabulary.

    >>> token_name(7)
    '<synthaug-007>'
    """
    if isinstance(class_index, bool) or not isinstance(class_index, int) or class_index < 0:
        raise UserError(f"`class_index` must be a non-negative integer but is {class_index!r}.")
    return token_string(class_index)


def vector_names(token: str, num_vectors: int = 1) -> list[str]:
    """The tokenizer entries of a token of `num_vectors` embedding vectors, named as diffusers' multi-vector textual
    inversion names them (``load_textual_inversion`` adds them, and its pipelines spell ``token`` in a prompt as all
    of them).

    >>> vector_names("<synthaug-003>", 3)
    ['<synthaug-003>', '<synthaug-003>_1', '<synthaug-003>_2']
    """
    return [token] + [f"{token}_{i}" for i in range(1, int(num_vectors))]


def spell_token(token: str, num_vectors: int = 1) -> str:
    """How a prompt spells a token of `num_vectors` vectors for the text encoder (what diffusers'
    ``maybe_convert_prompt`` makes of ``token``).

    >>> spell_token("<synthaug-003>", 2)
    '<synthaug-003> <synthaug-003>_1'
    """
    return " ".join(vector_names(token, num_vectors))


def vector_ids(tokenizer: CLIPTokenizer, token: str) -> list[int]:
    """The ids of `token`'s vectors: the token, then ``<token>_1``, ``<token>_2``... while the tokenizer holds them
    (diffusers' rule in ``TextualInversionLoaderMixin.maybe_convert_prompt``)."""
    added = tokenizer.get_added_vocab()
    names = [token]
    while f"{token}_{len(names)}" in added:
        names.append(f"{token}_{len(names)}")
    return [tokenizer.convert_tokens_to_ids(n) for n in names]


def embedding_sha256(embedding: torch.Tensor) -> str:
    """sha256 of an embedding's fp32 values (little-endian, C order): what `GeneratedImage.token_sha256` records."""
    data = embedding.detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(-1).numpy()
    return hashlib.sha256(data.astype("<f4", copy=False).tobytes()).hexdigest()


def render_prompt(template: str, label: str, token: str | None) -> str:
    """Fill a prompt template: ``{token}`` -> the class token (dropped when None), ``{label}`` -> the class name.

    Whitespace is tidied, so the plain prompt has no double space where the token was. Plain replacement, not
    `str.format`, so braces in a class name can do no harm.

    >>> render_prompt("A photo of {token} {label}", "Black footed Albatross", "<synthaug-000>")
    'A photo of <synthaug-000> Black footed Albatross'
    >>> render_prompt("A photo of {token} {label}", "Black footed Albatross", None)
    'A photo of Black footed Albatross'
    """
    if token is not None and "{token}" not in template:
        raise UserError(f"Prompt template {template!r} has no {{token}} placeholder: add one where the class token goes.")
    text = template.replace("{token}", token or "").replace("{label}", label)
    return " ".join(text.split())


def text_transformer(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """CLIPTextModel -> its CLIPTextTransformer; a CLIPTextTransformer (``clip.text_model``) -> itself."""
    return getattr(text_encoder, "text_model", text_encoder)


def token_embedding(text_encoder: torch.nn.Module) -> torch.nn.Embedding:
    return text_transformer(text_encoder).embeddings.token_embedding


@contextlib.contextmanager
def splice_tokens(text_encoder: torch.nn.Module, rows: dict[int, torch.Tensor]) -> Iterator[None]:
    """Within the block, token id ``i`` embeds to ``rows[i]`` (a ``[dim]`` tensor; gradients flow into it).

    The embedding matrix is neither read nor written for those ids (a pre-hook looks them up as row 0, a forward hook
    replaces the result), so a trained token is a standalone parameter, and ids the matrix has no row for (tokens
    added to a tokenizer copy only) work too. Many tokens cost one lookup (K class tokens at once for Eq. 6), not K.
    """
    emb = token_embedding(text_encoder)
    keys = sorted(rows)
    key_t = torch.tensor(keys, dtype=torch.long, device=emb.weight.device)
    table = torch.stack([rows[k].reshape(-1) for k in keys])  # [K, dim], carries the tokens' gradients
    found: list[tuple[torch.Tensor, torch.Tensor]] = []

    def pre(module, args):
        ids = args[0]
        pos = torch.searchsorted(key_t, ids).clamp(max=len(keys) - 1)
        hit = key_t[pos] == ids
        found.append((hit, pos))
        return (ids.masked_fill(hit, 0), *args[1:])

    def post(module, args, output):
        hit, pos = found.pop()
        return torch.where(hit.unsqueeze(-1), table[pos].to(output.dtype), output)

    handles = [emb.register_forward_pre_hook(pre), emb.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, max_length]`` on `device`."""
    # Padded to the tokenizer's max length, exactly as the pipeline encodes prompts at inference.
    # A tokenizer saved without model_max_length reports 1e30: fall back to CLIP's 77.
    max_length = tokenizer.model_max_length if tokenizer.model_max_length <= 4096 else 77
    enc = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return {"input_ids": enc.input_ids.to(device), "attention_mask": enc.attention_mask.to(device)}


def encode(text_encoder: torch.nn.Module, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """The conditioning ``C = τ_φ(P)``: last hidden states (after the final layer norm), as SD pipelines use them."""
    # `StableDiffusionPipeline.encode_prompt` passes the mask only to encoders configured to use one.
    use_mask = getattr(getattr(text_encoder, "config", None), "use_attention_mask", False)
    return text_encoder(enc["input_ids"], attention_mask=enc["attention_mask"] if use_mask else None)[0]


def pool_eos(hidden: torch.Tensor, input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    # The first end-of-text position (padding may repeat it). Not the config's `eos_token_id == 2` argmax rule, which
    # would pool at the new class token (the largest id) in SD 1.x's text encoder.
    pos = (input_ids == eos_token_id).int().argmax(dim=-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]


def single_token_id(tokenizer: CLIPTokenizer, word: str, what: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise UserError(f"`{what}` {word!r} must be a single token of the tokenizer but splits into {len(ids)} "
                        f"tokens: use one common word such as 'a', 'object' or 'bird'.")
    return ids[0]


def tokenizer_with(tokenizer: CLIPTokenizer, tokens: Sequence[str]) -> CLIPTokenizer:
    """`tokenizer` if it already knows `tokens` as added tokens, else a copy that does (the original stays as is)."""
    for t in tokens:
        if not isinstance(t, str) or not t or t != t.strip():
            raise UserError(f"Token {t!r} must be a non-empty string without surrounding spaces, e.g. '<synthaug-000>'.")
        if t in tokenizer.get_vocab() and t not in tokenizer.get_added_vocab():
            raise UserError(f"Token {t!r} is already a word of the tokenizer's vocabulary: a class token must be new. "
                            f"Rename it, e.g. {token_name(0)!r}.")
    missing = [t for t in tokens if t not in tokenizer.get_added_vocab()]
    if missing:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_tokens(missing)
    return tokenizer
