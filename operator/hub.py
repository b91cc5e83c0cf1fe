"""An hf:// model's facts from the Hugging Face Hub, without its weights.

Kilobytes, never the weights: the repository's file list and commit (one API call), the small
JSON configs (config.json, tokenizer_config.json, generation_config.json, the safetensors
index) into a temporary folder, and each safetensors file's header through a range request
(`HfApi.parse_safetensors_file_metadata`: the first 100 kB, and the rest of the header only
when it is longer). The weight files chosen are the ones `brim serve` loads
(`brim.runtime.planner.facts.safetensors_files`): the shards the index names, else every
top-level *.safetensors but `consolidated*` ones beside others.

huggingface_hub only (the operator image has no torch, no transformers).
"""

from __future__ import annotations

import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from brim.runtime.planner.facts import CheckpointFacts, TensorInfo, safetensors_index_files

# One FactsError for every source of facts: the reconciler tells "cannot be read, change the
# spec" (FactsError) from "try again" (HubUnavailable, an OSError) by class.
from brim.operator.facts import FactsError

__all__ = ["FactsError", "HubFacts", "HubUnavailable", "hub_facts", "read_hub_facts"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
# Headers read at once (one range request each): a 70B model has ~30 shards.
_MAX_PARALLEL_HEADERS = 8


class HubUnavailable(ConnectionError):
    """The Hub could not be reached or failed (network, 5xx): try again later."""


class HubFacts(NamedTuple):
    """What `read_hub_facts` read: the facts, and the commit the revision resolved to (None
    when the Hub did not say). Unpacks as `facts, commit = read_hub_facts(...)`."""

    facts: CheckpointFacts
    commit: str | None


def hub_facts(repo: str, *, revision: str | None, token: str | None,
              endpoint: str | None = None) -> CheckpointFacts:
    """The facts of Hub repository `repo` at `revision`; see `read_hub_facts`, which also
    gives the commit they were read at."""
    return read_hub_facts(repo, revision=revision, token=token, endpoint=endpoint).facts


def read_hub_facts(repo: str, *, revision: str | None, token: str | None,
                   endpoint: str | None = None) -> HubFacts:
    """The facts of Hub repository `repo` (<org>/<name>) at `revision` (default branch if None),
    and the commit that revision resolved to.

    token: the repository's access token (spec.model.tokenSecretRef). None sends none — not
        the operator's own HF_TOKEN: a ModelDeployment reads only what its own Secret allows.
    endpoint: the Hub (default: $HF_ENDPOINT as it is now, else huggingface.co; huggingface_hub
        itself reads the variable only once, at import).
    Every file is read at the one commit the revision resolved to, so a branch moving
    meanwhile cannot mix two commits' files.
    Raises FactsError (no such repository or revision, gated or private without a token that
    can read it, no config.json, no safetensors weights) or HubUnavailable.
    """
    import os

    from huggingface_hub import HfApi

    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    asked = f"hf://{repo}" + (f" at revision {revision}" if revision else "")
    where = endpoint or "the Hugging Face Hub"
    api = HfApi(endpoint=endpoint, token=token or False)
    try:
        info = api.model_info(repo, revision=revision)
        commit = info.sha
        at = commit or revision
        files = {s.rfilename for s in info.siblings or ()}
        if "config.json" not in files:
            raise FactsError(f"{asked} has no config.json, so brim cannot tell what model it "
                             "is; use a Hugging Face transformers repository (config.json, "
                             "*.safetensors, tokenizer), or give spec.model.config inline")
        # Without an index, the listing says which weights there are: refuse before reading.
        weights = None if SAFETENSORS_INDEX in files else _weight_files(files, None, asked)
        with tempfile.TemporaryDirectory(prefix="brim-hub-") as cache:
            def read_json(name: str) -> dict | None:
                if name not in files:
                    return None
                return json.loads(Path(api.hf_hub_download(
                    repo, name, revision=at, cache_dir=cache)).read_text())

            config = read_json("config.json")
            tokenizer_config = read_json("tokenizer_config.json")
            generation_config = read_json("generation_config.json")
            index = read_json(SAFETENSORS_INDEX)
        weights = weights or _weight_files(files, index, asked)
        with ThreadPoolExecutor(min(_MAX_PARALLEL_HEADERS, len(weights))) as pool:
            headers = list(pool.map(
                lambda name: api.parse_safetensors_file_metadata(repo, name, revision=at),
                weights))
    except FactsError:
        raise
    except Exception as exc:
        raise _explain(exc, asked, where) from None
    tensors = tuple(TensorInfo(name, t.dtype, tuple(t.shape))
                    for header in headers for name, t in header.tensors.items())
    facts = CheckpointFacts(config=config, tokenizer_config=tokenizer_config,
                            generation_config=generation_config, tensors=tensors)
    return HubFacts(facts, commit)


def _weight_files(files: set[str], index: dict | None, asked: str) -> list[str]:
    """The safetensors files `brim serve` would load from this repository."""
    if index is not None:
        shards = safetensors_index_files(json.dumps(index))
        missing = [name for name in shards if name not in files]
        if missing:
            raise FactsError(f"{asked}: {SAFETENSORS_INDEX} names {', '.join(missing)}, which "
                             "the repository lacks; the checkpoint is incomplete")
        return shards
    safetensors = sorted(f for f in files if "/" not in f and f.endswith(".safetensors"))
    weights = [f for f in safetensors if not f.startswith("consolidated")] or safetensors
    if not weights:
        others = sorted(f for f in files if "/" not in f
                        and f.endswith((".bin", ".pt", ".pth", ".gguf", ".onnx")))
        found = f" (it has {', '.join(others[:4])})" if others else ""
        raise FactsError(f"{asked} has no *.safetensors weights{found}; brim serves "
                         "safetensors checkpoints only: use a repository that has them")
    return weights


def _explain(exc: Exception, asked: str, where: str) -> Exception:
    """A huggingface_hub error as what was asked, why it failed and what to change."""
    import httpx2
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError, SafetensorsParsingError)

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError):
        why = ("the token of spec.model.tokenSecretRef has no access to it" if status == 403
               else "no token was given")
        return FactsError(f"{asked} is gated and {why}: accept its terms on the model's page "
                          "with a Hugging Face account, and set spec.model.tokenSecretRef to a "
                          "Secret holding that account's token")
    if isinstance(exc, RepositoryNotFoundError) or (
            isinstance(exc, HfHubHTTPError) and status in (401, 403)):
        return FactsError(f"{asked}: no such repository on {where}, or it is private; check "
                          "spec.model.uri, and for a private repository set "
                          "spec.model.tokenSecretRef to a Secret holding a token that can "
                          "read it")
    if isinstance(exc, RevisionNotFoundError):
        return FactsError(f"{asked}: the repository has no such revision; set "
                          "spec.model.revision to one of its branches, tags or commits")
    if isinstance(exc, SafetensorsParsingError):
        return FactsError(f"{asked}: a safetensors header cannot be read ({exc}); the "
                          "checkpoint is corrupt")
    if isinstance(exc, json.JSONDecodeError):
        return FactsError(f"{asked}: a JSON config is not valid JSON ({exc})")
    if isinstance(exc, (httpx2.TransportError, HfHubHTTPError, ConnectionError)):
        return HubUnavailable(f"{asked}: {where} could not be read ({type(exc).__name__}: "
                              f"{exc}); will try again")
    return exc
