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
