import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

TINY_NAMES = ("sd", "alt")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A factory: the diffusers folder of tiny random pipeline `name`, saved once per session."""
    from pbe_jax import reference

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = reference.save_tiny(tmp_path_factory.mktemp(f"tiny_{name}"), name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_pair(tiny_folder):
    """A factory: (PyTorch modules, JAX models) loaded from the same tiny folder."""
    from pbe_jax import reference
    from pbe_jax.convert import load

    cache = {}

    def get(name: str):
        if name not in cache:
            folder = tiny_folder(name)
            cache[name] = (reference.load_torch(folder), load(folder))
        return cache[name]

    return get
