"""Models from the Hugging Face Hub: `hf://<org>/<name>` (or a bare `<org>/<name>`) to a folder.

`resolve_model` downloads only what brim loads — config, generation config, tokenizer files and
the safetensors weights the loader reads — into the Hub's cache (`$HF_HOME/hub`), and returns
the snapshot folder, which is an ordinary checkpoint folder. Pickled or foreign weights
(.bin, .pt, .gguf, .onnx) are never fetched, nor Mistral's `consolidated.safetensors` beside
Hugging Face shards.

huggingface_hub is imported inside the functions: `brim plan` and the CLI dispatcher import
this module's callers without it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HF_SCHEME = "hf://"
# <org>/<name> as the Hub spells repository ids (the CRD's hf:// pattern).
_REPO_ID = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9._]{0,95}/[A-Za-z0-9][-A-Za-z0-9._]{0,95}$")

# Files beside the weights that brim reads: config, generation defaults, the tokenizer in any
# of its forms (fast tokenizer.json, SentencePiece tokenizer.model, BPE vocab + merges) and
# the chat template (inside tokenizer_config.json or in a file of its own).
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Weight formats brim does not load: named in errors so users know why a repo is refused.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".gguf", ".onnx", ".msgpack", ".h5")


def hub_repo_id(model: str | os.PathLike) -> str | None:
    """The repository id `model` names (`hf://org/name` or `org/name`), else None.

    A bare `org/name` names a repository only when no such path exists on this machine.
    """
    text = os.fspath(model)
    if text.startswith(HF_SCHEME):
        return text[len(HF_SCHEME):]
    if _REPO_ID.match(text) and not Path(text).exists():
        return text
    return None


def served_model_name(model: str | os.PathLike, path: Path) -> str:
    """The name a model answers to by default: its repository id, else its folder's name."""
    return hub_repo_id(model) or path.name


def resolve_model(
    model: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | None = None,
) -> Path:
    """A checkpoint folder for `model`: a local folder as is, a Hub repository downloaded.

    model: a folder on this machine, `hf://<org>/<name>`, or `<org>/<name>` when no such path
        exists here.
    revision: branch, tag or commit of a Hub repository (default: its default branch).
    token: Hub access token for gated or private repositories (default: $HF_TOKEN or the
        token `hf auth login` stored).
    cache_dir: the Hub cache (default: $HF_HUB_CACHE, else $HF_HOME/hub).

    The Hub is $HF_ENDPOINT (default https://huggingface.co). Offline ($HF_HUB_OFFLINE=1, or
    the Hub unreachable), a repository already in the cache is served from it.
    Raises FileNotFoundError (no such folder or repository, or offline and not cached) or
    ValueError (gated, unknown revision, no safetensors weights), each saying what to do.
    """
    text = os.fspath(model)
    repo_id = hub_repo_id(text)
    if repo_id is None:
        path = Path(text).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"model {text!r}: no such folder, and not a Hugging Face repository id; pass a "
                "checkpoint folder (config.json, *.safetensors, tokenizer) or hf://<org>/<name>")
        if revision is not None:
            raise ValueError(f"revision {revision!r} applies to Hugging Face repositories, but "
                             f"model {text!r} is a local folder; drop the revision")
        return path
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"model {text!r}: {repo_id!r} is not a repository id; write "
                         "hf://<org>/<name>, e.g. hf://HuggingFaceTB/SmolLM2-135M-Instruct")
    asked = text + (f" (revision {revision})" if revision else "")
    if not text.startswith(HF_SCHEME):
        asked += f" (no folder {text!r} here, so a Hugging Face repository)"
    return _download(repo_id, revision, token, _hub_cache_dir(cache_dir), _hub_endpoint(), asked)


# -- huggingface_hub's settings, read when asked ----------------------------------------------
# huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, when it is first
# imported (transformers imports it early); these read them when a model is resolved, so a
# process that sets them later is honoured. HF_TOKEN the library reads at each call itself.


def _hub_endpoint() -> str | None:
    endpoint = os.environ.get("HF_ENDPOINT")
    return endpoint.rstrip("/") if endpoint else None


def _hub_cache_dir(cache_dir: str | None) -> str:
    if cache_dir:
        return cache_dir
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return os.path.expanduser(os.environ[name])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _is_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.upper() in ("1", "ON", "YES", "TRUE") or constants.is_offline_mode()


# -- which files, and the download --------------------------------------------------------------


def checkpoint_files(repo_files: list[str], index_json: str | None = None) -> list[str]:
    """The files of a repository brim needs, from its file list (and its safetensors index).

    Weights follow `brim.runtime.planner.facts.safetensors_files`: the shards the index names,
    else every top-level *.safetensors but `consolidated*` ones when others exist.
    Raises ValueError when the repository has no safetensors weights.
    """
    top_level = {f for f in repo_files if "/" not in f}
    if index_json is not None:
        from brim.runtime.planner.facts import safetensors_index_files

        weights = safetensors_index_files(index_json) + [SAFETENSORS_INDEX]
    else:
        safetensors = sorted(f for f in top_level if f.endswith(".safetensors"))
        weights = [f for f in safetensors if not f.startswith("consolidated")] or safetensors
    if not any(f.endswith(".safetensors") for f in weights):
        others = sorted(f for f in top_level if f.endswith(_OTHER_WEIGHTS))
        found = f"it has {', '.join(others[:4])}{', ...' if len(others) > 4 else ''}" \
            if others else "it has no weights brim can load"
        raise ValueError(
            f"no *.safetensors weights: {found}. brim loads safetensors only; use a repository "
            "that has them, or convert the weights with transformers' "
            "save_pretrained(safe_serialization=True) and serve that folder")
    missing = [f for f in weights if f not in top_level]
    if missing:
        raise ValueError(f"{SAFETENSORS_INDEX} names {', '.join(missing)}, which the repository "
                         "lacks; the checkpoint is incomplete")
    return sorted({*(f for f in CHECKPOINT_FILES if f in top_level), *weights})


def _download(repo_id: str, revision: str | None, token: str | None, cache_dir: str,
              endpoint: str | None, asked: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        try:
            if _is_offline():
                raise _Offline("HF_HUB_OFFLINE is set")
            files = _remote_files(repo_id, revision, token, cache_dir, endpoint)
        except _Offline as offline:
            files = _cached_files(repo_id, revision, cache_dir, asked, offline)
            path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                     allow_patterns=files, local_files_only=True)
        else:
            path = snapshot_download(repo_id, revision=revision, token=token,
                                     cache_dir=cache_dir, endpoint=endpoint,
                                     allow_patterns=files)
    except Exception as exc:
        raise _explain(exc, asked, endpoint or "https://huggingface.co") from None
    return Path(path)


class _Offline(Exception):
    """The Hub cannot be asked: offline mode, or unreachable."""


def _remote_files(repo_id: str, revision: str | None, token: str | None, cache_dir: str,
                  endpoint: str | None) -> list[str]:
    """The files to download, from the repository's listing (and its safetensors index,
    fetched into the cache, where the snapshot then finds it)."""
    import httpx2
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision)
    except (httpx2.ConnectError, httpx2.TimeoutException, OfflineModeIsEnabled) as exc:
        raise _Offline(f"{type(exc).__name__}: {exc}") from exc
    repo_files = [s.rfilename for s in info.siblings or ()]
    index = None
    if SAFETENSORS_INDEX in repo_files:
        index = Path(hf_hub_download(repo_id, SAFETENSORS_INDEX, revision=info.sha or revision,
                                     token=token, cache_dir=cache_dir,
                                     endpoint=endpoint)).read_text()
    return checkpoint_files(repo_files, index)


def _cached_files(repo_id: str, revision: str | None, cache_dir: str, asked: str,
                  offline: _Offline) -> list[str]:
    """The files to take from the cache, from the listing a previous download cached."""
    from huggingface_hub import get_cached_repo_tree, hf_hub_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        tree = get_cached_repo_tree(repo_id, revision=revision, cache_dir=cache_dir)
    except CachedRepoTreeNotFoundError:
        raise FileNotFoundError(
            f"{asked}: the Hub cannot be reached ({offline}) and the model is not in the cache "
            f"{cache_dir}. Connect to the Hub (check HF_ENDPOINT, unset HF_HUB_OFFLINE) or "
            "pass a local checkpoint folder") from None
    repo_files = [f.path for f in tree]
    index = None
    if SAFETENSORS_INDEX in repo_files:
        index = Path(hf_hub_download(repo_id, SAFETENSORS_INDEX, revision=revision,
                                     cache_dir=cache_dir, local_files_only=True)).read_text()
    return checkpoint_files(repo_files, index)


def _explain(exc: Exception, asked: str, where: str) -> Exception:
    """A huggingface_hub error as what was asked, why it failed and what to do."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    if isinstance(exc, GatedRepoError):
        why = ("the token given has no access" if _status(exc) == 403
               else "no token was given")
        return ValueError(f"{asked} is gated on {where} and {why}: accept its terms on the "
                          "model's page, then set HF_TOKEN to a token of that account")
    if isinstance(exc, RepositoryNotFoundError):
        return FileNotFoundError(
            f"{asked}: no such repository on {where}; check the name, and if the repository "
            "is private set HF_TOKEN to a token that can read it")
    if isinstance(exc, RevisionNotFoundError):
        return ValueError(f"{asked}: the repository has no such revision; pass one of its "
                          "branches, tags or commit hashes")
    if isinstance(exc, LocalEntryNotFoundError):
        return FileNotFoundError(
            f"{asked}: the download failed and the cache cannot complete it ({exc}); check "
            "the connection to the Hub (HF_ENDPOINT) and try again")
    if isinstance(exc, HfHubHTTPError):
        return ValueError(f"{asked}: {where} answered {_status(exc)}: {exc}")
    if isinstance(exc, ValueError):
        return ValueError(f"{asked}: {exc}")  # checkpoint_files' refusals
    return exc


def _status(exc) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)
