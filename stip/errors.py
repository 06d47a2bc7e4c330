"""Errors a user can act on. The CLI prints their message and exits non-zero; the server maps them to 4xx."""


class StipError(Exception):
    """Base class: the message names the problem and, where possible, the fix."""


class BundleError(StipError):
    """A bundle or key file is missing, tampered with, or does not belong with another."""


class KeyMismatchError(BundleError):
    """A key does not belong to the bundle (or model) it is used with."""


class UnsupportedModelError(StipError):
    """The model's architecture or layout has no protection rules."""


class TensorSetError(BundleError):
    """A checkpoint does not hold exactly the tensors its model class expects: one is missing, unexpected, or has
    the wrong shape (transformers would fill or drop it silently)."""


class TeeError(StipError):
    """TEE mode: an attestation report, an enclave bundle's seal or a channel message was refused (the message says
    which check failed)."""
