"""A short README.md model card next to a saved model: recipe, data, training length and metrics."""
from __future__ import annotations

from pathlib import Path

from fuselip_med.eval.report import atomic_write_text
from fuselip_med.recipes import Recipe, recipe_to_yaml


def write_model_card(directory: Path, recipe: Recipe, init: str | None, steps: int,
                     before: dict[str, float], after: dict[str, float]) -> Path:
    """Write ``README.md`` into ``directory`` describing how the model was made and how it scored."""
    data_lines = [f"- `{spec.name}` ({spec.split}): `{spec.path}`, weight {spec.weight:g}"
                  for spec in recipe.data.train]
    data_lines += [f"- task `{task.name}`, weight {task.weight:g}" for task in recipe.data.tasks]
    nan = float("nan")
    rows = [f"| {key.removeprefix('eval/')} | {before.get(key, nan):.4f} | {after.get(key, nan):.4f} |"
            for key in sorted(set(before) | set(after))]
    kind = "LoRA adapter" if recipe.model.lora.enabled else "full model"
    text = "\n".join([
        f"# {recipe.name}",
        "",
        f"FuseLIP ({recipe.model.size}) fine-tuned with fuselip_med: {kind}, initialised from `{init or 'scratch'}`, "
        f"{steps} optimizer steps. {recipe.description}".rstrip(),
        "",
        "Load it with `fuselip_med.load_model(path)` (LoRA adapters: `fuselip-med merge-lora` or "
        "`fuselip_med.train.lora.load_for_inference`).",
        "",
        "## Training data",
        *data_lines,
        "",
        "## Evaluation (before -> after training)",
        "| metric | before | after |",
        "|---|---|---|",
        *(rows or ["| (no evaluation data in the recipe) | | |"]),
        "",
        "## Recipe",
        "```yaml",
        recipe_to_yaml(recipe).rstrip(),
        "```",
        "",
    ])
    return atomic_write_text(Path(directory) / "README.md", text)
