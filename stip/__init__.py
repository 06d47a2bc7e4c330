"""STIP: three-party privacy-preserving, lossless inference for Transformers with secret permutations.

The three parties live in three subpackages: `stip.developer` (protect a model), `stip.server` (serve the protected
model), `stip.client` (the data owner's SDK, CLI and OpenAI-compatible proxy). `stip.common` holds what they share.
"""

__version__ = "0.1.0"

from stip.errors import BundleError, KeyMismatchError, StipError, UnsupportedModelError  # noqa: E402

# The Python API mirrors the CLI: name -> (module, attribute), imported on first use so that `import stip` stays
# cheap and the server process never imports client code.
_API = {
    "protect": ("stip.developer.protect", "protect"),  # stip protect
    "inspect": ("stip.common.inspect", "describe"),  # stip inspect
    "verify": ("stip.common.inspect", "verify_bundle"),  # stip verify
    "serve": ("stip.server.app", "run_server"),  # stip serve
    "Client": ("stip.client.sdk", "Client"),  # stip chat
    "run_proxy": ("stip.client.proxy", "run_proxy"),  # stip proxy
    "run_demo": ("stip.demo", "run_demo"),  # stip demo
    "ClientBundle": ("stip.client.bundle", "ClientBundle"),
    "DeveloperKey": ("stip.common.keys", "DeveloperKey"),
    "ClientKey": ("stip.common.keys", "ClientKey"),
}

__all__ = ["__version__", "StipError", "BundleError", "KeyMismatchError", "UnsupportedModelError", *_API]


def __getattr__(name):
    if name not in _API:
        raise AttributeError(name)
    import importlib

    module, attr = _API[name]
    return getattr(importlib.import_module(module), attr)
