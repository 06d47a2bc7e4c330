"""What `stip protect --tee` writes and how its parts are named: the folders and files, the TEE worker bundle's
manifest fields, the worker's op names and the enclave bundle's tensor names. The developer writes them, the
server's TEE worker and the enclave read them (docs/tee.md)."""

from __future__ import annotations

from pathlib import Path

from stip.errors import BundleError

# Folders and files of a `stip protect --tee` output, beside stip.common.layout's.
ENCLAVE_DIR, TEE_CLIENT_DIR, TEE_PLATFORM_DIR = "enclave", "tee-client", "tee-platform"
SEALED_FILE, ENCLAVE_CONFIG_FILE = "enclave.sealed", "stip_enclave.json"
PLATFORM_FILE = "platform.key"
TEE_MODE = "tee"
TEE_WORKER_MODE = "tee-worker"  # the server manifest's mode after `stip protect --tee`
LM_HEAD_FIELD = "tee_lm_head"  # server manifest: "worker" (offloaded, masked) or "enclave" (tied: zeros here)

# The worker's op names: a linear of block 0 by its module name, or the LM head.
LM_HEAD = "lm_head"  # the worker op name of the LM head
GROUP_SEP = "+"  # a grouped request names its linears joined by this; the worker returns their outputs side by side

# Tensor names of the enclave bundle (the sealed DIR/enclave/, written by `stip protect --tee`).
RESID, VOCAB = "resid", "vocab"  # the client key's p and pc: "<x>.perm", "<x>.sign" (optional)
TOKEN_EMBEDDING, POSITION_EMBEDDING, EMBEDDING_SCALE = "embed.token", "embed.position", "embed.scale"
BLOCK_PREFIX, FINAL_NORM_PREFIX, LM_HEAD_PREFIX = "block.", "final_norm.", "lm_head."
# The worker's secret bases (stip.developer.tee): "mask.<linear>.in.perm"/".in.scale" (A, one per input group),
# "mask.<linear>.out.perm"/".out.scale" (B); a tied model's LM head is computed in the enclave (this flag), not
# offloaded.
MASK_PREFIX, LM_HEAD_IN_ENCLAVE = "mask.", "tee.lm_head_in_enclave"


def check_worker_mode(bundle: Path, manifest: dict, tee_worker: bool) -> None:
    """A TEE worker bundle serves only as `--tee-worker`, and `--tee-worker` serves only a TEE worker bundle."""
    is_worker = manifest.get("mode") == TEE_WORKER_MODE
    if is_worker and not tee_worker:
        raise BundleError(f"{bundle}: this server bundle was written by `stip protect --tee`: serve it with "
                          "--tee-worker (its block 0 is in the enclave's secret bases)")
    if tee_worker and not is_worker:
        raise BundleError(f"{bundle} is not a TEE worker bundle: --tee-worker serves the server bundle "
                          "`stip protect --tee` writes; protect the model again with --tee")
