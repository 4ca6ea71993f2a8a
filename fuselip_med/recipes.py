"""Recipes: the typed schema of a training/fine-tuning run, YAML loading and ``--set key=value`` overrides.

A recipe is validated once, here, at the edge; errors name the file and the key and say what to do.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fuselip_med.errors import UserError

RECIPE_DIRS = (
    Path(__file__).resolve().parent / "recipe_files",  # installed wheel (package data)
    Path(__file__).resolve().parent.parent / "recipes",  # source checkout / editable install
)


class RecipeError(UserError, ValueError):
    """A recipe that cannot be used; the message is one line naming the file and key (exit code 2: the
    command line named it)."""

    exit_code = 2


class Section(BaseModel):
    """Base for recipe sections: unknown keys are errors, values are validated strictly where it matters."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSection(Section):
    """PEFT LoRA on the encoder's attention and MLP linears."""

    enabled: bool = False
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: list[str] = ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"]
    train_logit_params: bool = True


class ModelSection(Section):
    """Which model to build: an arch and a size, optionally initialised from a checkpoint, optionally with LoRA.

    ``arch``: ``fuselip`` (early fusion, sigmoid + MMM loss) or a late-fusion baseline of the paper,
    ``siglip_sf`` / ``siglip_mlf`` (sigmoid loss only; ``core/late_fusion.py``).
    """

    arch: Literal["fuselip", "siglip_sf", "siglip_mlf"] = "fuselip"
    size: Literal["tiny", "small", "base"] = "small"
    init: Optional[str] = None
    lora: LoraSection = LoraSection()


class DatasetSpec(Section):
    """One data source: an adapter name, its path and split, a mixture weight and adapter options.

    ``direct: false`` keeps the dataset out of the mixture itself, so that it only feeds tasks (e.g. CC3M
    whose image-caption pairs come from the TGIT task's identity pairs, as in the paper's cc3m-aug).
    ``id`` names the source; for ``data.eval`` entries it is the evaluation data role the source fills
    (``test``, ``valid``, ``tgit``, ...; see ``fuselip_med.eval.tasks.ROLES``).
    """

    name: str
    id: Optional[str] = None
    direct: bool = True
    path: Optional[str] = None
    split: str = "train"
    weight: float = Field(1.0, gt=0)
    limit: Optional[int] = Field(None, gt=0)
    options: dict[str, Any] = {}


class TaskSpec(Section):
    """A task built on base datasets (e.g. ``tgit``, ``tgit_med``) with its mixture weight.

    ``bases`` names the base datasets (their ``id``, else adapter ``name``) it applies to; default: all.
    """

    name: str
    bases: Optional[list[str]] = None
    weight: float = Field(1.0, gt=0)
    options: dict[str, Any] = {}


class DataSection(Section):
    """Training and evaluation data."""

    root: Optional[str] = None
    train: list[DatasetSpec] = []
    eval: list[DatasetSpec] = []
    tasks: list[TaskSpec] = []
    num_workers: int = Field(2, ge=0)
    image_size: int = Field(256, gt=0)
    window: Optional[str] = None
    strict: bool = False


class TrainSection(Section):
    """Optimisation: length, batch, AdamW, schedule, precision, losses and failure handling."""

    steps: Optional[int] = Field(None, gt=0)
    epochs: Optional[float] = Field(None, gt=0)
    batch_size: int = Field(256, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    decay_embeddings: bool = False
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    # under bf16 training TiTok runs in bf16 too (~97% of its codes equal fp32's, README); true keeps it in fp32
    titok_fp32: bool = False
    grad_clip: Optional[float] = Field(1.0, gt=0)
    seed: int = 0
    mlm_probability: float = Field(0.1, ge=0, lt=1)
    mmm_weight: float = Field(0.25, ge=0)
    max_logit_scale: float = Field(100.0, gt=1)
    max_bad_steps: int = Field(5, gt=0)
    log_every: int = Field(10, gt=0)
    image_codes: Literal["pixels", "pixel_views", "cache"] = "pixels"  # see train/image_codes.py
    code_views: int = Field(8, gt=0)      # K augmented views per image for pixel_views/cache
    code_cache: Optional[str] = None      # cache directory (default ~/.cache/fuselip-med/image-codes)
    compile: bool = False                 # torch.compile the transformer
    grad_checkpointing: bool = False      # recompute activations in the backward pass (less memory)
    # minutes a process waits in a collective (barrier, all-reduce) before the job fails; NCCL's default of 10
    # is shorter than rank 0 merging a large code cache or writing a checkpoint (torch.distributed timeout)
    dist_timeout_min: float = Field(60.0, gt=0)
    # minutes the main process waits for another training's code cache build (train.code_cache shared) before
    # it stops with one line naming that build; the other processes wait at a barrier meanwhile, so it must be
    # shorter than dist_timeout_min
    code_cache_wait_min: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _length_given(self) -> "TrainSection":
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of train.steps or train.epochs")
        return self

    @model_validator(mode="after")
    def _cache_wait_within_timeout(self) -> "TrainSection":
        if self.code_cache_wait_min >= self.dist_timeout_min:
            raise ValueError(f"train.code_cache_wait_min ({self.code_cache_wait_min:g}) must be shorter than "
                             f"train.dist_timeout_min ({self.dist_timeout_min:g}): the other processes wait at a "
                             "barrier while the main one waits for the code cache")
        return self


class EvalSection(Section):
    """Periodic and final evaluation."""

    every_steps: Optional[int] = Field(None, gt=0)
    at_start: bool = True
    at_end: bool = True
    tasks: list[str] = ["rocov2-retrieval"]
    pool_size: int = Field(1000, gt=1)
    n_pools: int = Field(5, gt=0)
    batch_size: int = Field(64, gt=0)

    @model_validator(mode="after")
    def _known_tasks(self) -> "EvalSection":
        from fuselip_med.eval.tasks import TASKS

        if not self.tasks:  # the trainer would fail only when it first evaluates, perhaps after the last step
            raise ValueError("eval.tasks is empty: name at least one task, or remove data.eval to train without "
                             "evaluation")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"eval.tasks {unknown} are not evaluation tasks (known: {', '.join(TASKS)})")
        return self


class CheckpointSection(Section):
    """Training checkpoints: cadence and how many to keep."""

    every_steps: Optional[int] = Field(None, gt=0)
    keep_last: int = Field(3, gt=0)


class LoggingSection(Section):
    """Trackers (a JSONL metrics file is always written) and where logs go."""

    dir: Optional[str] = None
    trackers: list[Literal["jsonl", "tensorboard", "wandb"]] = ["jsonl"]
    wandb_project: str = "fuselip-med"
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    progress: bool = True


class OutputSection(Section):
    """Where the run directory goes."""

    dir: str = "runs/{name}"


class Recipe(Section):
    """A complete run description; ``load_recipe`` builds and validates it."""

    name: str
    description: str = ""
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection
    eval: EvalSection = EvalSection()
    checkpoint: CheckpointSection = CheckpointSection()
    logging: LoggingSection = LoggingSection()
    output: OutputSection = OutputSection()

    @model_validator(mode="after")
    def _eval_data_has_task_roles(self) -> "Recipe":
        from fuselip_med.eval.tasks import get_task, missing_roles
        from fuselip_med.eval.tasks.context import resolve_data

        if not self.data.eval:  # the trainer evaluates only when data.eval is given
            return self
        keys = [spec.id or f"{spec.name}_{spec.split}" for spec in self.data.eval]
        try:  # the rules the evaluation applies at run time: a role, an adapter name, or ROLE:ADAPTER
            roles = set(resolve_data(dict.fromkeys(keys)))
        except ValueError as error:
            raise ValueError(f"data.eval id: {error}") from None
        for task in self.eval.tasks:
            missing = missing_roles(get_task(task), roles)
            if missing:
                raise ValueError(f"eval.tasks {task!r} needs data role(s) {', '.join(missing)}: add a data.eval "
                                 f"entry with that id (ids given: {sorted(roles) or 'none'})")
        return self

    @model_validator(mode="after")
    def _root_applies_to_some_path(self) -> "Recipe":
        """A warning (not an error: the Docker entrypoint sets data.root for any recipe) when data.root is set
        and every data path is built in, so the root is silently unused."""
        paths = [spec.path for spec in (*self.data.train, *self.data.eval) if spec.path is not None]
        if self.data.root is not None and paths and all(str(p).startswith("builtin:") for p in paths):
            logging.getLogger(__name__).warning(
                "data.root %r has no effect: this recipe's data are built in (%s); point data.train/data.eval paths "
                "at your data to use it (e.g. the rocov2 recipe with data.root)", self.data.root,
                ", ".join(sorted(set(map(str, paths)))))
        return self

    @model_validator(mode="after")
    def _tasks_have_bases(self) -> "Recipe":
        labels = {spec.id or spec.name for spec in self.data.train}
        for task in self.data.tasks:
            missing = sorted(set(task.bases or []) - labels)
            if missing:
                raise ValueError(f"data.tasks '{task.name}' has bases {missing}, "
                                 f"which are not in data.train ({sorted(labels)})")
        return self

    def run_dir(self) -> Path:
        return Path(self.output.dir.format(name=self.name))

    def log_dir(self) -> Path:
        return Path(self.logging.dir.format(name=self.name)) if self.logging.dir else self.run_dir()

    def resolve_path(self, path: str | None) -> str | None:
        """A relative dataset path joined onto ``data.root``; a hub id (owner/name, not a local path) stays."""
        if path is None or self.data.root is None:
            return path
        candidate = Path(path).expanduser()
        if candidate.is_absolute():
            return path
        joined = Path(self.data.root).expanduser() / candidate
        looks_like_hub_id = (
            re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None and not candidate.suffix and not candidate.exists()
        )
        return path if looks_like_hub_id and not joined.exists() else str(joined)


def shipped_recipes() -> dict[str, Path]:
    """Recipe names shipped with the package -> their files."""
    found: dict[str, Path] = {}
    for directory in RECIPE_DIRS:
        if directory.is_dir():
            for file in sorted(directory.glob("*.yaml")):
                found.setdefault(file.stem, file)
    return found


def find_recipe(name_or_path: str) -> Path:
    """``rocov2`` finds the shipped ``recipes/rocov2.yaml``; anything with a suffix or slash is a path."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"Recipe file {path} does not exist.")
        return path
    shipped = shipped_recipes()
    if name_or_path not in shipped:
        raise RecipeError(f"No recipe named {name_or_path!r}; shipped recipes: {', '.join(sorted(shipped)) or 'none'}.")
    return shipped[name_or_path]


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """``train.lr=3e-4`` -> (["train", "lr"], 0.0003); the value is read as YAML."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected key=value, e.g. --set train.lr=3e-4.")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"--set {assignment!r}: empty key.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set nested keys in the raw recipe dict; list items are addressed by index (data.train.0.path=...)."""
    for assignment in overrides:
        parts, value = parse_override(assignment)
        node: Any = data
        for position, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                index = _list_index(part, node, parts, position)
                node = node[index]
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise RecipeError(f"--set {assignment!r}: {'.'.join(parts[:position + 1])} is not a section.")
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(last, node, parts, len(parts) - 1)] = value
        else:
            node[last] = value
    return data


def _list_index(part: str, node: list, parts: list[str], position: int) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"--set {'.'.join(parts)}: {part!r} is not an index of a list with {len(node)} items.")
    return int(part)


def _format_error(source: str, error: ValidationError) -> str:
    messages = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            messages.append(f"unknown key '{key}'")
        elif item["type"] == "missing":
            messages.append(f"missing key '{key}'")
        elif not item["loc"]:  # a check across sections: its message names the keys; the input is the recipe
            messages.append(str(item["msg"]).removeprefix("Value error, "))
        else:
            messages.append(f"'{key}': {item['msg']} (got {item.get('input')!r})")
    return f"{source}: " + "; ".join(messages)


def recipe_from_dict(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate a raw dict into a Recipe, turning pydantic errors into one line naming keys and file."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(_format_error(source, error)) from None


def load_recipe(name_or_path: str, overrides: list[str] | None = None, size: str | None = None) -> Recipe:
    """Find, read, override and validate a recipe. ``size`` is the ``--size`` shortcut for ``model.size``.

    A recipe may use ``{size}`` in string values (e.g. an init checkpoint per size); it is filled in here.
    """
    path = find_recipe(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML ({error}).") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections (model, data, train, ...).")
    if size is not None:
        data.setdefault("model", {})["size"] = size
    data = apply_overrides(data, list(overrides or []))
    _keep_one_length(data, list(overrides or []))
    chosen = (data.get("model") or {}).get("size", "small")
    data = _fill_size(data, str(chosen))
    return recipe_from_dict(data, str(path))


# Keys of which a recipe gives exactly one: an override that sets one of them replaces the other.
EXCLUSIVE_KEYS = (("train", "steps", "epochs"),)


def _keep_one_length(data: dict[str, Any], overrides: list[str]) -> None:
    """``--set train.steps=N`` on a recipe with ``train.epochs`` drops the epochs (and the reverse).

    Only when the override gives a value and does not also set the other key; the recipe file is unchanged.
    """
    overridden = dict((tuple(parts), value) for parts, value in map(parse_override, overrides))
    for section, first, second in EXCLUSIVE_KEYS:
        node = data.get(section)
        if not isinstance(node, dict):
            continue
        for given, other in ((first, second), (second, first)):
            if overridden.get((section, given)) is not None and (section, other) not in overridden:
                node.pop(other, None)


def _fill_size(node: Any, size: str) -> Any:
    if isinstance(node, dict):
        return {k: _fill_size(v, size) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill_size(v, size) for v in node]
    if isinstance(node, str) and "{size" in node:
        return node.replace("{size}", size).replace("{size_letter}", size[0].upper())
    return node


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (stored in checkpoints and model cards)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
