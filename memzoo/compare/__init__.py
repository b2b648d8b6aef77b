"""The comparison API: train and evaluate variants on the same tasks, under the same
budget and seeds, and write leaderboards.

>>> from memzoo.compare import compare
>>> rows = compare(["bswa"], "copy", train={"steps": 2, "length": 16}, eval={"examples": 2}, model={"d_model": 16})
>>> sorted({(r.variant, r.eval_length, r.metric) for r in rows})[:2]
[('bswa', 16, 'accuracy'), ('bswa', 16, 'exact')]

An ordinary package: ``memzoo.compare.compare(...)`` (or ``from memzoo.compare import
compare``) is the one-call API. ``import memzoo`` does not import it; the first use of
``memzoo.compare`` does.
"""

from memzoo.compare.leaderboard import build_leaderboard, markdown, markdown_table, write_leaderboard
from memzoo.compare.results import (
    Divergence,
    Leaderboard,
    Provenance,
    ResultRow,
    ResultsFileError,
    RunRecord,
    RunSpec,
    RunSummary,
    load_leaderboard,
)
from memzoo.compare.runner import compare, compare_runs
from memzoo.compare.settings import (
    PRESETS,
    SMALL_SETTING_DEFAULTS,
    CompareConfig,
    EvalSettings,
    ModelSettings,
    TrainSettings,
    preset,
    variant_options,
)

__all__ = [
    "PRESETS", "SMALL_SETTING_DEFAULTS", "CompareConfig", "Divergence", "EvalSettings", "Leaderboard", "ModelSettings",
    "Provenance", "ResultRow", "ResultsFileError", "RunRecord", "RunSpec", "RunSummary", "TrainSettings", "build_leaderboard", "compare", "compare_runs", "load_leaderboard",
    "markdown", "markdown_table", "preset", "variant_options", "write_leaderboard",
]
