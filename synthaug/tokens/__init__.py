"""Class tokens: learned with DCT (`dct`; many classes per denoising batch: `dct_batch`) or TI/MC-TI (`mcti`), named
and spliced (`text`), saved and loaded (`io`).

Tokens are saved in diffusers' textual-inversion format (``{token: [1, dim]}`` in safetensors), so stock
``pipe.load_textual_inversion(path)`` loads them; `add_tokens` does the same for many tokens at once. `clip` holds
the CLIP model MC-TI and token classification (Eq. 6) use.

>>> from synthaug.tokens import learn_dct_token, save_tokens, load_tokens
"""

from .clip import (
    CLASSIFY_TEMPLATE,
    ClipPreprocess,
    check_paired,
    class_features,
    classify,
    image_features,
    load_clip,
    text_prototypes,
)
from .dct import STOP_REASONS, TokenResult, learn_dct_token
from .dct_batch import DCTJob, learn_dct_tokens
from .io import add_tokens, load_tokens, save_token, save_tokens, token_metadata
from .mcti import METHODS, TI_TEMPLATES, MCTIResult, learn_mcti_token, splice_tokens
from .text import embedding_sha256, render_prompt, token_name
from .trust import TRUST_MODES, TrustVerdict, check_token_trust

__all__ = [
    "CLASSIFY_TEMPLATE", "METHODS", "STOP_REASONS", "TI_TEMPLATES", "TRUST_MODES", "ClipPreprocess", "DCTJob",
    "MCTIResult", "TokenResult", "TrustVerdict", "add_tokens", "check_paired", "check_token_trust", "class_features", "classify",
    "embedding_sha256",
    "image_features", "learn_dct_token", "learn_dct_tokens", "learn_mcti_token", "load_clip", "load_tokens", "render_prompt",
    "save_token", "save_tokens", "splice_tokens", "text_prototypes", "token_metadata", "token_name",
]
