"""LLaVA-style vision-language models: the client runs the vision tower and projector, the server only the language
model. A tiny random LLaVA (CLIP vision tower, 32x32 images, patch 8; a tiny LLaMA) with a word-level tokenizer built
here; one `stip serve` subprocess and one `stip proxy` subprocess for the module."""

from __future__ import annotations

import base64
import io
import json
import sys

import httpx
import openai
import pytest
import torch
from PIL import Image

import stip
from stip.client import vision
from stip.client import hf
from stip.client.bundle import ClientBundle
from stip.client.transport import Connection, Downlink
from stip.server.launch import local_process
from tests.models import _randomise
from tests.parties import serve, stopped_in_background

IMAGE_TOKEN_ID = 3
WORDS = [f"w{i}" for i in range(100)] + ["user", "assistant", ":", "describe", "the", "image", "what", "is", "this"]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")
N = 12  # generated tokens


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<image>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<image>"])
    fast.chat_template = TEMPLATE
    return fast, len(vocab)


def _image(seed: int, size=(40, 30)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(plain model, tokenizer, image processor, plain folder, protected folder)."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    tok, vocab = _tokenizer()
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8)
    tc = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                     num_key_value_heads=2, head_dim=8, vocab_size=vocab, max_position_embeddings=256,
                     bos_token_id=1, eos_token_id=None, pad_token_id=0)  # no EOS: all N tokens compared
    config = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = _randomise(LlavaForConditionalGeneration(config), 0)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    root = tmp_path_factory.mktemp("llava")
    model.save_pretrained(root / "plain")
    tok.save_pretrained(root / "plain")
    processor.save_pretrained(root / "plain")
    stip.protect(root / "plain", root / "protected", progress=False)
    return model, tok, processor, root / "plain", root / "protected"


@pytest.fixture(scope="module")
def server(llava):
    with serve(llava[4]) as s:
        yield s


@pytest.fixture(scope="module")
def client(llava, server):
    return stip.Client(llava[4] / "client", server.url)


def _plain_ids(tok, text: str, n_images: int, features: int) -> list[int]:
    """The prompt as LlavaProcessor makes it: each image token expanded to one per image feature."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(IMAGE_TOKEN_ID) == n_images
    out = []
    for t in ids:
        out += [t] * features if t == IMAGE_TOKEN_ID else [t]
    return out


def _plain_generate(llava, text: str, images: list) -> list[int]:
    model, tok, processor = llava[:3]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    ids = torch.tensor([_plain_ids(tok, text, len(images), 16)])  # (32 / 8)^2 patches, CLS dropped
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                             max_new_tokens=N, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_bundles_split_the_model(llava):
    """The server bundle is the language model alone, a standard LlamaForCausalLM checkpoint with no vision
    tensor; the client holds the vision tower and the projector, plain, and the image processor."""
    from safetensors import safe_open

    protected = llava[4]
    config = json.loads((protected / "server" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    index = json.loads((protected / "server" / "model.safetensors.index.json").read_text())["weight_map"]
    assert not [n for n in index if "vision" in n or "projector" in n or "embed_tokens" in n]
    assert "lm_head.weight" in index and "model.layers.0.self_attn.q_proj.weight" in index
    bundle = ClientBundle.load(protected / "client")
    assert bundle.task == "image-text-to-text"
    state = hf.module_state(bundle)
    plain = llava[0].state_dict()
    assert set(state) == {n.removeprefix("model.") for n in plain if ".vision_tower." in n or "projector" in n}
    assert all(torch.equal(t, plain["model." + n]) for n, t in state.items())  # plain: the client applies p
    assert (protected / "client" / "preprocessor_config.json").is_file()
    with safe_open(str(protected / "server" / "model-00001-of-00001.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert not torch.equal(q, plain["model.language_model.layers.0.self_attn.q_proj.weight"])


def test_both_naming_conventions_map_to_the_same_names(llava):
    """The class's own names (`model.language_model.…`) and the names save_pretrained writes
    (`language_model.model.…`) go to the same server and client tensors."""
    import copy

    from transformers import GPT2Config

    from stip.common.keys import DeveloperKey
    from stip.common.transforms import KeyRng
    from stip.common.architectures import architecture_for, geometry_of
    from stip.developer.protect import protect_state_dict

    model = llava[0]
    arch = architecture_for(model.config)
    key = DeveloperKey.generate(geometry_of(model.config), "t", KeyRng(b"\0" * 32))
    new = model.state_dict()
    legacy = {n.replace("model.language_model.", "language_model.model.").replace("model.vision_tower.", "vision_tower.")
              .replace("model.multi_modal_projector.", "multi_modal_projector.")
              .replace("lm_head.", "language_model.lm_head."): t for n, t in new.items()}
    s1, c1 = protect_state_dict(arch, key, new, tied=False)
    s2, c2 = protect_state_dict(arch, key, legacy, tied=False)
    assert set(s1) == set(s2) and set(c1) == set(c2)
    assert all(torch.equal(s1[n], s2[n]) for n in s1)
    assert "token" in c1 and "vision_tower.embeddings.patch_embedding.weight" in c1
    with pytest.raises(stip.errors.UnsupportedModelError, match="model.image_newline"):  # LLaVA-NeXT's extra
        arch.match("model.image_newline")
    other = copy.deepcopy(model.config)
    other.text_config = GPT2Config(n_embd=48, n_layer=1, n_head=4)
    with pytest.raises(stip.errors.UnsupportedModelError, match="'gpt2'"):
        geometry_of(other)


def test_image_prompt_generates_the_plain_tokens(llava, client):
    tok = llava[1]
    images = [_image(1)]
    text = "user : <image> describe the image\nassistant :"
    expected = _plain_generate(llava, text, images)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    got = client.generate(ids=ids, images=images, max_tokens=N, temperature=0)
    assert got.token_ids == expected
    assert got.usage["prompt_tokens"] == len(ids) - 1 + 16
    # two images, given as a path and as bytes
    two = [_image(2, (64, 48)), _image(3)]
    text2 = "<image> w1 <image> what is this"
    expected2 = _plain_generate(llava, text2, two)
    buf = io.BytesIO()
    two[1].save(buf, format="PNG")
    got2 = client.generate(prompt=text2, images=[two[0], buf.getvalue()], max_tokens=N, temperature=0)
    assert got2.token_ids == expected2


def test_logits_equal_plain_and_server_sees_no_plain_features(llava, client, server):
    """Max-abs difference of the full logits over every prompt position; the rows sent at the image positions are
    the projector's output in `p`, not the plain features."""
    model, tok, processor, _, protected = llava
    images = [_image(4)]
    text = "user : <image> what is this"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bundle = client.bundle
    vp = vision.prepare(bundle, ids, images)
    x = vision.embed(bundle, vp.ids, vp.features)
    conn = Connection(server.url)
    with conn.open_session() as session:
        r = session.prefill(x, positions="all", downlink=Downlink("logits"))
    got = bundle.plain_logits(r.logits)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([vp.ids]), pixel_values=pixels).logits[0]
    diff = (got - want).abs().max().item()
    print(f"LLaVA tiny: max-abs logit difference protected vs plain over {len(vp.ids)} positions: {diff:.2e}")
    assert diff < 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))

    slots = [i for i, t in enumerate(vp.ids) if t == IMAGE_TOKEN_ID]
    with torch.no_grad():
        plain = model.model.get_image_features(pixels, vision_feature_layer=-2,
                                               vision_feature_select_strategy="default").pooler_output[0]
    sent = x[slots]
    assert torch.allclose(bundle.key.resid.invert(sent, -1), plain, atol=1e-5)  # what was sent is plain[..., p]
    assert not torch.allclose(sent, plain, atol=1e-2)
    for row in sent:  # no sent row is any plain feature row
        assert not any(torch.allclose(row, f, atol=1e-3) for f in plain)


def test_chat_messages_with_image_parts(llava, client):
    tok = llava[1]
    image = _image(5)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}},
                                             {"type": "text", "text": "describe the image"}]}]
    text = tok.apply_chat_template([{"role": "user", "content": "<image>\ndescribe the image"}], tokenize=False,
                                   add_generation_prompt=True)
    expected = _plain_generate(llava, text, [image])
    got = client.generate(messages=messages, max_tokens=N, temperature=0)
    assert got.token_ids == expected
    with pytest.raises(vision.ImageInputError, match="data URL"):
        client.generate(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}], max_tokens=2)
    with pytest.raises(vision.ImageInputError, match="1 image tokens for 2 images"):
        client.generate(prompt="<image> w1", images=[image, image], max_tokens=2)
    with pytest.raises(vision.ImageInputError, match="decode"):
        client.generate(prompt="<image> w1", images=[b"not an image"], max_tokens=2)
    with pytest.raises(vision.ImageInputError, match="16 image feature rows for 1 image tokens"):
        client.generate(prompt="<image> w1", image_features=torch.zeros(16, 48), max_tokens=2)


def test_text_only_bundle_refuses_images(tiny_protected):
    bundle = ClientBundle.load(tiny_protected("llama-gqa-untied")[1] / "client")
    with pytest.raises(vision.ImageInputError, match="takes no images"):
        vision.prepare(bundle, [1, 2, 3], [_image(0)])


def test_server_decode_mode_is_refused(llava, tmp_path):
    with pytest.raises(stip.errors.UnsupportedModelError, match="round-trip"):
        stip.protect(llava[3], tmp_path / "sd", mode="server-decode", progress=False)


def test_proxy_image_content_part(llava, client, server):
    image = _image(6)
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is this"},
                                             {"type": "image_url", "image_url": {"url": _data_url(image)}}]}]
    expected = client.generate(messages=messages, max_tokens=N, temperature=0).text
    assert expected
    with stopped_in_background(local_process(
            lambda port: [sys.executable, "-m", "stip.cli", "proxy", str(llava[4] / "client"), "--server", server.url,
                          "--port", str(port)], ready_path="/v1/models")) as proxy:
        oai = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = oai.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=N, n=2)
        assert [c.message.content for c in r.choices] == [expected, expected]  # one vision pass, two sessions
        assert r.usage.prompt_tokens == client.generate(messages=messages, max_tokens=1).usage["prompt_tokens"]
        stream = oai.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=N, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
        remote = [{"role": "user", "content": [{"type": "image_url",
                                                "image_url": {"url": "https://example.com/cat.png"}}]}]
        r = httpx.post(proxy.url + "/v1/chat/completions", json={"messages": remote, "max_tokens": 2}, timeout=30)
        assert r.status_code == 400 and "data URL" in r.json()["error"]["message"]
        bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}]
        r = httpx.post(proxy.url + "/v1/chat/completions", json={"messages": bad, "max_tokens": 2}, timeout=30)
        assert r.status_code == 400 and "base64" in r.json()["error"]["message"]


def test_stip_chat_with_an_image(llava, client, server, tmp_path, tiny_protected):
    """`stip chat --image FILE` attaches the image to the first message; a missing file or a text-only bundle is a
    CLI error naming the problem, before any server contact."""
    import subprocess

    from stip.client.chat import run_chat

    path = tmp_path / "cat.png"
    _image(7).save(path)
    messages = [{"role": "user", "content": [vision.image_part(path), {"type": "text", "text": "what is this"}]}]
    expected = client.generate(messages=messages, max_tokens=N, temperature=0).text
    cmd = [sys.executable, "-m", "stip.cli", "chat", str(llava[4] / "client"), "--server", server.url,
           "--max-tokens", str(N)]
    r = subprocess.run([*cmd, "-p", "what is this", "--image", str(path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected.strip()
    # refusals come before any server contact (nothing listens on port 9); main() prints a StipError without a
    # traceback
    with pytest.raises(stip.errors.StipError, match="missing.png"):
        run_chat(llava[4] / "client", server="http://127.0.0.1:9", prompt="hi", images=[tmp_path / "missing.png"])
    with pytest.raises(stip.errors.StipError, match="takes no images"):
        run_chat(tiny_protected("llama-gqa-untied")[1] / "client", server="http://127.0.0.1:9", prompt="hi",
                 images=[path])


def test_light_proxy_refuses_images_naming_the_vision_extra(llava, client, server, tmp_path_factory):
    """`stip proxy` from the light install (no torch, transformers or Pillow; tests/light/venv.py) serves this
    LLaVA bundle's text chats as the full client does, and answers an image part with a 400 naming the extra."""
    from tests.light.venv import shared

    messages = [{"role": "user", "content": "describe the image"}]
    expected = client.generate(messages=messages, max_tokens=N, temperature=0).text
    with stopped_in_background(local_process(
            lambda port: [str(shared(tmp_path_factory)), "-m", "stip.cli", "proxy", str(llava[4] / "client"),
                          "--server", server.url, "--port", str(port)], ready_path="/v1/models",
            env={"PYTHONPATH": ""})) as proxy:
        r = httpx.post(proxy.url + "/v1/chat/completions", timeout=60,
                       json={"messages": messages, "max_tokens": N, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected
        image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(_image(8))}},
                                              {"type": "text", "text": "what is this"}]}]
        r = httpx.post(proxy.url + "/v1/chat/completions", json={"messages": image, "max_tokens": 2}, timeout=30)
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and 'pip install "stip[vision]"' in message and "torch" in message, message
