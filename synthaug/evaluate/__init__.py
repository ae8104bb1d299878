"""Evaluation: the paper's tables on a build directory.

Consumes a build directory plus a judge classifier, a real dataset, or a feature extractor, and produces typed
results, machine-readable files under ``out/eval/`` and terminal tables (`format_table`):

- `evaluate_judge` (Table 1, `judge`): a judge classifier scores every generated image; top-1/top-5 per class and
  overall for each method (``sd``, ``dct``, ...), a paired comparison on identical seeds (images fixed vs broken by
  the token), and the verdict written back as ``judge_prob`` in ``index.parquet``.
- `train_downstream` (Table 2, `downstream`): a timm classifier trained on `SynthAugDataset` with k real images per
  class plus N synthetic ones, for each method and for real images only, tested on the real test split; mean ± std
  over seeds. Each (method, k, seed) cell is a small JSON file, so an interrupted run resumes where it stopped.
- `compute_fid` (Tables 3/5, `fid`): FID and KID (torchmetrics) of each method's images against real images, with
  Inception-v3 features or a classifier's penultimate features.
- `evaluate_shots` (`shots`): few-shot classification with learned tokens.
- `paired`: Table 2 rows from any builds and settings → means with 95% t-intervals, paired differences and t-tests
  against baseline rows. `tables` renders and saves results, `names` maps judge labels to build classes, `images`
  reads images in batches.

The judge's sign test is `scipy.stats.binomtest` where scipy is installed, the same exact sum without it;
`synthaug evaluate` refuses a judge that is the build's guide unless ``--allow-guide-judge``. Table 2's learners are
a timm CNN or ``arch="linear"`` (logistic regression on pixels), with hard or soft targets.
"""

from .downstream import CellResult, DownstreamConfig, DownstreamResult, DownstreamRow, train_downstream
from .fid import (
    FeatureExtractor,
    FIDResult,
    FIDRow,
    FIDScore,
    classifier_extractor,
    compute_fid,
    fid_kid,
    inception_extractor,
)
from .images import ImageReader, iter_image_batches
from .judge import (
    ClassAccuracy,
    JudgeResult,
    MethodAccuracy,
    PairedComparison,
    SelfScoringWarning,
    evaluate_judge,
    write_judge_prob,
)
from .names import ClassMapping, map_classes, resolve_class_map
from .shots import evaluate_shots
from .tables import Table, format_table, load_result, result_tables

__all__ = [
    "CellResult", "ClassAccuracy", "ClassMapping", "DownstreamConfig", "DownstreamResult", "DownstreamRow", "FIDResult", "FIDRow",
    "FIDScore", "FeatureExtractor", "ImageReader", "JudgeResult", "MethodAccuracy", "PairedComparison",
    "SelfScoringWarning", "Table", "classifier_extractor", "compute_fid", "evaluate_judge",
    "evaluate_shots", "fid_kid", "format_table", "inception_extractor", "iter_image_batches", "load_result",
    "map_classes", "resolve_class_map", "result_tables", "train_downstream", "write_judge_prob",
]
