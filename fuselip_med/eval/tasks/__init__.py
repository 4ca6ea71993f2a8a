"""The one table of evaluation tasks: name, the data roles each needs, its runner and its help text.

``eval``'s ``--tasks`` choices and help, the errors for missing data, the recipes' ``eval.tasks`` check and
``--suite paper`` all read :data:`TABLE`. Adding a task is one module ``eval/tasks/<task>.py`` with a
``run(ctx) -> dict`` function plus one :class:`EvalTask` row here. Importing this module is cheap (no torch):
runners are named as ``"module:function"`` and imported when a task runs.

Data roles (:data:`ROLES`) are what a task reads, independent of where the data comes from: ``--data
NAME=PATH`` opens PATH with the adapter NAME (``rocov2``, ``folder``, ``csv``, ``cc``, ...) and fills the roles
that adapter provides, or names a role directly (``--data valid=...``, ``--data mmeb=...``).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from fuselip_med.errors import UsageError

__all__ = ["EvalTask", "Role", "ROLES", "TABLE", "TASKS", "SUITES", "get_task", "missing_roles", "role_of_key",
           "tasks_help", "runner_of"]


@dataclass(frozen=True)
class Role:
    """A kind of evaluation data. ``aliases``: older data keys that mean this role (``rocov2_test``)."""

    name: str
    help: str
    aliases: tuple[str, ...] = ()


ROLES: dict[str, Role] = {r.name: r for r in (
    Role("test", "image + caption samples to evaluate on (ROCOv2 test split, any image-caption source)",
         ("rocov2_test",)),
    Role("train", "training data checked against 'test' by the leakage task (ROCOv2 train split, or any source)"),
    Role("valid", "image + caption samples with concepts, for choosing the concept threshold", ("rocov2_valid",)),
    Role("labelled", "images with a class label (a label column, or one folder per class)"),
    Role("tgit", "TGIT pools {kind: [pool, ...]} or a source whose images are transformed (else 'test')"),
    Role("composed", "(query image + query text -> target image) samples"),
    Role("vqa", "(image + question -> answer) samples: ROCOv2-VQA JSONL from `data synth-vqa`, or any VQA source",
         ("rocov2_vqa",)),
    Role("mmeb", "TIGER-Lab/MMEB-eval: one folder per subset (parquet or jsonl) and the extracted images"),
    Role("imagenet", "ImageNet-1k validation: val/<wnid>/*.JPEG (or LOC_val_solution.csv + flat images)"),
    Role("vg_crop", "Visual Genome: image_data.json, region_descriptions.json and the image folders"),
    Role("oi_crop", "OI-Crop task file (oi-crop.json, built by data_tools/build_oi_tasks.py) + Open Images images"),
    Role("oi_pos", "OI-Pos task file (oi-pos.json, built by data_tools/build_oi_tasks.py) + Open Images images"),
    Role("sugarcrepe", "SugarCrepe: the seven <subset>.json files and COCO val2017 images"),
    Role("volumes", "series: a folder (recursive), DICOMDIR, NIfTI file or CSV of them (CT-RATE: the .nii.gz)"),
    Role("series_labels", "labels by series: CT-RATE multi_abnormality_labels.csv (VolumeName + 0/1 columns)"),
    Role("series_reports", "reports by series: CT-RATE reports CSV (VolumeName, Findings_EN, Impressions_EN)"),
    Role("series_keys", "optional: an `embed --unit series` output whose salt keys the DICOM series as the CSVs do"),
    Role("vqa_rad", "VQA-RAD: 'VQA_RAD Dataset Public.json' and 'VQA_RAD Image Folder/'"),
    Role("slake", "SLAKE 1.0: test.json and imgs/"),
    Role("pathvqa", "PathVQA parquet shards (data/test-*.parquet)"),
    Role("pmc_vqa", "PMC-VQA: test_clean.csv (or test.csv) and the images/ folder of images.zip"),
    Role("chexpert5x200", "CheXpert 5x200: the published chexpert_5x200.csv (CheXpert columns) + CheXpert images"),
    Role("mimic5x200", "MIMIC-CXR 5x200: its CSV (Path, dicom_id, subject_id, study_id, Report, the 5 classes)"),
    Role("rsna", "RSNA Pneumonia: stage_2_train_labels.csv + stage_2_train_images/<patientId>.dcm"),
    Role("radcrepe", "RadCrepe: the <edit type>.json files `fuselip-med data radcrepe` wrote (SugarCrepe layout)"),
    Role("findings", "a findings label table scored by `findings` (CheXpert/VinDr-CXR/CT-RATE columns or `labels`)"),
    Role("findings_valid", "the findings label table whose rows choose each finding's threshold (never the test rows)"),
)}


@dataclass(frozen=True)
class EvalTask:
    """One evaluation task.

    ``roles``: the data roles it needs; an entry ``"a|b"`` is satisfied by either (the first present is used).
    ``runner``: ``"module:function"`` under ``fuselip_med.eval.tasks``; the function takes the run's
    :class:`~fuselip_med.eval.tasks.context.EvalContext` and returns the task entry of ``metrics.json``.
    ``suite``: ``"paper"`` for the paper's table; ``columns``: {column of the paper table: metric name}.
    """

    name: str
    roles: tuple[str, ...]
    runner: str
    help: str
    suite: str | None = None
    columns: tuple[tuple[str, str], ...] = ()


TABLE: tuple[EvalTask, ...] = (
    EvalTask("rocov2-retrieval", ("test",), "retrieval:run_image_caption",
             "image<->caption R@1/5/10, mean/median rank; full pool + seeded pools"),
    EvalTask("rocov2-modality", ("test",), "modality:run",
             "zero-shot modality classification of the test images (meta['modality'])"),
    EvalTask("rocov2-concepts", ("valid", "test"), "concepts:run",
             "zero-shot concept detection, threshold chosen on 'valid'"),
    EvalTask("modality-gap", ("test",), "modality_gap:run",
             "image-only vs caption embeddings: centroid distance, cosine of means"),
    EvalTask("zero-shot", ("labelled",), "zero_shot:run",
             "zero-shot classification with your classes (--labels, --templates): accuracy, balanced "
             "accuracy, macro-F1, confusion matrix"),
    EvalTask("tgit", ("tgit|test",), "tgit:run_tgit",
             "TGIT accuracy per transform (the paper's 5 kinds, official flip pools; --tgit-rows for the rows)",
             suite="paper", columns=(("TGIT", "mean_accuracy"),)),
    EvalTask("tgit-unique", ("tgit|test",), "tgit:run_tgit_unique",
             "TGIT variant: flip pools h / v / both, three distinct candidates (not the paper's protocol)"),
    EvalTask("tgit-med", ("tgit|test",), "tgit:run_tgit_med", "radiology TGIT accuracy per transform (7 kinds)"),
    EvalTask("composed-retrieval", ("composed",), "retrieval:run_composed",
             "(query image + query text) -> target image retrieval"),
    EvalTask("rocov2-vqa", ("vqa",), "vqa:run",
             "(image + question) -> the right answer among the pool's distinct answers: R@1/5/10, mean rank"),
    EvalTask("mmeb", ("mmeb",), "mmeb:run",
             "MMEB: Precision@1 on 36 subsets vs each query's candidates; Classification/VQA/Retrieval/Grounding",
             suite="paper", columns=(("MMEB Classification", "Classification"), ("MMEB VQA", "VQA"),
                                     ("MMEB Retrieval", "Retrieval"), ("MMEB Grounding", "Grounding"))),
    EvalTask("imagenet", ("imagenet",), "imagenet:run",
             "ImageNet-1k zero-shot top-1/top-5 with OpenAI's 80 templates", suite="paper",
             columns=(("ImageNet", "top1"),)),
    EvalTask("vg-crop", ("vg_crop",), "vg_crop:run",
             "VG-Crop: phrase + image -> the region's crop among the image's regions (official image selection)",
             suite="paper", columns=(("VG-Crop", "accuracy"),)),
    EvalTask("vg-crop-multi", ("vg_crop",), "vg_crop:run_multi",
             "VG-Crop variant: only images with two or more kept regions (not the paper's selection)"),
    EvalTask("oi-crop", ("oi_crop",), "open_images:run_crop",
             "OI-Crop: object name + image -> its crop among 10 crops", suite="paper",
             columns=(("OI-Crop", "accuracy"),)),
    EvalTask("oi-pos", ("oi_pos",), "open_images:run_pos",
             "OI-Pos: 'The {object} on the left/right' + image -> the right instance's crop", suite="paper",
             columns=(("OI-Pos", "accuracy"),)),
    EvalTask("sugarcrepe", ("sugarcrepe",), "sugarcrepe:run",
             "SugarCrepe: the positive caption must outscore the hard negative (7 subsets)", suite="paper"),
    EvalTask("series-zero-shot", ("volumes", "series_labels"), "series:run_zero_shot",
             "zero-shot abnormality AUROC per series (CT-RATE multi_abnormality_labels.csv layout)"),
    EvalTask("series-retrieval", ("volumes", "series_reports"), "series:run_retrieval",
             "series <-> report R@1/5/10 (CT-RATE reports CSV: Findings_EN + Impressions_EN)"),
    EvalTask("vqa-rad", ("vqa_rad",), "med_vqa:run_vqa_rad",
             "VQA-RAD test: closed accuracy over options, open R@1/R@5 over the distinct answers, per type",
             suite="radiology"),
    EvalTask("slake", ("slake",), "med_vqa:run_slake",
             "SLAKE English test: closed accuracy, open R@1/R@5, per answer and content type", suite="radiology"),
    EvalTask("pathvqa", ("pathvqa",), "med_vqa:run_pathvqa", "PathVQA test: yes/no accuracy, open R@1/R@5",
             suite="radiology"),
    EvalTask("pmc-vqa", ("pmc_vqa",), "med_vqa:run_pmc_vqa", "PMC-VQA test: accuracy over the four choices",
             suite="radiology"),
    EvalTask("roco2k", ("test",), "protocols:run_roco2k",
             "ROCO-2k (PMC-CLIP protocol): 2,000 seeded test pairs, R@1/5/10 both directions, drawn IDs written",
             suite="radiology"),
    EvalTask("chexpert5x200", ("chexpert5x200",), "protocols:run_chexpert5x200",
             "CheXpert 5x200 zero-shot 5-way accuracy [95% CI], rows written", suite="radiology"),
    EvalTask("mimic5x200", ("mimic5x200",), "protocols:run_mimic5x200",
             "MIMIC-CXR 5x200 zero-shot 5-way accuracy [95% CI], rows written", suite="radiology"),
    EvalTask("rsna-pneumonia", ("rsna",), "protocols:run_rsna",
             "RSNA Pneumonia: AUROC [95% CI], AP, accuracy at p+ >= p-, one label per patient", suite="radiology"),
    EvalTask("radcrepe", ("radcrepe|test",), "radcrepe:run",
             "RadCrepe: caption vs one-fact edit (laterality, negation, modality, body region, size/number): "
             "accuracy [95% CI] per edit, chance 0.5", suite="radiology"),
    EvalTask("leakage", ("test", "train"), "leakage:run",
             "train/test leakage: exact (SHA-256), pHash, embedding-cosine and same-article matches; leakage.csv "
             "(eval --check-leakage TRAIN; --exclude-leaked scores the test tasks again without them)"),
    EvalTask("findings", ("findings", "findings_valid"), "findings:run",
             "multi-label findings: AUROC [95% bootstrap CI], AP, F1/sensitivity/specificity at thresholds chosen "
             "on findings_valid (--prompts, --uncertain, --threshold-rule)", suite="radiology"),
)

TASKS: tuple[str, ...] = tuple(t.name for t in TABLE)
_BY_NAME = {t.name: t for t in TABLE}

# The paper's README column order (FuseLIP: MMEB x4, ImageNet, VG-Crop, OI-Crop, OI-Pos, TGIT), then SugarCrepe.
SUITES: dict[str, tuple[str, ...]] = {
    "paper": ("mmeb", "imagenet", "vg-crop", "oi-crop", "oi-pos", "tgit", "sugarcrepe"),
    # The radiology table's rows (fuselip_med.eval.suite.radiology_table): what --data-root holds of them runs.
    "radiology": tuple(t.name for t in TABLE if t.suite == "radiology"),
}


def get_task(name: str) -> EvalTask:
    """The task named ``name``; ``ValueError`` listing the known tasks otherwise."""
    if name not in _BY_NAME:
        raise UsageError(f"unknown evaluation task {name!r}: choose from {', '.join(TASKS)}")
    return _BY_NAME[name]


def role_of_key(key: str) -> str | None:
    """The role a data key names (the role itself or one of its aliases), else None."""
    if key in ROLES:
        return key
    for role in ROLES.values():
        if key in role.aliases:
            return role.name
    return None


def missing_roles(task: EvalTask, available: Iterable[str]) -> list[str]:
    """The role entries of ``task`` that none of the ``available`` roles satisfies."""
    have = set(available)
    return [entry for entry in task.roles if not any(r in have for r in entry.split("|"))]


def runner_of(task: EvalTask) -> Callable:
    """Import and return the task's runner function."""
    module, _, function = task.runner.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)


def tasks_help(names: Sequence[str] | None = None) -> str:
    """One line per task, ``name (roles): help``, for the CLI help."""
    rows = [_BY_NAME[n] for n in names] if names is not None else TABLE
    return "; ".join(f"{t.name} (needs {', '.join(e.replace('|', ' or ') for e in t.roles)}): {t.help}"
                     for t in rows)
