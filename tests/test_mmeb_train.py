"""The ``mmeb`` training adapter reads MMEB-train's published layout; ``finetune --recipe mmeb`` trains on it."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fuselip_med.data.adapters import DatasetNotFoundError, get_adapter
from fuselip_med.recipes import load_recipe
from fuselip_med.train.trainer import Trainer
from tests.planted import solid_image


def write_mmeb_train(root, n=6):
    for subset in ("ImageNet_1K", "VisDial"):
        (root / subset).mkdir(parents=True)
        (root / "images" / subset / "Train").mkdir(parents=True)
        for k in range(n):
            solid_image(root / "images" / subset / "Train" / f"image_{k}.jpg", (20 * k, 40, 80))
    pq.write_table(pa.table({
        "qry": ["<|image_1|>\nRepresent the given image for classification\n"] * n,
        "qry_image_path": [f"images/ImageNet_1K/Train/image_{k}.jpg" for k in range(n)],
        "pos_text": [f"class {k}, another name" for k in range(n)],
        "pos_image_path": [""] * n,
        "neg_text": [""] * n, "neg_image_path": [""] * n,
    }), root / "ImageNet_1K" / "original-00000-of-00001.parquet")
    pq.write_table(pa.table({
        "qry": [f"Represent the given dialogue about an image, which is used for image retrieval: Q: what? A: {k}"
                for k in range(n)],
        "qry_image_path": [""] * n,
        "pos_text": ["<|image_1|>\nRepresent the given image.\n"] * n,
        "pos_image_path": [f"images/VisDial/Train/image_{k}.jpg" for k in range(n)],
        "neg_text": [""] * n, "neg_image_path": [""] * n,
    }), root / "VisDial" / "original-00000-of-00001.parquet")
    return root


def test_adapter_cleans_texts_like_the_reference(tmp_path):
    root = write_mmeb_train(tmp_path / "MMEB-train")
    source = get_adapter("mmeb")(str(root), split="original", subsets=["ImageNet_1K", "VisDial"], per_subset=4)
    assert len(source) == 8
    first, dialogue = source[0], source[4]
    assert first.query.text == "" and first.query.image.endswith("images/ImageNet_1K/Train/image_0.jpg")
    assert first.target.text == "a photo of a class 0" and first.target.image is None
    assert dialogue.query.text == "Q: what? A: 0" and dialogue.query.image is None
    assert dialogue.target.text == "" and dialogue.target.image.endswith("VisDial/Train/image_0.jpg")
    with pytest.raises(DatasetNotFoundError, match="OK-VQA"):
        get_adapter("mmeb")(str(root))  # the default 20 subsets are not all there


def test_finetune_recipe_mmeb_trains(tmp_path):
    root = write_mmeb_train(tmp_path / "MMEB-train")
    recipe = load_recipe("mmeb", [
        f"data.root={root}", "data.train.0.options.subsets=[ImageNet_1K, VisDial]", "model.size=tiny",
        "model.init=null", "train.epochs=null", "train.steps=2", "train.batch_size=4", "train.warmup_steps=1",
        "train.precision=fp32", "data.num_workers=0", "checkpoint.every_steps=null", "logging.trackers=[jsonl]",
        "logging.progress=false", f"output.dir={tmp_path / 'run'}"])
    result = Trainer(recipe).run()
    assert result.steps == 2 and (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_numeric_text_column_is_one_user_error(tmp_path):
    from fuselip_med.data.adapters import DatasetEmptyError

    root = write_mmeb_train(tmp_path / "MMEB-train")
    file = root / "VisDial" / "original-00000-of-00001.parquet"
    table = pq.read_table(file)
    pq.write_table(table.set_column(0, "qry", pa.array(range(len(table)))), file)
    with pytest.raises(DatasetEmptyError, match="qry is int64, expected string"):
        get_adapter("mmeb")(str(root), split="original", subsets=["VisDial"])


@pytest.mark.parametrize("written", ["/etc/passwd", "../../etc/passwd", "images/../../secret.jpg", "~/x.jpg",
                                     "C:\\Windows\\x.jpg"])
def test_image_path_leaving_the_image_root_is_skipped(tmp_path, written):
    root = write_mmeb_train(tmp_path / "MMEB-train", n=2)
    file = root / "ImageNet_1K" / "original-00000-of-00001.parquet"
    table = pq.read_table(file)
    pq.write_table(table.set_column(1, "qry_image_path", pa.array([written, "images/ImageNet_1K/Train/image_1.jpg"])),
                   file)
    source = get_adapter("mmeb")(str(root), split="original", subsets=["ImageNet_1K"])
    assert len(source) == 1 and source[0].query.image.endswith("image_1.jpg")
    assert dict(source.skipped) == {"outside image root": 1}


def test_damaged_parquet_file_is_one_user_error(tmp_path):
    from fuselip_med.data.adapters import DatasetEmptyError

    root = write_mmeb_train(tmp_path / "MMEB-train", n=2)
    file = root / "VisDial" / "original-00000-of-00001.parquet"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(DatasetEmptyError, match="original-00000-of-00001.parquet is not a readable parquet file"):
        get_adapter("mmeb")(str(root), split="original", subsets=["ImageNet_1K", "VisDial"])
