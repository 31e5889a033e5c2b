"""JAX's persistent compilation cache for the command-line tools: a second run with the same shapes loads
the compiled programs instead of compiling them again (on the CPU here that is most of a short sample.py run).

Traps it avoids or documents: it must be configured before the first compile (the CLIs call `enable` first
thing); the cache key includes the device assignment on CPU and TPU, so a different device count or mesh
misses (it never returns a wrong program); with several processes only process 0 writes entries."""
from __future__ import annotations

import os

ENV = "PBE_JAX_COMPILE_CACHE"  # a folder, or "off"; what --compile-cache defaults to


def add_argument(parser) -> None:
    """`--compile-cache DIR|off` on a CLI's argparse parser (pass its value to `enable`)."""
    parser.add_argument("--compile-cache", metavar="DIR|off",
                        help="JAX's persistent compilation cache: a folder (local or gs://) or 'off' (default: "
                             f"${ENV}, else $JAX_COMPILATION_CACHE_DIR, else ~/.cache/pbe_jax/jax); a second run "
                             "with the same shapes skips XLA's compile")


def default_folder() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pbe_jax", "jax")


def enable(setting: str | None = None) -> str | None:
    """Point JAX's persistent compilation cache at `setting` (a folder; "off" disables it; None: $PBE_JAX_COMPILE_CACHE,
    then $JAX_COMPILATION_CACHE_DIR, then `default_folder()`). Returns the folder used, or None when off."""
    import jax

    setting = setting or os.environ.get(ENV) or os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_folder()
    if setting == "off":
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", setting)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # JAX keeps only programs that took ≥ 1 s to compile; the many small ones a run starts with add up.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return setting
