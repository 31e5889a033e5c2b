"""Loading the FID Inception weights (pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, or a
`.safetensors` file with the same keys) into `pbe_jax.models.inception.FIDInceptionV3`.

The state dict maps by name through the generic walk. Two kinds of entries are known and dropped by name: the
1008-class classifier `fc.weight`/`fc.bias` (FID uses the pool features before it) and BatchNorm's
`num_batches_tracked` counters (training bookkeeping). Anything else the model has no place for is refused, as
is any missing or mis-shaped tensor, with the file, the key and both shapes in the message.
"""
from __future__ import annotations

from pbe_jax import storage
from pbe_jax.convert import mapping
from pbe_jax.convert.weights import load_file, save_safetensors
from pbe_jax.models.inception import FIDInceptionV3, InceptionConfig
from pbe_jax.models.layers import Policy


def ignored_key(key: str) -> bool:
    """The state-dict entries that the FID features do not use: the classifier and BatchNorm's counters."""
    return key.startswith("fc.") or key.endswith(".num_batches_tracked")


def from_state_dict(state_dict: dict, source: str, config: InceptionConfig = InceptionConfig(),
                    policy: Policy = Policy()) -> FIDInceptionV3:
    """A PyTorch state dict (numpy arrays keyed by PyTorch name) → the JAX model; `source` names it in errors."""
    return mapping.from_torch(FIDInceptionV3, config, policy, state_dict, source, ignore=ignored_key)


def load_fid_inception(path, policy: Policy = Policy(), config: InceptionConfig = InceptionConfig()
                       ) -> FIDInceptionV3:
    """The FID Inception from a `.pth` pickle (read with `torch.load(weights_only=True)`; needs torch) or a
    `.safetensors` file with the same keys (no torch); local paths and gs:// alike."""
    path = storage.path(path)
    return from_state_dict(load_file(path), str(path), config, policy)


def inception_to_safetensors(src, dst) -> None:
    """Convert the `.pth` to `.safetensors` with the same keys and values (classifier and counters included),
    for hosts without torch. The weights are checked against the model first: a file that would not load is
    refused before anything is written."""
    src = storage.path(src)
    state_dict = load_file(src)
    from_state_dict(state_dict, str(src))
    save_safetensors(state_dict, dst, metadata={"format": "pt"})
