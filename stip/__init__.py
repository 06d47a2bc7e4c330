"""STIP: three-party privacy-preserving, lossless inference for Transformers with secret permutations.

The three parties live in three subpackages: `stip.developer` (protect a model), `stip.server` (serve the protected
model), `stip.client` (the data owner's SDK, CLI and OpenAI-compatible proxy). `stip.common` holds what they share.
"""

__version__ = "0.1.0"

from stip.errors import BundleError, KeyMismatchError, StipError, UnsupportedModelError  # noqa: E402

__all__ = ["__version__", "StipError", "BundleError", "KeyMismatchError", "UnsupportedModelError", "protect",
           "ClientBundle", "Client"]


def __getattr__(name):
    # Lazy: importing `stip` must stay cheap (the CLI starts fast, the server never imports client code).
    if name == "protect":
        from stip.developer.protect import protect

        return protect
    if name == "ClientBundle":
        from stip.client.bundle import ClientBundle

        return ClientBundle
    if name == "Client":
        from stip.client.sdk import Client

        return Client
    raise AttributeError(name)
