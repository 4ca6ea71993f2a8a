"""The training step's fast paths (issue 25, fault 5): TF32 for float32 work on CUDA, sequences padded to a
multiple of 8 (exactly), DataLoader workers that persist across epochs."""
import importlib.util
from pathlib import Path

import pytest
import torch

from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.losses import MaskingConfig
from fuselip_med.data.demo import write_demo_dataset
from fuselip_med.recipes import recipe_from_dict
from fuselip_med.train.objective import EarlyFusionObjective
from fuselip_med.vocab import EOT_TOKEN_ID
from tests.test_trainer import recipe_dict

REPO = Path(__file__).resolve().parents[1]


def bench_train():
    """benchmarks/bench_train.py as a module (its batch builder)."""
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_turns_tf32_on(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    from fuselip_med.train.trainer import Trainer

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    AcceleratorState._reset_state(True)
    Trainer(recipe_from_dict(recipe_dict(tmp_path / "run", tmp_path / "data")))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_sequences_are_padded_to_a_multiple_of_8_without_changing_the_embeddings():
    torch.manual_seed(0)
    make_batch = bench_train().make_batch
    model = FuseLIP(FuseLIPConfig.from_size("tiny")).eval()
    objective = EarlyFusionObjective(model, MaskingConfig.for_model(model.config))
    for shape in ("paired", "caption"):
        inputs = objective.prepare(make_batch(model, 4, "cached", shape), 0)
        for side in (inputs.query, inputs.target):
            length = side.ids.shape[1]
            assert length % 8 == 0 or length == model.config.context_length
            eot = int((side.ids == EOT_TOKEN_ID).int().argmax(1).max()) + 1  # the length before padding
            with torch.no_grad():
                padded = model.encode_ids(side.ids).embeddings
                cut = model.encode_ids(side.ids[:, :eot]).embeddings
            assert torch.allclose(padded, cut, atol=1e-5)


def test_train_loader_workers_persist_across_epochs(tmp_path):
    from fuselip_med.core.text_tokenizer import TextTokenizer
    from fuselip_med.train.data import build_train_data

    data_dir = write_demo_dataset(tmp_path / "rocov2", n_train=16, n_valid=0, n_test=0, n_dicom=0)
    recipe = recipe_from_dict(recipe_dict(tmp_path / "run", data_dir, data={"num_workers": 1}))
    data = build_train_data(recipe, TextTokenizer())
    assert data.loader.persistent_workers
    first = [batch.query.pixels.clone() for batch in data.loader]
    data.set_epoch(1)
    second = [batch.query.pixels.clone() for batch in data.loader]
    assert len(first) == len(second) == 2 and not torch.equal(first[0], second[0])


def mixed_batch(model):
    """4 image+caption pairs: query rows 0 and 2 as cached codes, 1 and 3 as pixels; target row 1 text only."""
    from dataclasses import replace

    batch = bench_train().make_batch(model, 4, "pixels", "paired")
    query, target = batch.query, batch.target
    cached = torch.tensor([True, False, True, False])
    with torch.no_grad():
        codes = model.image_codes(query.pixels[cached])
    query = replace(query, image_ids=codes, pixels=query.pixels[~cached], has_codes=cached)
    has_image = torch.tensor([True, False, True, True])
    target = replace(target, has_image=has_image, pixels=target.pixels[has_image])
    return replace(batch, query=query, target=target)


def host_path(objective, batch, step):
    """The step's inputs as the host-only path built them before (issue 25): every code on the host, ids and
    masks from the finished ids (``mask_tokens``), masked positions by ``nonzero``."""
    from fuselip_med.core.losses import IGNORE_INDEX, mask_seed, mask_tokens
    from fuselip_med.data.schema import SIDES
    from fuselip_med.train.objective import PAD_MULTIPLE, SideInputs, StepInputs, pad_to_multiple

    model, sides = objective.base_model, []
    for number, side in enumerate(SIDES):
        rows = batch.side(side)
        codes = torch.empty(int(rows.has_image.sum()), 128, dtype=torch.long)
        from_cache = rows.has_codes[rows.has_image]
        if rows.image_ids is not None:
            codes[from_cache] = rows.image_ids
        if rows.pixels is not None:
            codes[~from_cache] = model.image_codes(rows.pixels).cpu()
        ids = model.build_input_ids(rows.text_ids, codes, rows.has_image, torch.ones_like(rows.has_image),
                                    device="cpu")
        ids = pad_to_multiple(ids, PAD_MULTIPLE, model.config.context_length)
        generator = torch.Generator().manual_seed(mask_seed(objective.seed, step, number))
        ids, labels = mask_tokens(ids, objective.masking, generator, global_rows=len(batch),
                                  context_length=model.config.context_length)
        masked_at = (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)
        sides.append(SideInputs(ids, masked_at, labels.flatten()[masked_at]))
    counts = torch.tensor([side.masked_at.numel() for side in sides])
    return StepInputs(sides[0], sides[1], counts, [len(batch)], step)


def test_codes_written_where_they_are_equal_the_host_path_bit_for_bit(monkeypatch):
    """Masks, ids and losses of the step that writes TiTok codes in where they are (issue 25, fault 5) equal the
    old host path for fixed seeds. Image code 0 is never masked and known only from the codes: drawn positions
    holding it stay in the gathered list with the ignore label, so the ids, masks and labels stay bit-equal and
    the MMM sum (more zero terms, another summation order) equal to float32 rounding."""
    from dataclasses import replace

    from fuselip_med.core.losses import IGNORE_INDEX

    torch.manual_seed(0)
    model = FuseLIP(FuseLIPConfig.from_size("tiny")).eval()
    objective = EarlyFusionObjective(model, MaskingConfig.for_model(model.config, probability=0.3), seed=3)
    batch = mixed_batch(model)
    titok = model.image_codes
    without_zero = replace(batch.query, image_ids=batch.query.image_ids.clamp(min=1))
    all_zero = replace(batch.query, image_ids=torch.zeros_like(batch.query.image_ids))
    for case, code_zero in ((replace(batch, query=without_zero), False), (replace(batch, query=all_zero), True)):
        monkeypatch.setattr(model, "image_codes", lambda pixels: titok(pixels) if code_zero else
                            titok(pixels).clamp(min=1))
        for step in (0, 5):
            with torch.no_grad():
                new, old = objective.prepare(case, step), host_path(objective, case, step)
            assert torch.equal(new.masked, old.masked)
            drawn = 0
            for mine, theirs in ((new.query, old.query), (new.target, old.target)):
                assert torch.equal(mine.ids, theirs.ids)
                kept = mine.labels != IGNORE_INDEX
                assert torch.equal(mine.masked_at[kept], theirs.masked_at)
                assert torch.equal(mine.labels[kept], theirs.labels)
                drawn += mine.masked_at.numel()
            assert (drawn > int(new.masked.sum())) == code_zero  # code-0 positions were drawn, not masked
            with torch.no_grad():
                losses, reference = objective(new), objective(old)
            assert torch.equal(losses.contrastive, reference.contrastive)
            for name in ("total", "mmm"):
                if code_zero:
                    torch.testing.assert_close(getattr(losses, name), getattr(reference, name), rtol=1e-6, atol=0)
                else:
                    assert torch.equal(getattr(losses, name), getattr(reference, name)), (name, step)


def test_codes_from_titok_never_come_to_the_host(monkeypatch):
    """Codes TiTok leaves on the device stay there: ``prepare`` with the codes on the ``meta`` device (no data:
    a ``.cpu()``, ``.tolist()``, ``.item()`` or a shape that depends on their values raises) gives ids there."""
    torch.manual_seed(0)
    model = FuseLIP(FuseLIPConfig.from_size("tiny")).eval()
    objective = EarlyFusionObjective(model, MaskingConfig.for_model(model.config, probability=0.3))
    monkeypatch.setattr(model, "image_codes", lambda pixels: torch.empty(pixels.shape[0], 128, dtype=torch.long,
                                                                         device="meta"))
    inputs = objective.prepare(mixed_batch(model), 0)
    assert {inputs.query.ids.device.type, inputs.target.ids.device.type, inputs.masked.device.type} == {"meta"}
    assert inputs.to("meta").query.ids.device.type == "meta"


@pytest.mark.parametrize("titok_fp32", [False, True])
def test_titok_runs_in_bf16_under_bf16_training_unless_titok_fp32(tmp_path, titok_fp32):
    from fuselip_med.train.trainer import Trainer

    data_dir = write_demo_dataset(tmp_path / "rocov2", n_train=8, n_valid=0, n_test=0, n_dicom=0)
    recipe = recipe_dict(tmp_path / "run", data_dir, data={"eval": []},
                         train={"steps": 1, "batch_size": 4, "precision": "bf16", "titok_fp32": titok_fp32},
                         checkpoint={"every_steps": None})
    trainer = Trainer(recipe_from_dict(recipe))
    trainer.setup()
    tokenizer = trainer.base_model.image_tokenizer
    encode, autocast = tokenizer.encode, []
    tokenizer.encode = lambda pixels: autocast.append(torch.is_autocast_enabled("cpu")) or encode(pixels)
    trainer.iterator = iter(trainer.data.loader)
    with trainer.out.progress() as trainer.bar:
        trainer.bar_task = trainer.bar.add_task("train", total=1, loss=0.0, lr=0.0, rate=0.0)
        trainer.train_step()
    assert autocast and set(autocast) == {not titok_fp32}


def test_ids_cut_from_wider_rows_get_their_codes_and_masks():
    """``build_input_ids`` cuts its context-length rows to the longest one: a non-contiguous view when no
    padding follows (the length already a multiple of 8); codes and masks are written into it all the same."""
    torch.manual_seed(0)
    model = FuseLIP(FuseLIPConfig.from_size("tiny")).eval()
    objective = EarlyFusionObjective(model, MaskingConfig.for_model(model.config, probability=0.5))
    wide = torch.full((2, 200), 7, dtype=torch.long)
    cut = wide[:, :136]
    has_image, codes = torch.tensor([True, False]), torch.arange(128)[None] % 5
    candidates = torch.rand(2, 136, generator=torch.Generator().manual_seed(1)) < 0.5
    got, count = objective.fill_codes(cut, has_image, codes, candidates, torch.device("cpu"))
    expected, expected_count = objective.fill_codes(cut.contiguous(), has_image, codes, candidates,
                                                    torch.device("cpu"))
    assert not cut.is_contiguous() and torch.equal(got.ids, expected.ids) and torch.equal(count, expected_count)
    assert int((got.ids == model.config.mask_token_id).sum()) == int(count) > 0
