"""The server checkpoint must hold exactly the tensors its model class expects, or nothing is served.

transformers fills any parameter a checkpoint lacks with random values (and drops tensors it does not know), so a
checkpoint with a missing LM head, an unrenamed tensor or a wrong shape loads without error and serves garbage. The
expected set comes from the model class itself, built from the config on the `meta` device (no memory); `protect`
checks the names and shapes the server bundle will hold before writing anything, and the server checks its bundle
again before and after loading it.
"""

from __future__ import annotations

from typing import Mapping

import torch

from stip.common.architectures import CLIENT, LM_HEAD, TOKEN_EMBEDDING, architecture_for
from stip.common.layout import HEAD_CLIENT, HEAD_SERVER
from stip.errors import TensorSetError, UnsupportedModelError

Shapes = Mapping[str, tuple[int, ...]]


ROUND_TRIP, SERVER_DECODE = "round-trip", "server-decode"  # the bundle modes (stip.developer.protect)


def expected_tensors(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the model class for `config` loads (its state dict), built without memory.
    A tied parameter is listed once, under its first name (the checkpoint stores it once). For a family whose
    bundle keeps the names `save_pretrained` writes (`Architecture.saved_names`: Mixtral's per-expert tensors, which
    the class fuses), the names and shapes are those, from transformers' own conversion mapping run in reverse."""
    with torch.device("meta"):
        model = model_class(config)(config)
    seen: set[int] = set()
    state = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            state[name] = t
    if _saved_names(config):
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
    return {name: tuple(t.shape) for name, t in state.items()}


def _saved_names(config) -> bool:
    try:
        return architecture_for(config).saved_names
    except UnsupportedModelError:
        return False


def _rule(arch, name: str):
    """The rule for `name`, or None where no rule covers it (a class name that only exists after transformers'
    conversion on load, such as a fused expert tensor): such a tensor is never the client's."""
    try:
        return arch.match(name).rule
    except UnsupportedModelError:
        return None


def model_class(config):
    """The transformers class a server bundle is loaded as: the one its config names (`architectures`), which must
    be a class transformers ships (no custom code); a config that names none is a causal LM."""
    import transformers

    names = getattr(config, "architectures", None) or []
    if not names:
        return transformers.AutoModelForCausalLM.from_config
    cls = getattr(transformers, names[0], None)
    if cls is None:
        raise TensorSetError(f"config names model class {names[0]!r}, which transformers does not ship")
    return cls


def client_only(config, names, mode: str = ROUND_TRIP, head: str = HEAD_SERVER) -> set[str]:
    """The client's tensors among `names` (the token embedding, and every tensor of a client-side module such as
    BERT's embeddings or LLaVA's vision tower; with `head` "client", the LM head too): what a round-trip server
    never gets, found by their rules. Tables the server holds as zeros are not among them. A server-decode server
    gets every tensor."""
    if mode == SERVER_DECODE:
        return set()
    arch = architecture_for(config)
    out = set()
    for n in names:
        rule = _rule(arch, n)
        if rule is None:
            continue
        if rule.role == TOKEN_EMBEDDING or (rule.party == CLIENT and not rule.zeroed_on_server) \
                or (head == HEAD_CLIENT and rule.role == LM_HEAD):
            out.add(n)
    return out


def zeroed(config, names, mode: str = ROUND_TRIP) -> set[str]:
    """Tensors among `names` that the server holds as zeros (client-side tables its model class still adds). None
    in server-decode mode, where the server holds those tables itself."""
    if mode == SERVER_DECODE:
        return set()
    arch = architecture_for(config)
    return {n for n in names if getattr(_rule(arch, n), "zeroed_on_server", False)}


def check_server_tensors(config, got: Shapes, where: str, sources: Mapping[str, str] | None = None,
                         mode: str = ROUND_TRIP, head: str = HEAD_SERVER) -> None:
    """Refuse unless `got` (name -> shape) is exactly what the server model needs: every tensor of the model class
    (but the input embedding, in round-trip mode, and the LM head with `head` "client"), under the class's names,
    with its shapes. The error names the first offending tensor (and, from `sources`, the checkpoint tensor it was
    made from where that name differs)."""
    if mode not in (ROUND_TRIP, SERVER_DECODE):
        raise TensorSetError(f"{where}: unknown bundle mode {mode!r}")
    if head not in (HEAD_SERVER, HEAD_CLIENT) or (head == HEAD_CLIENT and mode != ROUND_TRIP):
        raise TensorSetError(f"{where}: LM head placement {head!r} is not one a {mode} bundle can have")
    expected = expected_tensors(config)
    skip = client_only(config, expected, mode, head)
    class_name = (getattr(config, "architectures", None) or [config.model_type])[0]

    def label(name: str) -> str:
        src = (sources or {}).get(name, name)
        return repr(name) if src == name else f"{name!r} (from checkpoint tensor {src!r})"

    for name in sorted(got):
        if name in skip:
            what = "the LM head" if head == HEAD_CLIENT and name not in client_only(config, [name], mode) \
                else "the input embedding"
            raise TensorSetError(f"{where} holds {what} {label(name)}, which must never reach the server"
                                 + (" (--head client)" if what == "the LM head" else ""))
        if name not in expected:
            raise TensorSetError(f"{where} has unexpected tensor {label(name)} {list(got[name])}: {class_name} has "
                                 "no such parameter for this config, so it would be silently dropped")
        if tuple(got[name]) != expected[name]:
            raise TensorSetError(f"{where}: tensor {label(name)} has shape {list(got[name])}, but {class_name} "
                                 f"with this config expects {list(expected[name])}")
    for name in sorted(set(expected) - set(got) - skip):
        raise TensorSetError(f"{where} lacks tensor {name!r} {list(expected[name])}: transformers would fill it "
                             "with random values and the model would serve garbage")
