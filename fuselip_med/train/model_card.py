"""The model card (``README.md``) next to a trained model: Hub metadata and a human summary of the run.

Built with ``huggingface_hub.ModelCard``/``ModelCardData`` (``core.hub.model_card``): license, base_model (when
the init is a hub id), datasets (those given as hub ids), tags, and a model-index of the final evaluation;
the body lists the data, the before/after metrics and the recipe.
"""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult

from fuselip_med.core.hub import CARD_NAME, is_hub_id, model_card
from fuselip_med.io import atomic_write_text
from fuselip_med.recipes import Recipe, recipe_to_yaml

TASK_TYPES = {"modality": "zero-shot-image-classification", "concepts": "zero-shot-image-classification"}
DEFAULT_TASK_TYPE = "image-feature-extraction"
CARD_LICENSE = "other"  # the weights inherit the base model's and the training data's terms, named in the card


def eval_results(metrics: dict[str, float], dataset: str) -> list[EvalResult]:
    """Model-index entries for flat ``{"eval/<task>/<metric>": value}`` metrics, all on ``dataset``."""
    results = []
    for key, value in sorted(metrics.items()):
        _, task, metric = key.split("/", 2) if key.count("/") >= 2 else ("", key, "value")
        task_type = next((t for word, t in TASK_TYPES.items() if word in task), DEFAULT_TASK_TYPE)
        results.append(EvalResult(task_type=task_type, task_name=task, dataset_type=dataset, dataset_name=dataset,
                                  metric_type=metric, metric_name=metric, metric_value=float(value)))
    return results


def write_model_card(directory: Path, recipe: Recipe, init: str | None, steps: int,
                     before: dict[str, float], after: dict[str, float]) -> Path:
    """Write ``README.md`` into ``directory`` describing how the model was made and how it scored."""
    data_refs = [spec.path if is_hub_id(spec.path) else spec.name for spec in recipe.data.train]
    eval_refs = [spec.path if is_hub_id(spec.path) else spec.name for spec in recipe.data.eval]
    data_lines = [f"- `{spec.name}` ({spec.split}): `{spec.path}`, weight {spec.weight:g}"
                  for spec in recipe.data.train]
    data_lines += [f"- task `{task.name}`, weight {task.weight:g}" for task in recipe.data.tasks]
    nan = float("nan")
    rows = [f"| {key.removeprefix('eval/')} | {before.get(key, nan):.4f} | {after.get(key, nan):.4f} |"
            for key in sorted(set(before) | set(after))]
    lora = recipe.model.lora.enabled
    kind = f"LoRA adapter (rank {recipe.model.lora.r})" if lora else "full model"
    model_class = "FuseLIP" if recipe.model.arch == "fuselip" else "LateFusion"
    load = ("`fuselip-med merge-lora`, `fuselip_med.load_model(path)` or PEFT's "
            f"`PeftModel.from_pretrained({model_class}.from_pretrained(base), path)`" if lora
            else f"`{model_class}.from_pretrained(path)` or `fuselip_med.load_model(path)`")
    architecture = {"fuselip": "FuseLIP", "siglip_sf": "SigLIP-SF (late-fusion baseline)",
                    "siglip_mlf": "SigLIP-MLF (late-fusion baseline)"}[recipe.model.arch]
    card = model_card(
        title=recipe.name,
        summary=(f"{architecture} ({recipe.model.size}) trained with fuselip_med: {kind}, initialised from "
                 f"`{init or 'scratch'}`, {steps} optimizer steps. {recipe.description}").strip()
                + f"\n\nLoad it with {load}. The weights inherit the terms of the base model and the training data.",
        sections=[
            "\n".join(["## Training data", *data_lines]),
            "\n".join(["## Evaluation (before -> after training)", "| metric | before | after |", "|---|---|---|",
                       *(rows or ["| (no evaluation data in the recipe) | | |"])]),
            "\n".join(["## Recipe", "```yaml", recipe_to_yaml(recipe).rstrip(), "```"]),
        ],
        base_model=init if is_hub_id(init) else None,
        datasets=sorted({ref for ref in data_refs + eval_refs if is_hub_id(ref)}),
        eval_results=eval_results(after, eval_refs[0] if eval_refs else "evaluation"),
        tags=["lora", "peft"] if lora else [],
        license=CARD_LICENSE,
    )
    return atomic_write_text(Path(directory) / CARD_NAME, card.content)
