"""The shared embedding pass: each unique input once, homogeneous batches, decode errors skipped."""
import numpy as np
import pytest
import torch
from PIL import Image

from fuselip_med.inference.engine import Embedder, embed_items
from fuselip_med.inference.items import EmbedItem, image_key
from fuselip_med.inference.table import EmbeddingTable
from tests.test_eval_fakes import HashModel


def identity_decode(x):
    return x


def _img(seed, size=4):
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))


def test_keys_identify_inputs():
    a, b = _img(0), _img(1)
    assert image_key(a) == image_key(a.clone()) != image_key(b)
    assert image_key("x/y.png") == "path:x/y.png"
    assert image_key(b"abc") == image_key(b"abc") != image_key(b"abd")
    pil = Image.new("RGB", (4, 4), (1, 2, 3))
    assert image_key(pil) == image_key(pil.copy()) != image_key(Image.new("RGB", (4, 4), (1, 2, 4)))
    assert image_key(np.zeros((2, 2))) != image_key(np.zeros((2, 2), dtype=np.float32))
    assert EmbedItem(text="t").key == ("text", "t")
    assert EmbedItem(image=a).key == ("image", image_key(a))
    assert EmbedItem(image=a, text="").key == ("pair", image_key(a), "")  # "" + image is still fused
    assert EmbedItem(image=a, image_key="id7").key == ("image", "id7")
    with pytest.raises(ValueError):
        EmbedItem()
    with pytest.raises(TypeError):
        image_key(object())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_unique_input_embedded_once_in_homogeneous_batches(num_workers):
    model = HashModel()
    imgs = [_img(i) for i in range(5)]
    items = ([EmbedItem(text=t) for t in ["a", "b", "a", "c", "b"]]
             + [EmbedItem(image=imgs[i % 3]) for i in range(7)]
             + [EmbedItem(image=imgs[i % 2], text=t) for i in range(2) for t in ["x", "x", "y"]])
    table = embed_items(model, items, batch_size=2, num_workers=num_workers, decode=identity_decode,
                        progress=False)
    assert len(table) == 3 + 3 + 4
    assert set(model.seen.values()) == {1}
    assert all(n <= 2 for _, n in model.calls)
    # lookup returns the model's own vectors, in item order, repeated keys repeated
    emb = table.lookup(it.key for it in items)
    assert emb.shape == (len(items), 16) and emb.dtype == torch.float32
    assert torch.allclose(emb[0], model.row_vector(None, "a")) and torch.equal(emb[0], emb[2])
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(items)))


def test_embedder_remembers_across_calls():
    model = HashModel()
    emb = Embedder(model, batch_size=4, decode=identity_decode, progress=False)
    emb.embed([EmbedItem(text="a"), EmbedItem(image=_img(0))])
    out = emb.embeddings([EmbedItem(text="a"), EmbedItem(text="b"), EmbedItem(image=_img(0))])
    assert out.shape == (3, 16)
    assert set(model.seen.values()) == {1} and len(model.seen) == 3
    assert len(emb.fresh().table) == 0 and len(emb.table) == 3


def test_decode_errors_are_skipped_and_recorded(tmp_path):
    pytest.importorskip("fuselip_med.data.images")
    good = tmp_path / "good.png"
    Image.new("RGB", (20, 10), (200, 10, 10)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    missing = tmp_path / "missing.png"
    model = HashModel()
    items = [EmbedItem(image=good), EmbedItem(image=bad), EmbedItem(image=missing, text="t")]
    table = embed_items(model, items, progress=False)  # default decoder: data.images.decode_image
    assert items[0].key in table and items[1].key not in table and items[2].key not in table
    assert set(table.failed) == {items[1].key, items[2].key}
    assert all(isinstance(v, str) and v for v in table.failed.values())
    with pytest.raises(KeyError, match="no embedding"):
        table.lookup([items[1].key])
    from fuselip_med.data.images import ImageDecodeError

    with pytest.raises(ImageDecodeError):
        embed_items(HashModel(), items, on_error="raise", progress=False)


def test_real_decoder_gives_model_sized_pixels(tmp_path):
    pytest.importorskip("fuselip_med.data.images")
    path = tmp_path / "x.png"
    Image.new("L", (30, 40), 128).save(path)
    seen = {}

    class Shape(HashModel):
        def encode(self, images=None, texts=None, **kw):
            seen["shape"] = tuple(images.shape)
            return super().encode(images=images, texts=texts, **kw)

    embed_items(Shape(), [EmbedItem(image=path)], progress=False)
    assert seen["shape"] == (1, 3, 256, 256)


def test_image_codes_pass_through():
    model = HashModel()
    codes = {"img1": torch.arange(128)}
    items = [EmbedItem(image=_img(0), image_key="img1"), EmbedItem(image=_img(0), image_key="img1", text="q")]
    table = embed_items(model, items, decode=identity_decode, image_codes=codes, progress=False)
    assert len(table) == 2
    assert {k[0] for k in model.seen} == {"ids:" + ",".join(map(str, range(128)))}


def test_table_merge_and_validation():
    t1 = EmbeddingTable(["a", "b"], torch.eye(2))
    t2 = EmbeddingTable(["b", "c"], torch.ones(2, 2), failed={"d": "corrupt"})
    m = t1.extended(t2)
    assert m.keys == ["a", "b", "c"] and torch.equal(m["b"], torch.tensor([0.0, 1.0]))
    assert m.failed == {"d": "corrupt"} and "c" in m and "d" not in m
    with pytest.raises(ValueError):
        EmbeddingTable(["a", "a"], torch.eye(2))
    with pytest.raises(ValueError):
        EmbeddingTable(["a"], torch.eye(2))


def test_model_mode_restored():
    model = HashModel()
    model.train()
    embed_items(model, [EmbedItem(text="a")], progress=False)
    assert model.training


def test_with_the_real_fuselip_encode_contract():
    from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig

    torch.manual_seed(0)
    model = FuseLIP(FuseLIPConfig.from_size("tiny")).eval()
    px = [torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    items = [EmbedItem(text="a chest x-ray"), EmbedItem(image=px[0]), EmbedItem(image=px[1], text="rotate 90"),
             EmbedItem(image=px[2], text="")]
    table = embed_items(model, items, batch_size=2, decode=identity_decode, progress=False)
    with torch.no_grad():
        expected = torch.cat([model.encode(texts=["a chest x-ray"]), model.encode(images=px[0][None]),
                              model.encode(images=px[1][None], texts=["rotate 90"]),
                              model.encode(images=px[2][None], texts=[""])])
    assert torch.allclose(table.lookup(it.key for it in items), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------ one engine
def _png(path, rgb):
    Image.new("RGB", (24, 16), rgb).save(path)
    return path


def _captioned_folder(root):
    """Two PNGs and one file that is no PNG, each with a caption sidecar (the folder adapter's layout)."""
    root.mkdir()
    _png(root / "a.png", (200, 10, 10))
    _png(root / "b.png", (10, 200, 10))
    (root / "bad.png").write_bytes(b"not a png at all")
    for name in ("a.png", "b.png", "bad.png"):
        (root / f"{name}.txt").write_text(f"caption of {name}")
    return root


def test_an_undecodable_image_is_the_same_named_skip_in_embed_index_build_and_eval(tmp_path):
    """embed, index build and eval name the bad file by its id with the reason training's SampleDataset gives."""
    from fuselip_med.data.adapters import get_adapter
    from fuselip_med.data.dataset import SampleDataset
    from fuselip_med.data.skips import SkipReport
    from fuselip_med.embed import embed_rows, open_input, rows_from_source
    from fuselip_med.eval.tasks.context import EvalContext, EvalOptions
    from fuselip_med.search.index import build_index, list_entries
    from tests.search_helpers import PlantedEncoder

    folder = _captioned_folder(tmp_path / "data")
    source = get_adapter("folder")(str(folder), split="train")
    training = [SampleDataset(source)[i] for i in range(len(source))]
    expected = {item.id: item.reason for item in training if hasattr(item, "reason")}
    assert set(expected) == {"bad.png"} and expected["bad.png"]

    embed_skips = SkipReport()
    _, kept, _ = embed_rows(HashModel(), rows_from_source(open_input(folder, "image"), "image"), progress=False,
                            skips=embed_skips)
    index_report = build_index(tmp_path / "index", list_entries(folder)[0], PlantedEncoder(),
                               PlantedEncoder.model_id, progress=False)
    ctx = EvalContext({"test": folder}, Embedder(HashModel(), progress=False), EvalOptions())
    ctx.embed_image_caption("test")
    eval_skips = ctx.skip_report()

    for report in (embed_skips, index_report.skips, eval_skips):
        assert isinstance(report, SkipReport)
        assert [(e.id, e.reason) for e in report.entries] == [("bad.png", expected["bad.png"])]
    assert [r.id for r in kept] == ["a.png", "b.png"] and index_report.n_rows == 2
    assert index_report.skipped == {"bad.png": expected["bad.png"]}


def test_one_content_hash_image_keys_are_the_index_hashes(tmp_path):
    """No SHA-1 is left anywhere; ``content_hash`` has one definition; an image's key from its bytes is the
    content hash the search index stores for the file holding those bytes."""
    import hashlib
    import re
    from pathlib import Path

    import fuselip_med
    from fuselip_med.data.hashing import content_hash
    from fuselip_med.search.index import build_index, list_entries, open_index
    from tests.search_helpers import PlantedEncoder

    root = Path(fuselip_med.__file__).parent.parent
    sources = [p for folder in ("fuselip_med", "tests", "benchmarks", "data_tools")
               for p in (root / folder).rglob("*.py")]
    weak = [str(p) for p in sources if re.search(r"hashlib\.(sha1|new\(.sha1)", p.read_text(encoding="utf-8"))]
    assert weak == []
    definitions = [p for p in sources if re.search(r"^def content_hash\(", p.read_text(encoding="utf-8"), re.M)]
    assert [p.relative_to(root).as_posix() for p in definitions] == ["fuselip_med/data/hashing.py"]

    folder = tmp_path / "data"
    folder.mkdir()
    data = _png(folder / "a.png", (1, 2, 3)).read_bytes()
    build_index(tmp_path / "index", list_entries(folder)[0], PlantedEncoder(), PlantedEncoder.model_id,
                progress=False)
    stored = open_index(tmp_path / "index").meta["content_hash"].tolist()
    assert stored == [image_key(data)] == [content_hash(folder / "a.png")] == [content_hash(data)]
    # the digest indexes and code caches already on disk hold: SHA-256 of the file's bytes, so they still update
    assert stored == [hashlib.sha256(data).hexdigest()]
    assert EmbedItem(image=data).key == ("image", stored[0])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_default_decoding_gives_the_data_layers_pixels(tmp_path, num_workers):
    """Paths, bytes and PIL images decode to exactly ``decode_image``'s pixels, with or without workers."""
    from fuselip_med.data.images import decode_image
    from tests.test_eval_fakes import _pixels_key

    paths = [_png(tmp_path / f"{i}.png", (40 * i, 10, 200 - 40 * i)) for i in range(3)]
    inputs = [paths[0], paths[1].read_bytes(), Image.open(paths[2]).convert("RGB")]
    model = HashModel()
    table = embed_items(model, [EmbedItem(image=x) for x in inputs], batch_size=2, num_workers=num_workers,
                        progress=False)
    expected = torch.stack([model.row_vector(_pixels_key(decode_image(x)), None) for x in inputs])
    assert torch.allclose(table.lookup(EmbedItem(image=x).key for x in inputs), expected)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_on_error_raise_gives_the_decoders_error_naming_the_file(tmp_path, num_workers):
    from fuselip_med.data.images import ImageDecodeError

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ImageDecodeError, match="bad.png") as caught:
        embed_items(HashModel(), [EmbedItem(image=_png(tmp_path / "ok.png", (1, 2, 3))), EmbedItem(image=bad)],
                    num_workers=num_workers, on_error="raise", progress=False)
    assert caught.value.reason


def test_export_gate_reference_set_skips_through_the_engine(tmp_path):
    """The export gate's reference set is decoded by the same loop: the bad file is skipped with its reason."""
    from fuselip_med.data.dataset import SampleDataset
    from fuselip_med.export.gate import folder_reference

    folder = _captioned_folder(tmp_path / "data")
    reference = folder_reference(folder, image_size=32)
    assert reference.ids == ["a.png", "b.png"] and reference.pixels.shape == (2, 3, 32, 32)
    from fuselip_med.data.adapters import get_adapter

    source = get_adapter("folder")(str(folder), split="train")
    reason = next(item.reason for item in map(SampleDataset(source).__getitem__, range(len(source)))
                  if hasattr(item, "reason"))
    assert list(reference.skipped.values()) == [reason]
    assert [key[:5] for key in reference.skipped] == ["file-"]  # a salted key, never the file's path


def test_sample_dataset_decodes_the_sides_asked_for_with_an_evaluation_decoder():
    """The engine's use of the data layer: query side only, a custom decoder whose ImageDecodeError is a skip."""
    from fuselip_med.data.dataset import DecodedSample, SampleDataset, SkippedSample
    from fuselip_med.data.images import ImageDecodeError
    from fuselip_med.data.schema import Sample, SampleSide

    class Source:
        name = "one-sided"
        samples = [Sample(id="ok", source="one-sided", query=SampleSide(image=_img(0))),
                   Sample(id="bad", source="one-sided", query=SampleSide(image=_img(1)))]

        def __len__(self):
            return len(self.samples)

        def __getitem__(self, index):
            return self.samples[index]

    def decoder(image):
        if torch.equal(image, _img(1)):
            raise ImageDecodeError("corrupt", "bad.png")
        return image.numpy()  # array-likes are turned into float32 tensors

    both = SampleDataset(Source(), decoder=decoder)
    assert isinstance(both[0], SkippedSample) and both[0].reason == "empty caption"  # no target side
    query = SampleDataset(Source(), sides=("query",), decoder=decoder)
    ok, bad = query[0], query[1]
    assert isinstance(ok, DecodedSample) and torch.equal(ok.query.pixels, _img(0))
    assert ok.query.pixels.dtype == torch.float32
    assert not ok.target.has_image and ok.target.text is None
    assert isinstance(bad, SkippedSample) and bad.reason == "corrupt" and isinstance(bad.error, ImageDecodeError)
    with pytest.raises(ValueError, match="train=False"):
        SampleDataset(Source(), train=True, decoder=decoder)
    with pytest.raises(ValueError, match="sides"):
        SampleDataset(Source(), sides=("left",))


def _sharded_worker(rank: int, paths: list[str], out: str) -> None:
    table = Embedder(HashModel(), batch_size=2, progress=False, shard=True).embed([EmbedItem(image=p) for p in paths])
    torch.save({"keys": table.keys, "embeddings": table.embeddings, "failed": table.failed}, f"{out}.{rank}")


def test_sharded_image_embedding_shares_rows_and_skips_across_processes(tmp_path):
    """``shard=True`` (the in-training evaluation): each process decodes its share through SampleDataset; every
    process ends with every row and every named skip of a single-process pass."""
    from tests.dist_helpers import spawn_gloo

    paths = [str(_png(tmp_path / f"{i}.png", (30 * i, 90, 200 - 30 * i))) for i in range(4)]
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    paths.insert(2, str(tmp_path / "bad.png"))
    spawn_gloo(_sharded_worker, paths, str(tmp_path / "table"))
    single = embed_items(HashModel(), [EmbedItem(image=p) for p in paths], batch_size=2, progress=False)
    assert len(single) == 4 and list(single.failed) == [EmbedItem(image=paths[2]).key]
    for part in (torch.load(tmp_path / f"table.{rank}") for rank in range(2)):
        assert part["failed"] == single.failed
        assert torch.equal(part["embeddings"][[part["keys"].index(k) for k in single.keys]], single.embeddings)
