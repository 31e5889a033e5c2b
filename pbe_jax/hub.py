"""Hugging Face Hub repositories: download just what the loaders read, whatever format it was published in.

`download("org/name")` lists the repository's files, then fetches only what is needed:

- **A pipeline** (`model_index.json` at the root: diffusers' layout, or this project's checkpoint): the root's
  configs, and for each component folder (`unet/`, `vae/`, `image_encoder/`, `scheduler/`, …) its configs
  (`*.json`, `*.txt`) plus its weights under the names the loader reads (`pbe_jax.convert.weights.find_weights`):
  the safetensors files where the folder has them, else its PyTorch pickles (`pytorch_model.bin`,
  `diffusion_pytorch_model.bin`, sharded `*.bin.index.json` + shards), never both. The pickles are later read
  only with `torch.load(weights_only=True)`. With a `variant` ("fp16": `diffusion_pytorch_model.fp16.safetensors`)
  a folder's variant files are taken where it has them, else its plain ones (as diffusers does).
- **A single component** (`config.json` and weights at the root, no `model_index.json`): the root as above.
- **A single file** (no `model_index.json`; a `*.ckpt` or `*.safetensors` at the root, like an original
  Stable-Diffusion-style release): that file, preferring `.safetensors`, and among several an EMA one; the path
  of the file is returned. Several equally good candidates are an error that lists them.

Downloads go through huggingface_hub's cache (`HF_HOME`, `HF_HUB_CACHE`), so a second call fetches nothing.
When the Hub cannot be reached (no network, `HF_HUB_OFFLINE=1`) a repository already in the cache is used
from there. Every failure is a `HubError` (a `FileNotFoundError`) that names the repository and says why.

huggingface_hub is imported only when a download is asked for.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Iterable

from pbe_jax import storage
from pbe_jax.convert.weights import SINGLE_FILE_SUFFIXES

INDEX_FILES = ("model_index.json",)  # a pipeline (diffusers' and this project's checkpoint alike)
CONFIG_SUFFIXES = (".json", ".txt")
WEIGHT_FORMATS = ("safetensors", "bin")  # in order of preference; a folder gets one of them, never both
_SHARD = re.compile(r"-\d{5}-of-\d{5}")
_EMA = re.compile(r"(?:^|[^a-z])ema")
_NON_EMA = re.compile(r"non[-_.]?ema")


class HubError(FileNotFoundError):
    """A Hub repository that cannot be downloaded or holds nothing this project can load; the message names
    the repository and the reason."""


def weight_kind(name: str) -> tuple[str, str, str | None] | None:
    """(base name, format, variant) of a weight file or shard index name, e.g.
    "diffusion_pytorch_model.fp16.safetensors" → ("diffusion_pytorch_model", "safetensors", "fp16");
    shard indexes in both spellings ("model.safetensors.index.fp16.json", "model.fp16.safetensors.index.json")
    and shards ("model-00001-of-00002.fp16.safetensors", "pytorch_model.fp16-00001-of-00002.bin") included.
    None for any other file."""
    parts = _SHARD.sub("", name.rsplit("/", 1)[-1]).split(".")
    base, tokens = parts[0], parts[1:]
    fmt = next((f for f in WEIGHT_FORMATS if f in tokens), None)
    if fmt is None or not (tokens[-1] == fmt or (tokens[-1] == "json" and "index" in tokens)):
        return None
    rest = [t for t in tokens if t not in (fmt, "index", "json")]
    return base, fmt, ".".join(rest) or None


def _loader_names() -> tuple[str, ...]:
    """The weight base names `pbe_jax.convert` reads: diffusers', transformers' and this project's own."""
    from pbe_jax.convert.diffusers import PARAMS_FILE
    from pbe_jax.convert.weights import WEIGHT_NAMES

    return (*WEIGHT_NAMES, PARAMS_FILE.split(".")[0])


def _folder_files(names: list[str], variant: str | None) -> tuple[list[str], str | None]:
    """Configs and chosen weights among the files `names` of one folder (full repository paths), and when a
    folder with a config has no weights to take, why not (None when fine)."""
    known = _loader_names()
    kinds = {n: weight_kind(n) for n in names}
    configs = [n for n in names if kinds[n] is None and n.endswith(CONFIG_SUFFIXES)]
    weights = {n: k for n, k in kinds.items() if k is not None and k[0] in known}
    variants = {k[2] for k in weights.values()}
    use = variant if variant is not None and variant in variants else None
    chosen: list[str] = []
    for fmt in WEIGHT_FORMATS:
        chosen = sorted(n for n, (_, f, v) in weights.items() if f == fmt and v == use)
        if chosen:
            break
    problem = None
    if not chosen and any(n.rsplit("/", 1)[-1] == "config.json" for n in names):
        others = sorted(n.rsplit("/", 1)[-1] for n in names if n not in configs)
        if variants - {None}:
            have = sorted(v for v in variants if v)
            problem = (f"has weights only as variant(s) {', '.join(have)}"
                       + (f" (ask for one: variant={have[0]!r})" if variant is None else
                          f", neither {variant!r} nor plain ones"))
        else:
            problem = (f"has no weights this project reads ({', '.join(known[:-1])} as .safetensors or .bin, "
                       f"{known[-1]}.safetensors); it holds {', '.join(others) if others else 'only configs'}")
    return configs + chosen, problem


def _single_file(repo_id: str, root: list[str], variant: str | None) -> str:
    candidates = sorted(n for n in root if n.endswith(SINGLE_FILE_SUFFIXES))
    if not candidates:
        listed = ", ".join(sorted(root)[:20]) or "nothing"
        raise HubError(f"{repo_id}: nothing this project can load: no model_index.json (a diffusers pipeline), "
                       f"no config.json with weights (one component) and no *.safetensors, *.ckpt, *.pt or *.pth file at the "
                       f"root (a single-file checkpoint); the root holds {listed}")
    pick = candidates
    if variant is not None and any(f".{variant}." in n for n in pick):
        pick = [n for n in pick if f".{variant}." in n]
    pick = [n for n in pick if n.endswith(".safetensors")] or pick
    ema = [n for n in pick if _EMA.search(n.lower()) and not _NON_EMA.search(n.lower())]
    pick = ema or pick
    if len(pick) != 1:
        raise HubError(f"{repo_id}: a single-file repository with several checkpoints and no way to choose "
                       f"(preferring .safetensors, then an EMA one, leaves {', '.join(pick)}; all: "
                       f"{', '.join(candidates)}). Download the one you mean with "
                       f"huggingface_hub.hf_hub_download({repo_id!r}, FILENAME) and pass its path")
    return pick[0]


def select_files(repo_id: str, files: Iterable[str], *, variant: str | None = None,
                 components: Iterable[str] | None = None) -> tuple[list[str], str | None]:
    """What `download` fetches from a repository holding `files` (paths relative to its root): the file
    names, and the single file to return (None: return the folder). Pure; raises `HubError`."""
    files = sorted(set(files))
    root = [n for n in files if "/" not in n]
    folders: dict[str, list[str]] = {}
    for n in files:
        if n.count("/") == 1:
            folders.setdefault(n.split("/")[0], []).append(n)
    if not any(n in root for n in INDEX_FILES):
        if "config.json" in root:  # one component (config + weights at the root)
            chosen, problem = _folder_files(root, variant)
            if problem:
                raise HubError(f"{repo_id}: the repository {problem}")
            return chosen, None
        single = _single_file(repo_id, root, variant)
        return [single], single
    wanted = set(folders) if components is None else set(components)
    chosen = [n for n in root if weight_kind(n) is None and n.endswith(CONFIG_SUFFIXES)]
    problems = []
    for name in sorted(wanted & set(folders)):
        names, problem = _folder_files(folders[name], variant)
        chosen += names
        if problem:
            problems.append(f"{name}/ {problem}")
    if problems:
        raise HubError(f"{repo_id}: a component without loadable weights: {'; '.join(problems)}")
    if not any(weight_kind(n) for n in chosen):
        raise HubError(f"{repo_id}: a pipeline without weights this project reads (component folders: "
                       f"{', '.join(sorted(folders)) or 'none'})")
    return chosen, None


def _is_missing(e: Exception) -> bool:
    """A definite answer from the Hub (no such repository/revision, gated, disabled), not a failure to ask."""
    from huggingface_hub import errors

    return isinstance(e, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.DisabledRepoError,
                          errors.HFValidationError))


def _why_missing(repo_id: str, revision: str | None, e: Exception) -> str:
    from huggingface_hub import errors

    if isinstance(e, errors.HFValidationError):
        return f"not a valid Hub repository id ({e})"
    if isinstance(e, errors.GatedRepoError):
        return ("a gated repository: accept its conditions on its Hub page and log in "
                "(`hf auth login`, or set HF_TOKEN)")
    if isinstance(e, errors.RevisionNotFoundError):
        return f"the repository has no revision {revision!r}"
    if isinstance(e, errors.DisabledRepoError):
        return "the repository has been disabled on the Hub"
    return ("no such repository on the Hub (or it is private and you are not logged in: `hf auth login`, or "
            "set HF_TOKEN)")


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _cached(hf, repo_id: str, revision: str | None, reason: str) -> tuple[storage.Path, list[str]]:
    """The cached snapshot of the repository and its files, when the Hub cannot be asked."""
    try:
        folder = storage.path(hf.snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError: never downloaded (or another revision)
        raise HubError(f"{repo_id}: cannot reach the Hugging Face Hub ({reason}) and the repository is not in "
                       f"the local cache ({hf.constants.HF_HUB_CACHE}; {type(e).__name__})") from e
    files = [os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs]
    return folder, [f.replace(os.sep, "/") for f in files]


def download(repo_id: str, *, variant: str | None = None, revision: str | None = None,
             components: Iterable[str] | None = None) -> storage.Path:
    """Download Hub repository `repo_id` ("org/name") as described in this module's docstring and return
    the local folder (a pipeline or component repository) or file (a single-file repository).

    `variant`: weight variant ("fp16"); `revision`: a branch, tag or commit (default: the main branch);
    `components`: the component folders to fetch (default: all), e.g. to skip a pipeline's safety checker."""
    try:
        import huggingface_hub as hf
    except ImportError as e:
        raise HubError(f"{repo_id}: downloading a Hub repository needs huggingface_hub "
                       f"(pip install huggingface_hub)") from e
    try:
        info = hf.HfApi().model_info(repo_id, revision=revision)
    except Exception as e:
        if _is_missing(e):
            raise HubError(f"{repo_id}: {_why_missing(repo_id, revision, e)}") from e
        folder, files = _cached(hf, repo_id, revision, _reason(e))  # offline: what an earlier call fetched
        try:
            names, single = select_files(repo_id, files, variant=variant, components=components)
        except HubError as bad:
            raise HubError(f"{repo_id}: cannot reach the Hugging Face Hub ({_reason(e)}), and its copy in the "
                           f"local cache ({folder}) is not enough: {str(bad).removeprefix(repo_id + ': ')}") from e
        return folder / single if single else folder
    files = [s.rfilename for s in info.siblings or []]
    names, single = select_files(repo_id, files, variant=variant, components=components)
    try:
        # The revision as asked (not the listed commit), so that the cache records the branch and the offline
        # fallback above finds it; a file changed in between fails the check below.
        folder = storage.path(hf.snapshot_download(repo_id, revision=revision,
                                                   allow_patterns=[glob.escape(n) for n in names]))
    except Exception as e:  # the connection lost part-way, disk full, ...
        raise HubError(f"{repo_id}: downloading {len(names)} file(s) from the Hub failed ({_reason(e)})") from e
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise HubError(f"{repo_id}: the download left out {', '.join(missing)} (in {folder})")
    return folder / single if single else folder


__all__ = ["HubError", "download", "select_files", "weight_kind"]
