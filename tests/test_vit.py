"""ViT image classification: a tiny random ViT (hidden 32, 2 layers, 32x32 images, 8x8 patches, 5 named labels)
protected and run by hand, through the client's image path, and through a real `stip serve` process."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

import stip
from stip.client.bundle import ClientBundle
from stip.client.images import ImageEncoder
from stip.client.vision import ImageInputError
from stip.common.keys import DeveloperKey
from stip.common.architectures import architecture_for, geometry_of
from stip.developer.protect import protect_state_dict
from tests.models import _randomise

LABELS = {0: "cat", 1: "dog", 2: "ship", 3: "tree", 4: "cloud"}


def tiny_vit() -> ViTForImageClassification:
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=5, id2label=LABELS,
                       label2id={v: k for k, v in LABELS.items()})
    torch.manual_seed(0)
    return _randomise(ViTForImageClassification(config), 0)


def random_images(n: int, seed: int = 1, size: int = 40) -> list[Image.Image]:
    """PIL images of another size than the model's: the processor resizes them, as for any real photo."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def plain_vit(tmp_path_factory):
    """(plain model, its hub-like folder: checkpoint as save_pretrained writes it, config, image processor)."""
    folder = tmp_path_factory.mktemp("vit") / "plain"
    model = tiny_vit()
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    del processor["image_processor_type"]  # as some hub folders have it: the model's config names the class
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return model, folder


@pytest.fixture(scope="module")
def vit(plain_vit):
    """(plain model, its folder, the protected output folder)."""
    model, folder = plain_vit
    stip.protect(folder, folder.parent / "protected", progress=False)
    return model, folder, folder.parent / "protected"


def plain_top(model, folder, images, k: int = 1) -> list[list[str]]:
    pixels = ViTImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(pixels).logits
    return [[LABELS[int(i)] for i in row] for row in logits.topk(k, -1).indices], logits


def test_protected_body_equals_plain(plain_vit):
    """The rules alone: the protected blocks, final norm and classifier, run by hand on `p`-permuted embeddings,
    give the plain logits in the label permutation."""
    model, folder = plain_vit
    state = load_file(str(folder / "model.safetensors"))
    config = ViTConfig.from_pretrained(folder)
    key = DeveloperKey.generate(geometry_of(config), "test")
    server, client = protect_state_dict(architecture_for(config), key, state, tied=False)
    assert set(client) == {"cls_token", "position_embeddings", "patch_embeddings.projection.weight",
                           "patch_embeddings.projection.bias"}
    assert not any("embeddings" in n for n in server)
    protected = ViTForImageClassification(config).eval()
    missing, unexpected = protected.load_state_dict(server, strict=False)
    assert not unexpected and all(m.startswith("vit.embeddings.") for m in missing)

    pixels = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        plain = model(pixels).logits
        h = key.client.resid.apply(model.vit.embeddings(pixels), -1, "out")
        for layer in protected.vit.layers:
            h = layer(h, None)
        out = protected.classifier(protected.vit.layernorm(h)[:, 0])
    got = key.client.labels.invert(out, -1)
    diff = (got - plain).abs().max().item()
    print(f"ViT protected vs plain logits: max-abs diff {diff:.3g}")
    assert diff < 1e-4
    assert torch.equal(got.argmax(-1), plain.argmax(-1))
    assert (out - plain).abs().max() > 1e-2  # the server's own logits are in the secret label order


def test_bundles(vit):
    """The server bundle is the class's checkpoint minus the embeddings module; the client bundle has the image
    processor, the plain module and the label permutation."""
    from safetensors import safe_open

    _, _, out = vit
    names = set()
    for shard in (out / "server").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            names |= set(f.keys())
    assert "classifier.weight" in names and "vit.layers.0.attention.q_proj.weight" in names
    assert not any("embeddings" in n for n in names)
    bundle = ClientBundle.load(out / "client")
    assert bundle.task == "image-classification"
    assert (out / "client" / "preprocessor_config.json").is_file()
    assert len(bundle.key.labels) == 5 and not bundle.key.labels.is_identity()


def test_client_sends_permuted_patches(vit):
    """The client runs the model's processor and embeddings and sends them in `p`: never the plain patches."""
    model, folder, out = vit
    images = random_images(3)
    enc = ImageEncoder.for_bundle(ClientBundle.load(out / "client"))
    sent = enc.embed(images)
    pixels = ViTImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        plain = model.vit.embeddings(pixels)
    assert sent.shape == (3, 17, 32)
    assert torch.cdist(sent.reshape(-1, 32), plain.reshape(-1, 32)).min() > 1e-3  # no row is a plain row
    torch.testing.assert_close(enc.bundle.key.resid.invert(sent, -1), plain)


def test_image_inputs_and_errors(vit, tmp_path):
    """PIL images, files, bytes and data URLs give the same patches; bad inputs and bundles are named."""
    _, _, out = vit
    enc = ImageEncoder.for_bundle(ClientBundle.load(out / "client"))
    img = random_images(1)[0]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    (tmp_path / "a.png").write_bytes(buf.getvalue())
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    want = enc.embed([img])
    for source in (tmp_path / "a.png", str(tmp_path / "a.png"), buf.getvalue(), url):
        assert torch.equal(enc.embed([source]), want)
    for bad, words in ((tmp_path / "missing.png", "image 1: image file .* does not exist"),
                       (b"not an image", "image 1: could not decode"), ("data:image/png;base64,@@", "base64"),
                       ("https://example.com/a.png", "not fetched"), (42, "must be a PIL image")):
        with pytest.raises(ImageInputError, match=words):
            enc.embed([img, bad])
    with pytest.raises(ImageInputError, match="no images"):
        enc.embed([])


def test_classify_through_server(vit, tmp_path):
    """A real `stip serve` process: the SDK's classify on PIL images and `stip classify --image` give the plain
    model's labels and scores; malformed requests get 4xx naming the problem and the server keeps serving."""
    from typer.testing import CliRunner

    from stip.cli import app
    from stip.client.transport import Connection, StipServerError
    from tests.parties import serve

    model, folder, out = vit
    images = random_images(6, seed=2)
    expected, logits = plain_top(model, folder, images, k=2)
    probs = logits.softmax(-1).topk(2, -1).values.numpy()
    for i, im in enumerate(images[:2]):
        im.save(tmp_path / f"{i}.png")
    with serve(out, token="t") as server:
        conn = Connection(server.url, token="t")
        assert conn.info()["task"] == "image-classification"
        for bad, status, words in ((torch.zeros(1, 18, 32), 413, "limit of 17"),  # more tokens than patches + CLS
                                   (torch.zeros(1, 17, 16), 422, "hidden size 16")):
            with pytest.raises(StipServerError, match=words) as e:
                conn.encode(bad, None)
            assert e.value.status == status
        client = stip.Client(out / "client", server.url, token="t")
        got = client.classify(images=images, top_k=2)
        # the CLI command in-process (a Python start per CLI run is what CI cannot afford)
        cli = CliRunner().invoke(app, ["classify", "--client", str(out / "client"), "--server", server.url,
                                       "--top-k", "2", "--image", str(tmp_path / "0.png"),
                                       "--image", str(tmp_path / "1.png")], env={"STIP_TOKEN": "t"})
    assert [[r["label"] for r in row] for row in got] == expected
    assert np.allclose([[r["score"] for r in row] for row in got], probs, atol=1e-5)
    assert cli.exit_code == 0, cli.output
    assert [[r["label"] for r in row] for row in json.loads(cli.stdout)] == expected[:2]


def test_images_need_an_image_classifier(tiny_protected):
    from stip.errors import BundleError

    _, out = tiny_protected("gpt2")
    with pytest.raises(BundleError, match="serves text-generation, not image-classification"):
        ImageEncoder.for_bundle(ClientBundle.load(out / "client"))


def test_class_names_and_other_heads(plain_vit, tmp_path):
    """A checkpoint under the class's own names protects to the same server tensors as save_pretrained's names;
    a ViT without the classification head is refused by name."""
    from transformers import ViTModel

    from stip.errors import UnsupportedModelError

    model, folder = plain_vit
    config = ViTConfig.from_pretrained(folder)
    arch, key = architecture_for(config), DeveloperKey.generate(geometry_of(config), "test")
    saved, _ = protect_state_dict(arch, key, load_file(str(folder / "model.safetensors")), tied=False)
    own, _ = protect_state_dict(arch, key, model.state_dict(), tied=False)
    assert saved.keys() == own.keys() and all(torch.equal(saved[n], own[n]) for n in saved)
    ViTModel(config).save_pretrained(tmp_path / "base")
    with pytest.raises(UnsupportedModelError, match="supported as ViTForImageClassification; this one is a ViTModel"):
        stip.protect(tmp_path / "base", tmp_path / "out", progress=False)


def test_server_bundle_check_refuses_embeddings(plain_vit):
    """The server's tensor check: any tensor of the client's embeddings module in a server bundle is refused by
    name, as is a missing block tensor (transformers would fill it with random values)."""
    from stip.common.bundles.completeness import check_server_tensors
    from stip.errors import TensorSetError

    model, folder = plain_vit
    config = ViTConfig.from_pretrained(folder)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    server = {n: s for n, s in shapes.items() if not n.startswith("vit.embeddings.")}
    check_server_tensors(config, server, "bundle")
    for name in ("vit.embeddings.cls_token", "vit.embeddings.patch_embeddings.projection.weight"):
        with pytest.raises(TensorSetError, match=f"{name}.*must never reach the server"):
            check_server_tensors(config, {**server, name: shapes[name]}, "bundle")
    with pytest.raises(TensorSetError, match="lacks tensor 'vit.layers.1.mlp.fc2.weight'"):
        check_server_tensors(config, {n: s for n, s in server.items() if n != "vit.layers.1.mlp.fc2.weight"}, "b")
