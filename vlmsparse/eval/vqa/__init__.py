"""VQA evaluation: VQAv2 / OK-VQA / GQA answer scoring, their official data files, batched generation, and the
official results files for evaluation servers. One job per module:

- :mod:`.metrics`: answer normalisation, VQA accuracy (plain and vqaEval's leave-one-out), exact match;
- :mod:`.rows`: :class:`VQARow` and the readers of our JSONL, VQAv2 / OK-VQA and GQA files (:func:`load_vqa_rows`);
- :mod:`.generation`: batched greedy answers (:func:`generate_answers`);
- :mod:`.scoring`: :class:`VQAReport`, :func:`score_predictions`, :func:`evaluate_vqa` (generate, then score);
- :mod:`.folders`: evaluate a model folder (:func:`evaluate_folder`, :func:`load_model_folder`);
- :mod:`.results`: the results files for EvalAI / GQA (:func:`write_results`, :func:`write_folder_results`).

Every name is importable from ``vlmsparse.eval.vqa``. Splits without public answers (VQAv2 test-dev / test, GQA
test / challenge) are answered, not scored: :func:`write_results` writes the official results file. See
docs/ARCHITECTURE.md for where evaluation sits in the package.
"""

from .folders import evaluate_folder, load_model_folder
from .generation import default_prompt, generate_answers
from .metrics import METRICS, exact_match, normalize_answer, vqa_accuracy
from .results import RESULTS_FORMATS, check_results_path, results_format, write_folder_results, write_results
from .rows import FORMATS_HELP, VQARow, load_vqa_jsonl, load_vqa_rows
from .scoring import VQAReport, evaluate_vqa, score_predictions

__all__ = [
    "normalize_answer",
    "vqa_accuracy",
    "exact_match",
    "VQARow",
    "VQAReport",
    "load_vqa_jsonl",
    "load_vqa_rows",
    "score_predictions",
    "generate_answers",
    "evaluate_vqa",
    "default_prompt",
    "results_format",
    "write_results",
    "check_results_path",
    "write_folder_results",
    "evaluate_folder",
    "load_model_folder",
    "METRICS",
    "FORMATS_HELP",
    "RESULTS_FORMATS",
]
