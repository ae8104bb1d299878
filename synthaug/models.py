"""Diffusion models: load a Stable Diffusion pipeline from a hub id, a local directory, or the embedded world.

Consumes a diffusers model id / local `save_pretrained` directory / embedded name (``"digits"``) and produces a stock
`StableDiffusionPipeline` (tokenizer, text encoder, UNet, VAE, scheduler) on the right device and dtype. Never
downloads when offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``): absent weights give a one-line
`UserError` instead of a hub stack trace.

Also here: the real CLIP BPE tokenizer built without any download (from the OpenAI BPE merges shipped in the
package), and the tiny model builder that tests use (configs in the manner of diffusers' own tests).

`load_diffusion` holds the UNet and VAE channels-last on CUDA (`set_channels_last`); `clip_tokenizer()` is the
real CLIP BPE, no download.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import SCHEDULERS, check_scheduler
from .errors import UserError

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer


ASSETS = Path(__file__).parent / "assets"
CLIP_BPE = ASSETS / "clip" / "bpe_simple_vocab_16e6.txt.gz"

# Embedded worlds: a name that resolves to a diffusers directory shipped inside the package.
EMBEDDED_MODELS = {"digits": ASSETS / "digits" / "model"}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------------------------
# Devices and dtypes
# --------------------------------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> the first CUDA device if there is one, else CPU. Anything else is passed to torch."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise UserError(f"`device` must be 'auto', 'cpu', 'cuda' or 'cuda:N' but is {device!r}: {e}") from None


def cuda_available() -> bool:
    """Whether this machine has a usable CUDA GPU (what ``auto`` switches resolve against)."""
    return torch.cuda.is_available()


def check_device(device: torch.device, requested: str, *, local: bool) -> None:
    """Refuse in one line a CUDA (or MPS) `device` this machine does not have.

    Args:
        device: the resolved device (`resolve_device`).
        requested: what the user asked for (named in the message).
        local: the work runs in this process, so a ``cuda:N`` must be one of this machine's devices.
    """
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"`device` is {requested!r} but this machine has no usable CUDA GPU "
                            f"(torch.cuda.is_available() is False): pass --device cpu (or auto), or run on a GPU "
                            f"machine.")
        if local and device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"`device` is {requested!r} but this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s): pass cuda:0 .. cuda:{torch.cuda.device_count() - 1}.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"`device` is {requested!r} but MPS is not available here: pass --device cpu or auto.")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Weights dtype for UNet/VAE. ``"auto"``: bf16 on CUDA where supported (fp16 otherwise), fp32 on CPU.

    The *token path* (the trained embedding and its optimizer state) is always fp32, whatever this returns; see
    `synthaug.tokens`.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise UserError(f"`dtype` must be one of auto, {', '.join(DTYPES)} but is {dtype!r}.")
    return DTYPES[dtype]


# --------------------------------------------------------------------------------------------------------------------
# The CLIP tokenizer, offline
# --------------------------------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    # OpenAI CLIP's reversible byte -> printable unicode table (simple_tokenizer.py).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def _clip_tokenizer_files() -> dict[str, str]:
    """vocab.json, merges.txt and tokenizer_config.json of the CLIP tokenizer, from the shipped BPE merges."""
    with gzip.open(CLIP_BPE) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]  # 48,894 merges, as OpenAI's recipe
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    # model_max_length must be written: without it transformers reports 1e30 and SD pipelines overflow.
    config = {"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True,
              "tokenizer_class": "CLIPTokenizer"}
    return {"vocab.json": json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
            "tokenizer_config.json": json.dumps(config)}


def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP ViT-L/14 (Stable Diffusion 1.x) tokenizer, built with no download.

    Each call returns a new tokenizer (callers add tokens to theirs).

    >>> clip_tokenizer()("a photo of a cat").input_ids
    [49406, 320, 1125, 539, 320, 2368, 49407]
    """
    from transformers import CLIPTokenizer

    # Loaded from files in a temporary directory that is removed at once: the tokenizer holds its vocabulary and
    # merges in memory, so nothing is left behind in the system's temp folder.
    with tempfile.TemporaryDirectory(prefix="synthaug-clip-tokenizer-") as d:
        for name, text in _clip_tokenizer_files().items():
            (Path(d) / name).write_text(text)
        return CLIPTokenizer.from_pretrained(d)


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------
def resolve_model_path(model: str) -> str:
    """An embedded name -> its shipped directory; an existing local path -> itself; anything else -> a hub id."""
    if model in EMBEDDED_MODELS:
        path = EMBEDDED_MODELS[model]
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"`model` {model!r} is an embedded world but its weights are missing at {path}: reinstall synthaug, "
                f"or rebuild them with `python scripts/train_digits_world.py`."
            )
        return str(path)
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "model_index.json").is_file():
            raise UserError(
                f"`model` {model!r} is a local path but has no model_index.json: pass a diffusers directory written "
                f"by `StableDiffusionPipeline.save_pretrained`, or a hub id like 'CompVis/stable-diffusion-v1-4'."
            )
        return str(p)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UserError(f"`model` {model!r} does not exist: pass an existing local diffusers directory or a hub id.")
    return model


def offline() -> bool:
    """True when the user asked huggingface_hub not to touch the network."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def set_scheduler(pipe: StableDiffusionPipeline, scheduler: str | None,
                  timestep_spacing: str | None = None) -> StableDiffusionPipeline:
    """Swap the pipeline's scheduler for a named one built from the same config (diffusers' `from_config` idiom),
    optionally with another `timestep_spacing` (None keeps the config's; with no `scheduler`, the model's own class)."""
    check_scheduler(scheduler, timestep_spacing)
    if scheduler is None and timestep_spacing is None:
        return pipe
    import diffusers

    cls, overrides = type(pipe.scheduler), {}
    if scheduler is not None:
        cls_name, overrides = SCHEDULERS[scheduler]
        cls = getattr(diffusers, cls_name)
    if timestep_spacing is not None:
        overrides = {**overrides, "timestep_spacing": timestep_spacing}
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)
    return pipe


@contextlib.contextmanager
def _quiet_loading():
    """No "Loading pipeline components" / "Loading weights" bars: one per actor drowns the build's own progress."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    d_on, t_on = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if d_on:
            dlog.enable_progress_bar()
        if t_on:
            tlog.enable_progress_bar()


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    # diffusers renamed `torch_dtype` to `dtype` (0.36+, with a deprecation warning for the old name).
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def load_diffusion(
    model: str,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    scheduler: str | None = None,
    timestep_spacing: str | None = None,
    local_files_only: bool | None = None,
    revision: str | None = None,
    channels_last: bool | None = None,
) -> StableDiffusionPipeline:
    """Load a Stable Diffusion 1.x/2.x pipeline, ready for token learning and generation.

    Args:
        model: hub id (``"CompVis/stable-diffusion-v1-4"``), local `save_pretrained` directory, or ``"digits"``.
        device: ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda:1"``...
        dtype: UNet/VAE/text-encoder weights dtype; ``"auto"`` = bf16/fp16 on CUDA, fp32 on CPU.
        scheduler: optional scheduler name (see `SCHEDULERS`); default keeps the model's own.
        timestep_spacing: optional diffusers ``timestep_spacing`` for it (``"linspace"``...); default keeps the
            config's.
        local_files_only: never touch the network; default follows ``HF_HUB_OFFLINE``.
        revision: hub revision.
        channels_last: UNet and VAE in channels-last memory (`set_channels_last`); None: on CUDA only.

    Returns:
        A stock `StableDiffusionPipeline` with the safety checker removed, progress bar off, weights frozen.

    >>> pipe = load_diffusion("digits", device="cpu")
    """
    from diffusers import StableDiffusionPipeline

    path = resolve_model_path(model)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if local_files_only is None:
        local_files_only = offline() or Path(path).exists()
    try:
        with _quiet_loading():
            pipe = StableDiffusionPipeline.from_pretrained(
                path, **_dtype_kwarg(torch_dtype), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False, local_files_only=local_files_only, revision=revision,
            )
    except (OSError, ValueError) as e:  # huggingface_hub's not-found errors are OSError subclasses
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ("it is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1 or "
                "local_files_only): download it first with `huggingface-cli download " + model + "`, or pass a local "
                "diffusers directory") if local_files_only else "pass a local diffusers directory or a valid hub id"
        raise UserError(f"`model` {model!r} could not be loaded ({first[:200]}): {hint}.") from None
    set_scheduler(pipe, scheduler, timestep_spacing)
    pipe.to(dev)
    if dev.type == "cuda" if channels_last is None else channels_last:
        set_channels_last(pipe)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    pipe.synthaug_model_id = model  # recorded in token files and index rows
    return pipe


def set_channels_last(pipe: StableDiffusionPipeline, enabled: bool = True) -> StableDiffusionPipeline:
    """Hold the UNet's and the VAE's weights in channels-last (NHWC) memory, or back in NCHW with ``enabled=False``.

    The convolutions then take and give NHWC tensors (a convolution follows its weight's layout), so cuDNN runs
    without the NCHW<->NHWC transposes around each of them; inputs need no change. Generation and token learning
    both go through these modules. Values change by float rounding only: a kernel for the other layout sums in
    another order.

    >>> set_channels_last(pipe).unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    True
    """
    memory_format = torch.channels_last if enabled else torch.contiguous_format
    for module in (pipe.unet, pipe.vae):
        module.to(memory_format=memory_format)
    return pipe
