"""Protection keys: what they hold, how they are drawn, and their file format.

The key is split as in the paper. The client key (`p` for the residual stream, `pc` for the vocabulary) is all a data
owner ever receives. The developer key adds the per-layer part (head order, in-head Q/K transform, in-head V
permutation, FFN-neuron permutation) and never leaves the developer. Both are safetensors files with a format version,
a fingerprint over their contents, and the id of the bundle they protect, written atomically and owner-only.

Hardened modes (docs/hardened.md) add optional tensors: the client key's `resid.mix` (a dense orthogonal `Q` that
replaces `p`), and per layer `qk_mix` (in-head rotations of Q/K), `vo_mix` (in-head invertible mixing of V/O) and
`ffn_scale` (power-of-two exponents of the FFN's up projection). Keys without them load and fingerprint as before.

Modules: geometry (the shapes a key is drawn for), draws (drawing parts from the CSPRNG), file_format (the key file),
client (ClientKey), layer (LayerKey), developer (DeveloperKey). Import the names from here.
"""

from stip.common.keys.client import ClientKey
from stip.common.keys.developer import DeveloperKey
from stip.common.keys.draws import HARDEN_OPTIONS
from stip.common.keys.file_format import KEY_FORMAT, KEY_VERSION, read_key_file
from stip.common.keys.geometry import Geometry
from stip.common.keys.layer import LayerKey

__all__ = ["ClientKey", "DeveloperKey", "Geometry", "HARDEN_OPTIONS", "KEY_FORMAT", "KEY_VERSION", "LayerKey",
           "read_key_file"]
