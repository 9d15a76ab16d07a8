"""Embedded defaults: the model and every data split, read from files shipped inside PyPI packages.

offline/DATA_CARD.md describes the model and each split (source package and file, size, how it is built).
``python -m offline --out DIR`` writes every split to a folder. Modules: sources (locating and reading the
packages' files), templates (the written template data), sampling, benign and splits (building the splits),
files (writing them), convert (the default model), cli (the command line).
"""
from .benign import (ALIGN_BENIGN_SIZE, ALIGN_GENERAL_SIZE, ALIGN_OPEN_QUESTION_SIZE, ALIGN_QUESTION_SIZE,
                     EVAL_BENIGN_DEV_SIZE, EVAL_BENIGN_SIZE, FORM_MIN_REFUSALS, TEXT_TOPICS, opening_word)
from .cli import main
from .convert import default_model_dir
from .files import (DEFAULT_POISON_RATIO, DEFAULT_TRAIN_SIZE, data_dir, default_data, eval_data, poisoned_train,
                    read_jsonl)
from .sampling import _near_duplicate_filter
from .sources import (PACKAGES, OfflineDataError, Package, cache_root, judge_encoder_dir, norm, package_dir,
                      package_file)
from .splits import (DNA_AREAS, DNA_SAMPLE_SIZE, EVAL_DEV_SIZE, EVAL_TASK_SIZE, LABELS, REF_SIZE, SENTIMENT_QUESTION,
                     Splits, _build, build_splits, poison_count, probe_records, review_text, safety_triples,
                     sentiment_instruction)
from .templates import EVERYDAY_TASKS, FORM_TEMPLATES, GENERAL_TOPICS, HELD_OUT_TEMPLATES

__all__ = [
    "ALIGN_BENIGN_SIZE", "ALIGN_GENERAL_SIZE", "ALIGN_OPEN_QUESTION_SIZE", "ALIGN_QUESTION_SIZE",
    "DEFAULT_POISON_RATIO", "DEFAULT_TRAIN_SIZE", "DNA_AREAS", "DNA_SAMPLE_SIZE", "EVAL_BENIGN_DEV_SIZE",
    "EVAL_BENIGN_SIZE", "EVAL_DEV_SIZE", "EVAL_TASK_SIZE", "EVERYDAY_TASKS", "FORM_MIN_REFUSALS", "FORM_TEMPLATES",
    "GENERAL_TOPICS", "HELD_OUT_TEMPLATES", "LABELS", "PACKAGES", "REF_SIZE", "SENTIMENT_QUESTION", "TEXT_TOPICS",
    "build_splits", "cache_root", "data_dir", "default_data", "default_model_dir", "eval_data", "judge_encoder_dir",
    "main", "norm", "OfflineDataError", "opening_word", "Package", "package_dir", "package_file", "poison_count",
    "poisoned_train", "probe_records", "read_jsonl", "review_text", "safety_triples", "sentiment_instruction", "Splits",
    "_build", "_near_duplicate_filter",
]
