"""Class tokens: learned with DCT (`dct`; many classes per denoising batch: `dct_batch`) or TI/MC-TI (`mcti`), named
and spliced (`text`), saved and loaded (`io`).

Tokens are saved in diffusers' textual-inversion format (``{token: [1, dim]}`` in safetensors), so stock
``pipe.load_textual_inversion(path)`` loads them; `add_tokens` does the same for many tokens at once. `clip` holds
the CLIP model MC-TI and token classification (Eq. 6) use.

>>> from synthaug.tokens import learn_dct_token, save_tokens, load_tokens

The modules: `text` (token names, prompts, tokenizing, encoding, `splice_tokens` — the one way a learned vector
enters the text encoder); `dct` (pipeline + classifier + class, or an attribute of a multi-label guide ->
`TokenResult`); `dct_batch` (many class jobs -> each class's `TokenResult` as it finishes, many classes per
denoising batch: `learn_dct_tokens`; and the `DCT` token method); `augment` (the straight-through clamp and the
differentiable augmentations of DCT's loss); `x0` (a denoising step's predicted clean image, for DCT's x0 loss);
`progress` (a token's per-step progress: a tqdm bar whose postfix is the loss, batch accuracy and stop rules' state,
or a callable fed one dict per iteration, which a build's worker sends as a ``"step"`` event the driver's `Tracker`
shows on its class bar; no torch); `mcti` (few-shot images -> TI / MC-TI token; the `TI` and `MCTI` token methods);
`trust` (a token + the k real images of every class -> `TrustVerdict`: does the guide recognise the class's real
images, do the token's images land on the class in the guide's — or CLIP's image — feature space at least as often
as the plain prompt's; ``dct.trust: off | warn | fallback``, ``dct.trust_features: guide | clip``; a build's verdict
kept in ``tokens/NNN_trust.json``: `kept_or_checked`); `clip` (the CLIP model MC-TI uses; Eq. 6 classification);
`io` (diffusers textual-inversion safetensors: save, load, add to a pipeline, read metadata).

`dct_batch` and `mcti` register their methods (`synthaug.token_methods`): a build and ``synthaug learn`` call them
through the registry only.
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
