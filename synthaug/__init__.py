"""synthaug: class-accurate synthetic training sets from text-to-image diffusion models.

The public API, one entry point per stage (see ARCHITECTURE.md): the library only. What the command line runs
(`synthaug.cli.configure_logging`, `synthaug.commands.learn_tokens` and the other subcommands) and the testing world
(`synthaug.testing.tiny_pipeline`) are imported from their modules. Imports are lazy so that ``import synthaug`` and
``synthaug --help`` stay instant; torch/diffusers/transformers load on first use of a name that needs them.

>>> from synthaug import load_diffusion, load_classifier, learn_dct_token, save_tokens, generate
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # config
    "BuildConfig": "config", "DCTConfig": "config", "MCTIConfig": "config", "GenerateConfig": "config",
    "load_config": "config",
    "UserError": "errors",
    # models
    "load_diffusion": "models", "clip_tokenizer": "models",
    # classifier
    "load_classifier": "classifier", "Classifier": "classifier",
    # tokens
    "learn_dct_token": "tokens", "learn_dct_tokens": "tokens", "DCTJob": "tokens", "TokenResult": "tokens", "save_token": "tokens", "save_tokens": "tokens",
    "load_tokens": "tokens", "add_tokens": "tokens", "token_name": "tokens", "token_metadata": "tokens",
    "learn_mcti_token": "tokens", "classify": "tokens",
    # generate
    "generate": "generation", "GeneratedImage": "generation", "image_seed": "generation",
    # shards
    "write_shard": "shards", "merge_index": "index", "read_sample": "shards", "verify": "index",
    "load_index": "index", "ShardReader": "shards", "ShardError": "shards", "open_build": "index",
    # datasets / mix
    "get_dataset": "datasets", "few_shot_indices": "datasets", "CUB200": "datasets", "INat2021": "datasets",
    "ImageNet": "datasets", "ImageFolder": "datasets", "Digits": "datasets",
    "SynthAugDataset": "mix",
    # build
    "build": "builder", "BuildResult": "builder", "BuildFailed": "builder", "select_classes": "datasets",
    # evaluate / report
    "evaluate_judge": "evaluate", "train_downstream": "evaluate", "compute_fid": "evaluate",
    "format_table": "evaluate", "load_result": "evaluate",
    "write_report": "report",
}

# Command-line helpers and the testing world: importable from their modules, not the library's API.
_ELSEWHERE = {"configure_logging": "cli", "learn_tokens": "commands", "export_tokens": "commands",
              "generate_to_folder": "commands", "tiny_pipeline": "testing"}

__all__ = [*sorted(_EXPORTS), "__version__"]  # noqa: PLE0604 (strings: the keys of _EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    if name in _ELSEWHERE:
        raise AttributeError(f"module 'synthaug' has no attribute {name!r}: it is not part of the library API, "
                             f"import it from synthaug.{_ELSEWHERE[name]}")
    raise AttributeError(f"module 'synthaug' has no attribute {name!r}")


def __dir__():
    return __all__
