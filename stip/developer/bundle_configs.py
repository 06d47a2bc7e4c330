"""The config files `stip protect` writes beside the tensors: the server's config.json and generation_config.json
(server-decode mode: token ids remapped to server ids), and the client's config, the model's config and the
processor and sentence-transformers files the client runs on its side.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import stip.errors
from stip.common.architectures import architecture_for, embedding_scale_of, task_of
from stip.common.bundles.completeness import ROUND_TRIP, SERVER_DECODE
from stip.common.files import write_json_atomic
from stip.common.keys import DeveloperKey
from stip.common.layout import CLIENT_CONFIG_FILE, HEAD_CLIENT, HEAD_SERVER, MODEL_CONFIG_FILE
from stip.developer.checkpoint import Checkpoint

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # copied into the client bundle

# Server-decode mode: config / generation-config fields that hold token ids (remapped to server ids), besides every
# field named `*_token_id` or `*_token_ids`; and fields that hold ids in a form not remapped (refused if set).
ID_FIELDS = ("suppress_tokens", "begin_suppress_tokens", "bad_words_ids")
UNMAPPED_ID_FIELDS = ("forced_decoder_ids", "force_words_ids", "sequence_bias", "forced_bos_token_id_map")


def write_server_config(ck: Checkpoint, folder: Path, mode: str = ROUND_TRIP, key: DeveloperKey | None = None,
                        head: str = HEAD_SERVER) -> None:
    config = server_config(ck, mode, head)
    gen = ck.generation_config()
    if mode == SERVER_DECODE:
        to_server = key.client.vocab.inverse_perm.tolist()
        _remap_ids(vars(config), to_server, "config.json")
        if gen is None:  # vLLM without a tokenizer reads EOS from generation_config.json: always write one
            gen = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                   "decoder_start_token_id") if getattr(config, k, None) is not None}
        else:
            gen = _remap_ids(dict(gen), to_server, "generation_config.json")
    config.save_pretrained(folder)
    if gen is not None:
        write_json_atomic(folder / "generation_config.json", gen)


def _is_id_field(name: str) -> bool:
    return name.endswith(("_token_id", "_token_ids")) or name in ID_FIELDS


def _remap_ids(fields: dict, to_server: list[int], where: str) -> dict:
    """Replace every token id in `fields` (in place; ints, lists, nested lists) by its server id. Ids outside the
    vocabulary (a -1 "none") stay as they are. Fields that hold ids in a form not remapped are refused."""
    def remap(v):
        if isinstance(v, bool) or v is None:
            return v
        if isinstance(v, int):
            return to_server[v] if 0 <= v < len(to_server) else v
        if isinstance(v, (list, tuple)):
            return [remap(x) for x in v]
        return v

    for name in list(fields):
        if name in UNMAPPED_ID_FIELDS and fields[name]:
            raise stip.errors.UnsupportedModelError(f"{where}: {name!r} holds token ids that server-decode mode does "
                                                    "not remap; remove it from the model's config to protect it")
        if _is_id_field(name):
            fields[name] = remap(fields[name])
    return fields


def server_config(ck: Checkpoint, mode: str = ROUND_TRIP, head: str = HEAD_SERVER):
    """The model's own config. Round-trip: untied (the server has the LM head, the client the embedding).
    Server-decode: tied as the model is (the server has both); special ids are remapped by the caller. A model whose
    server runs only part of it (LLaVA: its language model) gets that part's config. `head` "client": no final
    logit soft-capping (the server returns hidden states; the client caps the logits it computes)."""
    config = copy.deepcopy(_language_config(ck))
    if mode == ROUND_TRIP:
        config.tie_word_embeddings = False
    if head == HEAD_CLIENT and getattr(config, "final_logit_softcapping", None) is not None:
        config.final_logit_softcapping = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    if config.model_type == "gpt2":
        config.architectures = ["GPT2LMHeadModel"]
    arch = architecture_for(ck.config)
    if arch.server_class is not None:  # encoders and classifiers: the class the checkpoint names (BertModel, ...)
        config.architectures = [arch.server_class(ck.config)]
    return config


def _language_config(ck: Checkpoint):
    """The config of the model the server runs: the whole model's, or its language model's (LLaVA)."""
    arch = architecture_for(ck.config)
    return arch.server_config(ck.config) if arch.server_config else ck.config


def write_client_configs(ck: Checkpoint, client: Path, embedding: dict[str, tuple[int, ...]], bundle_id: str,
                         mode: str, harden: tuple[str, ...], noise: float, tokenizer, head: str = HEAD_SERVER) -> None:
    """Everything the client bundle holds besides its key and tensors: its own config, the model's config, the
    tokenizer and the files the client runs on its side (image processor, sentence-transformers pipeline). `head`
    "client": where the LM head is, and the soft-capping the client then applies to the logits it computes."""
    extra = {"head": head}
    if head == HEAD_CLIENT:
        extra["final_logit_softcapping"] = getattr(_language_config(ck), "final_logit_softcapping", None)
    write_json_atomic(client / CLIENT_CONFIG_FILE,
                      {**_client_config(ck, embedding, bundle_id, mode), "harden": list(harden),
                       "noise": float(noise), **extra})
    write_json_atomic(client / MODEL_CONFIG_FILE, ck.config.to_dict())
    if tokenizer is not None:
        tokenizer.save_pretrained(client)
    _copy_processor(ck, client)
    _copy_sentence_transformers(ck, client)


def _copy_processor(ck: Checkpoint, client: Path) -> None:
    """The model's image processor and processor configs, which the client runs on images (ViT, LLaVA)."""
    for name in PROCESSOR_FILES:
        if (ck.path / name).is_file():
            (client / name).write_bytes((ck.path / name).read_bytes())


def _copy_sentence_transformers(ck: Checkpoint, client: Path) -> None:
    """A sentence-transformers model's pipeline description (modules.json and each module's small JSON configs:
    pooling, normalization), which the client follows to pool hidden states into sentence embeddings. Weights of
    extra modules (a Dense layer) are not copied: the client refuses such a pipeline by name."""
    if not (ck.path / "modules.json").is_file():
        return
    names = ["modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"]
    for module in json.loads((ck.path / "modules.json").read_text()):
        if module.get("path"):
            names += [f"{module['path']}/{f.name}" for f in (ck.path / module["path"]).glob("*.json")]
    for name in names:
        if (ck.path / name).is_file():
            (client / name).parent.mkdir(parents=True, exist_ok=True)
            (client / name).write_bytes((ck.path / name).read_bytes())


def _client_config(ck: Checkpoint, embedding: dict[str, tuple[int, ...]],
                   bundle_id: str, mode: str = ROUND_TRIP) -> dict:
    c = ck.config
    lm = _language_config(ck)
    eos = getattr(lm, "eos_token_id", None)
    gen = ck.generation_config() or {}
    eos = gen.get("eos_token_id", eos)
    return {
        "bundle_id": bundle_id,
        "mode": mode,
        "task": task_of(c),
        "model_type": c.model_type,
        "hidden_size": embedding["token"][1] if "token" in embedding else int(lm.hidden_size),
        "vocab_size": embedding["token"][0] if "token" in embedding else int(getattr(lm, "vocab_size", 0) or 0),
        "learned_positions": "position" in embedding and mode == ROUND_TRIP,
        "max_positions": embedding["position"][0] if "position" in embedding
        else int(getattr(lm, "max_position_embeddings", 0) or 0),
        "eos_token_ids": [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]),
        "bos_token_id": getattr(lm, "bos_token_id", None),
        "embedding_scale": embedding_scale_of(c),  # the model's own scale inside its embedding module (Gemma)
    }
