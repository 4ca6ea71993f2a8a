"""The ``eval`` command's work, kept out of ``fuselip_med/cli/evaluate.py``: parse ``--data``/``--suite``/
``--labels`` into the arguments of :func:`~fuselip_med.eval.runner.run_evaluation`, with one-line errors for bad
input (``UsageError``)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fuselip_med.errors import UsageError

from .tasks import ROLES, SUITES, TASKS, tasks_help

__all__ = ["SUITE_FOLDERS", "DEFAULT_TASKS", "HELP", "tasks_option_help", "parse_data", "suite_data",
           "choose_tasks", "leakage_data", "RADIOLOGY_FOLDERS", "radiology_suite"]

DEFAULT_TASKS = ("rocov2-retrieval", "rocov2-modality")

# Where ``--data-root DIR`` looks for each benchmark role (the publishers' folder names).
SUITE_FOLDERS: dict[str, tuple[str, ...]] = {
    "mmeb": ("MMEB-eval",),
    "imagenet": ("imagenet", "ILSVRC2012"),
    "vg_crop": ("visual_genome", "VG"),
    "oi_crop": ("open_images/oi-crop.json",),
    "oi_pos": ("open_images/oi-pos.json",),
    "tgit": ("cc3m/cc3m_validation.csv",),
    "sugarcrepe": ("sugarcrepe",),
}
_ROLE_OF_TASK = {"mmeb": "mmeb", "imagenet": "imagenet", "vg-crop": "vg_crop", "oi-crop": "oi_crop",
                 "oi-pos": "oi_pos", "tgit": "tgit", "sugarcrepe": "sugarcrepe"}


HELP = {
    "data": "KEY=PATH (repeatable). KEY: a dataset adapter (rocov2, folder, csv, cc, ...) whose data fills the roles "
            f"it provides, a data role ({', '.join(ROLES)}) or ROLE:ADAPTER, e.g. labelled:csv=table.csv.",
    "suite": f"Run a benchmark suite: paper ({', '.join(SUITES['paper'])}) or radiology (those of "
             f"{', '.join(SUITES['radiology'])} whose data --data-root holds; radiology_table.md/.json/.png).",
    "data_root": "Folder holding the suite's benchmarks: " + ", ".join(f[0] for f in SUITE_FOLDERS.values()) + ".",
    "labels": "Zero-shot classes, one per line (default: the labels found in the data).",
    "templates": "Zero-shot prompt templates, one per line with {c} for the class (default: a radiology set).",
    "label_column": "The sample field holding the class label (a CSV column; folders: the class folder).",
    "prompts": "findings/5x200/RSNA prompt sets: a YAML with 'default' templates and 'findings' "
               "{name: {positive: [...], negative: [...]}} (default: the shipped sets).",
    "uncertain": "findings: what an uncertain (-1) label means: ignore (left out), positive or negative.",
    "threshold_rule": "findings: how findings_valid picks each finding's threshold: youden or max-f1.",
    "bootstrap": "Bootstrap resamples of the AUROC intervals.",
    "check_leakage": "Training data to check the test items against (PATH, read like --data train=PATH, or "
                     "ADAPTER=PATH): exact, perceptual-hash, embedding and same-article matches -> leakage.csv.",
    "exclude_leaked": "With --check-leakage: score the test tasks again without the leaked items (both reported).",
    "phash_distance": "Leakage: largest pHash Hamming distance (bits of 64) counted as a near-duplicate.",
    "leak_cosine": "Leakage: smallest image-embedding cosine counted as a near-duplicate.",
    "tgit_rows": "TGIT rows: 'official' (the FuseLIP evaluation's 1,000 CC3M validation CSV rows, shipped; the "
                 "default with --suite paper) or a file of 0-based row numbers (default: the first images).",
}


def tasks_option_help() -> str:
    """The ``--tasks`` help: the default rule and one entry per task of the table."""
    return ("Comma-separated tasks (default: the suite's; zero-shot with --labels/--templates; else "
            f"{','.join(DEFAULT_TASKS)}). {tasks_help()}")


def parse_data(entries: Sequence[str]) -> dict[str, str]:
    """``["KEY=PATH", ...]`` -> {KEY: PATH}; ``ValueError`` for an entry without ``=``."""
    data: dict[str, str] = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageError(f"--data {entry!r}: expected KEY=PATH, e.g. rocov2=ROCOv2_data or folder=my_images")
        data[key.strip()] = value.strip()
    return data


def suite_data(suite: str, root: str | os.PathLike, tasks: Sequence[str]) -> dict[str, str]:
    """{role: path} of the suite's benchmark folders under ``root`` for those of ``tasks`` that read one;
    ``ValueError`` naming every folder that is missing (run the others with ``--tasks``)."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise UsageError(f"--data-root {base} is not a folder")
    data, missing = {}, []
    for task in tasks:
        role = _ROLE_OF_TASK.get(task)
        if role is None:
            continue
        found = next((base / f for f in SUITE_FOLDERS[role] if (base / f).exists()), None)
        if found is None:
            missing.append(f"{task} ({base / SUITE_FOLDERS[role][0]})")
        else:
            data["tgit:cc" if role == "tgit" else role] = str(found)
    if missing:
        raise UsageError(f"suite {suite!r}: no data for {', '.join(missing)}; add it or choose tasks with "
                         f"--tasks (any of {', '.join(tasks)})")
    return data


# Where ``--suite radiology --data-root DIR`` looks for each data key (the publishers' folder and file names);
# the suite runs the tasks whose data is there and leaves the others out.
RADIOLOGY_FOLDERS: dict[str, tuple[str, ...]] = {
    "findings": ("findings/test.csv",),
    "findings_valid": ("findings/valid.csv",),
    "chexpert5x200": ("chexpert_5x200.csv", "CheXpert-v1.0-small/chexpert_5x200.csv"),
    "mimic5x200": ("mimic_5x200.csv", "mimic-cxr-jpg/mimic_5x200.csv"),
    "rsna": ("rsna-pneumonia-detection-challenge", "rsna"),
    "vqa_rad": ("VQA_RAD",),
    "slake": ("Slake1.0", "SLAKE"),
    "pathvqa": ("path-vqa", "pathvqa"),
    "pmc_vqa": ("PMC-VQA",),
    "rocov2": ("ROCOv2_data", "ROCOv2"),
    "radcrepe": ("radcrepe",),
}


def radiology_suite(root: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """(the radiology tasks whose data ``root`` holds, {data key: path}) from :data:`RADIOLOGY_FOLDERS`;
    ``UsageError`` when ``root`` is not a folder or holds none of them."""
    from .tasks import get_task, missing_roles
    from .tasks.context import resolve_data

    base = Path(root).expanduser()
    if not base.is_dir():
        raise UsageError(f"--data-root {base} is not a folder")
    data = {}
    for key, names in RADIOLOGY_FOLDERS.items():
        found = next((base / name for name in names if (base / name).exists()), None)
        if found is not None:
            data[key] = str(found)
    roles = resolve_data(data)
    tasks = [t for t in SUITES["radiology"] if not missing_roles(get_task(t), roles)]
    if not tasks:
        raise UsageError(f"suite 'radiology': {base} holds none of "
                         f"{', '.join(n[0] for n in RADIOLOGY_FOLDERS.values())}")
    return tasks, data


def leakage_data(value: str) -> tuple[str, str]:
    """``--check-leakage`` value -> (data key, path): ``ADAPTER=PATH`` -> ``train:ADAPTER``, a plain PATH ->
    ``train`` (opened like ROCOv2 data, or the folder adapter for a user's table or folder)."""
    adapter, sep, path = value.partition("=")
    if sep and adapter.strip() and path.strip():
        return f"train:{adapter.strip()}", path.strip()
    return "train", value.strip()


def choose_tasks(tasks: str | None, suite: str | None, labels_given: bool) -> list[str]:
    """The tasks to run: ``--tasks``, else the suite's, else ``zero-shot`` when labels/templates are given,
    else :data:`DEFAULT_TASKS`."""
    if suite is not None and suite not in SUITES:
        raise UsageError(f"unknown suite {suite!r}: choose from {', '.join(SUITES)}")
    if tasks:
        chosen = [t.strip() for t in tasks.split(",") if t.strip()]
        unknown = [t for t in chosen if t not in TASKS]
        if unknown:
            raise UsageError(f"unknown evaluation task(s) {', '.join(unknown)}: choose from {', '.join(TASKS)}")
        return chosen
    if suite is not None:
        return list(SUITES[suite])
    return ["zero-shot"] if labels_given else list(DEFAULT_TASKS)
