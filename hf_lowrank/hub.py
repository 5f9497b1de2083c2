"""Push and pull adapters on the Hugging Face Hub: only the adapter files travel, in one commit.

    push_adapter(folder_or_model, "user/repo")      create_repo(exist_ok) → create_branch (when a revision is new)
                                                     → ONE upload_folder commit of the allow-list below
    pull_adapter("user/repo", revision="main")      snapshot_download of the allow-list into the Hub cache
                                                     (HF_HUB_OFFLINE=1: from the cache only, no network)

Everything goes through `huggingface_hub`, so `HF_ENDPOINT`, `HF_TOKEN`, `HF_HOME` / `HF_HUB_CACHE` and
`HF_HUB_OFFLINE` work as everywhere else; `endpoint=` overrides the endpoint per call. Every failure the user can
fix (repo or revision not found, no token or a rejected one, someone else's private repo or namespace, server
unreachable) becomes one `HubError` that names the repo and says what to do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from .format import ADAPTER_FILES, CARD_NAME, CONFIG_NAME, TRAINING, WEIGHTS_NAME, AdapterError, header_json
from .state import read_adapter, save_adapter

logger = logging.getLogger("hf_lowrank")


class HubError(RuntimeError):
    """A Hub operation that failed for a reason the user can fix; the message names the repo and the fix."""


# ---- errors ---------------------------------------------------------------------------------------------------------


def _endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's "could not talk to the server" exceptions (huggingface_hub 1.x uses httpx, 2.x httpx2)."""
    errors: list[type[BaseException]] = []
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            errors.append(__import__(name).TransportError)
    return tuple(errors)


def _offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as set since (a notebook cell, a test)."""
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _where(repo_id: str, revision: str | None) -> str:
    return f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")


def _translate(e: BaseException, repo_id: str, revision: str | None, endpoint: str, action: str) -> HubError | None:
    """The `HubError` for a huggingface_hub / transport exception, or None for one we do not recognise."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        LocalTokenNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = _where(repo_id, revision)
    login = "set HF_TOKEN or run `hf auth login`"
    if isinstance(e, LocalTokenNotFoundError):
        return HubError(f"cannot {action} {where}: no Hugging Face token found; {login} (a token with write access "
                        "is needed to push).")
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"cannot {action} {where}: repo {repo_id!r} on {endpoint} has no revision {revision!r}. Use an "
                        "existing branch, tag or commit (`huggingface_hub.list_repo_refs` lists them), or omit "
                        "--revision for main.")
    if isinstance(e, GatedRepoError):
        return HubError(f"cannot {action} {where}: {repo_id!r} is gated; accept its conditions on its page on "
                        f"{endpoint}, then {login}.")
    if isinstance(e, RepositoryNotFoundError):
        return HubError(f"cannot {action} {where}: repo {repo_id!r} was not found on {endpoint}, or it is private and "
                        f"this token cannot read it. Check the repo id; for a private repo, {login} with a token of an "
                        "account that has access.")
    if isinstance(e, RemoteEntryNotFoundError):
        return HubError(f"cannot {action} {where}: the repo has no {CONFIG_NAME}/{WEIGHTS_NAME}; it is not an "
                        "adapter repo (push one with `hf-lowrank push DIR REPO`).")
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        status = e.response.status_code
        server_says = e.response.headers.get("X-Error-Message") or ""
        if status == 401:
            return HubError(f"cannot {action} {where}: {endpoint} rejected the token ({server_says or '401'}). It is "
                            f"invalid, expired or lacks the needed scope; create a new one, then {login}.")
        if status == 403:
            return HubError(f"cannot {action} {where}: this token may not write to {repo_id!r} "
                            f"({server_says or '403'}). Push to your own namespace ('<your-user>/<name>'), or ask "
                            "the owner for write access and use a token with write scope.")
        if status == 400:
            return HubError(f"cannot {action} {where}: {endpoint} refused the request: {server_says or e}")
    if isinstance(e, _transport_errors()) or (isinstance(e, LocalEntryNotFoundError) and not _offline()):
        return HubError(f"cannot {action} {where}: {endpoint} is unreachable ({type(e).__name__}). Check the network, "
                        "proxy and HF_ENDPOINT; adapters pulled before still load with HF_HUB_OFFLINE=1.")
    if isinstance(e, LocalEntryNotFoundError):
        return HubError(f"cannot {action} {where}: HF_HUB_OFFLINE=1 and it is not in the local Hub cache. Pull it "
                        "once with network access (`hf-lowrank pull REPO`), or unset HF_HUB_OFFLINE.")
    if isinstance(e, ValueError) and "README.md" in str(e):
        return HubError(f"cannot {action} {where}: the Hub rejected README.md's metadata: {e}. Fix its YAML front "
                        f"matter, or delete it to let hf_lowrank write a model card.")
    return None


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None, endpoint: str | None, action: str):
    try:
        yield
    except HubError:
        raise
    except Exception as e:
        err = _translate(e, repo_id, revision, _endpoint(endpoint), action)
        if err is None:
            raise
        raise err from e


# ---- push -----------------------------------------------------------------------------------------------------------


def _card_text(files, published: dict[str, Any], metadata: dict[str, str], repo_id: str,
               revision: str | None) -> str | None:
    """The README.md to push: ours, written for the published config, unless the user wrote or edited the card."""
    from .card import model_card

    training = header_json(files.metadata, TRAINING)
    card = files.folder / CARD_NAME
    if card.is_file():
        current = card.read_text(encoding="utf-8", errors="replace")
        generated = model_card(files.peft_config, files.metadata, training)
        if current != generated:
            return None  # the user's own card (or one edited by hand, or by the Trainer): push it as it is
    return model_card(published, metadata, training, repo_id=repo_id, revision=revision)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Stage `src` as it is now, never what a link points to: a hard link to the folder's entry itself, or a copy
    through a descriptor opened without following links. An entry swapped for a symlink (or anything but a
    regular file) after `check_regular_files` is refused here, so no link's target can be uploaded."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # another file system (or no hard links): copy
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # ELOOP on a link; no wait on a FIFO
        except OSError:
            raise _not_regular(src) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise _not_regular(src) from None
        with os.fdopen(fd, "rb") as f, open(dst, "xb") as out:
            shutil.copyfileobj(f, out)
    else:  # the link is to the entry: a symlink (or FIFO, folder) stays one, refused here
        if not stat.S_ISREG(os.lstat(dst).st_mode):
            os.unlink(dst)
            raise _not_regular(src)


def _not_regular(path: Path) -> HubError:
    try:
        what = f"a symlink to {os.readlink(path)!r}" if path.is_symlink() else \
            "not a regular file" if os.path.lexists(path) else "gone (removed while the push ran)"
    except OSError:  # changed again since
        what = "not a regular file"
    return HubError(f"refusing to push {path}: it is {what}. Only regular files inside the adapter folder are "
                    "uploaded; copy the real file there (e.g. `hf-lowrank pull REPO --output DIR` for an adapter in "
                    "the Hub cache).")


def check_regular_files(folder: Path) -> None:
    """Refuse (naming it) any adapter file of `folder` that is a symlink, not a regular file, or not inside it:
    a push uploads only what really lives in the folder (a README.md linking to a private key must not leave)."""
    real = folder.resolve()
    for name in ADAPTER_FILES:
        path = folder / name
        if not os.path.lexists(path):
            continue
        if path.is_symlink() or not path.is_file() or path.resolve().parent != real:
            raise _not_regular(path)


def published_base(files, base_model: str | None = None) -> str | None:
    """The Hub id published as the adapter's base: `base_model`, else the recorded base when it is a Hub id (or a
    folder of the Hub cache, whose id its name holds); None when only a local path is known (never published)."""
    from .format import cached_repo, hub_model_id

    if base_model is not None:
        if not hub_model_id(base_model):
            raise HubError(f"--base-model {base_model!r} is not a Hub model id ('org/name'); give the id of the base "
                           "on the Hub, never a local path")
        return base_model
    recorded = files.base_model or ""
    if hub_model_id(recorded):
        return recorded
    parts = recorded.replace(os.sep, "/").rstrip("/").split("/")
    cached = cached_repo(parts)  # the snapshot folder itself: <models--org--name>/snapshots/<revision>
    return cached[2] if cached and cached[1] == "models" and cached[0] == len(parts) - 2 else None


def publish_in_place(folder: str | os.PathLike, base_model: str | None = None) -> None:
    """Rewrite the adapter files of `folder` to name the published base (see `published_base`) instead of a local
    path, for folders that another uploader (the Trainer's pushes) sends as they are. A no-op when nothing
    local is recorded."""
    from .format import BASE_MODEL
    from .state import write_adapter_files

    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        return
    files = read_adapter(folder)
    base = published_base(files, base_model)
    if files.peft_config.get("base_model_name_or_path") == base and files.metadata.get(BASE_MODEL, "") in ("", base):
        return
    if base is None:
        logger.warning("hf_lowrank: %s records the local base %r, which is not published; the pushed config names no "
                       "base", folder, files.base_model)
    training = header_json(files.metadata, TRAINING)
    write_adapter_files(folder, files.tensors, {**files.metadata, BASE_MODEL: base or ""},
                        {**files.peft_config, "base_model_name_or_path": base}, training)


def _stage(files, staging: Path, repo_id: str, revision: str | None, base_model: str | None = None) -> list[str]:
    """Fill `staging` with what is published: the adapter files (hard links, or rewritten where they record a
    local base path) and the card; returns the names staged."""
    from .format import BASE_MODEL

    folder, names = files.folder, []
    base = published_base(files, base_model)
    recorded = files.base_model
    if base is None and recorded:
        logger.warning("hf_lowrank: the adapter's base %r is a local path, which is not published; the pushed "
                       "config names no base. Pass --base-model ORG/NAME (push_adapter(base_model=...)).", recorded)
    published = {**files.peft_config, "base_model_name_or_path": base}
    metadata = dict(files.metadata)
    if metadata.get(BASE_MODEL) and metadata[BASE_MODEL] != (base or ""):  # headers of older versions: a local path
        metadata[BASE_MODEL] = base or ""
    if metadata == files.metadata:
        _link_or_copy(folder / WEIGHTS_NAME, staging / WEIGHTS_NAME)
    else:
        from safetensors.torch import save_file

        save_file(files.tensors, str(staging / WEIGHTS_NAME), metadata=metadata)  # same tensors and checksums
    if published == files.peft_config:
        _link_or_copy(folder / CONFIG_NAME, staging / CONFIG_NAME)
    else:
        (staging / CONFIG_NAME).write_text(json.dumps(published, indent=2, sort_keys=True) + "\n")
    names += [WEIGHTS_NAME, CONFIG_NAME]
    if (folder / CARD_NAME).is_file():
        _link_or_copy(folder / CARD_NAME, staging / CARD_NAME)
        names.append(CARD_NAME)
    card = _card_text(files, published, metadata, repo_id, revision)
    if card is not None:
        with contextlib.suppress(FileNotFoundError):
            (staging / CARD_NAME).unlink()
        (staging / CARD_NAME).write_text(card, encoding="utf-8")
        names = sorted(set(names) | {CARD_NAME})
    return names


def push_adapter(dir_or_model: Any, repo_id: str, *, private: bool = False, revision: str | None = None,
                 commit_message: str | None = None, token: str | None = None, create_pr: bool = False,
                 endpoint: str | None = None, base_model: str | None = None):
    """Push an adapter (a saved folder, or a model with hf_lowrank adapters) to `repo_id` in ONE commit.

    Only `adapter_model.safetensors`, `adapter_config.json` and `README.md` are uploaded, and only as regular files
    inside the folder (a symlink is refused); a model card is written when the folder has none (and ours is
    refreshed to name the repo). The base is published as a Hub id (`base_model`, else the one recorded at load),
    never as a local path. The repo is created when missing (`private`
    applies then); `revision` is a branch, created from main when missing; `create_pr=True` opens a pull request
    against main instead of committing to it. Returns huggingface_hub's `CommitInfo` (`.oid`, `.commit_url`,
    `.pr_url`). Raises `HubError` naming the repo and the fix.
    """
    from huggingface_hub import HfApi, get_token

    if create_pr and revision not in (None, "main"):
        raise ValueError(f"push_adapter: create_pr=True opens a pull request against main; it cannot target "
                         f"revision {revision!r}. Pass one or the other.")
    if isinstance(dir_or_model, (str, os.PathLike)):  # the folder is checked before anything else happens
        folder = Path(dir_or_model)
        if not folder.is_dir():
            raise AdapterError(f"push_adapter: {folder} is not a folder; pass the folder save_adapter wrote "
                               f"({WEIGHTS_NAME} + {CONFIG_NAME}) or the model itself")
        check_regular_files(folder)  # before reading anything through a link
        files = read_adapter(folder)  # refuse to publish a broken adapter
    if _offline():
        raise HubError(f"cannot push to {_where(repo_id, revision)}: HF_HUB_OFFLINE=1 is set and a push needs the "
                       "network; unset HF_HUB_OFFLINE (or set it to 0) to push.")
    token = token or get_token()
    if not token:
        raise HubError(f"cannot push to {_where(repo_id, revision)}: no Hugging Face token found; set HF_TOKEN or run "
                       "`hf auth login` with a token that has write access.")
    with tempfile.TemporaryDirectory(prefix="hf-lowrank-push-") as tmp:
        if not isinstance(dir_or_model, (str, os.PathLike)):
            files = read_adapter(save_adapter(dir_or_model, Path(tmp) / "adapter"))
        staging = Path(tmp) / "staging"
        staging.mkdir()
        _stage(files, staging, repo_id, revision, base_model)
        api = HfApi(endpoint=endpoint, token=token)
        with _hub_errors(repo_id, revision, endpoint, "push to"):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.upload_folder(repo_id=repo_id, folder_path=staging, allow_patterns=list(ADAPTER_FILES),
                                     revision=revision, create_pr=create_pr,
                                     commit_message=commit_message or "Upload LoRA adapter with hf-lowrank")


# ---- pull -----------------------------------------------------------------------------------------------------------


def pull_adapter(repo_id: str, *, revision: str | None = None, token: str | None = None,
                 cache_dir: str | os.PathLike | None = None, endpoint: str | None = None) -> Path:
    """Download the adapter files of `repo_id` at `revision` (branch, tag or commit; default main) into the Hub cache.

    Returns the snapshot folder (only `adapter_model.safetensors`, `adapter_config.json`, `README.md`). A revision
    already in the cache is not downloaded again; with `HF_HUB_OFFLINE=1` only the cache is used. Files land in
    the cache atomically (huggingface_hub downloads to `.incomplete` then renames), so an interrupted pull leaves
    nothing half-written. Raises `HubError` naming the repo and the fix.
    """
    from huggingface_hub import snapshot_download

    with _hub_errors(repo_id, revision, endpoint, "pull"):
        folder = Path(snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                        allow_patterns=list(ADAPTER_FILES), endpoint=endpoint,
                                        local_files_only=_offline()))
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
    if missing:
        raise HubError(f"cannot pull {_where(repo_id, revision)}: the repo has no {' or '.join(missing)}; it is not an "
                       "adapter repo in PEFT's format (push one with `hf-lowrank push DIR REPO`).")
    return folder


def copy_adapter(folder: Path, output: str | os.PathLike) -> Path:
    """Copy the adapter files of `folder` into `output`, all or nothing (a staged sibling folder, then renames)."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise HubError(f"--output {out} is a file; give a folder (it is created when missing)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name in ADAPTER_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, staging / name)  # resolves the cache's symlinks
        if not out.exists():
            os.replace(staging, out)
            return out
        for name in ADAPTER_FILES:
            if (staging / name).is_file():
                os.replace(staging / name, out / name)
        return out
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def source_problem(name: str, revision: str | None = None, *, repo_type: str = "model", token: Any = None,
                   cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                   timeout: float = 10.0) -> str | None:
    """Why `name` (a model or dataset folder, or Hub repo id) cannot be loaded here, as a clause that follows the name
    ("is not a folder here, ..."); None when it can: a folder, a repo in the local Hub cache when offline, or a repo
    the Hub says exists.

    One request without retries at most: `from_pretrained` would retry an unreachable Hub for tens of seconds before
    saying so. Errors other than "unreachable", "no such repo / revision" are left for the download to report.
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import validate_repo_id

    path = Path(name).expanduser()
    if path.is_dir():
        return None
    if path.exists():
        return "is a file, not a folder"
    first = name.split("/")[0]
    looks_local = name.startswith(("/", ".", "~")) or "\\" in name or (name.count("/") == 1 and Path(first).is_dir())
    try:
        validate_repo_id(name)
    except HFValidationError:
        looks_local = True
    if looks_local:
        return "is not a folder here (nor a Hub repo id)"
    if _offline() or local_files_only:
        if repo_type == "model":
            cached = isinstance(try_to_load_from_cache(name, "config.json", cache_dir=cache_dir, revision=revision),
                                str)
        else:
            cache = Path(cache_dir or constants.HF_HUB_CACHE)
            cached = (cache / f"{repo_type}s--{name.replace('/', '--')}" / "snapshots").is_dir()
        if cached:
            return None
        why, undo = ("HF_HUB_OFFLINE=1 is set", "unset HF_HUB_OFFLINE") if _offline() else \
            ("local_files_only=True", "drop local_files_only")
        return (f"is not a folder here, and {why} while the local Hub cache does not hold it (download it once "
                f"with network access, or {undo})")
    endpoint = _endpoint(None)
    try:
        HfApi(token=token if isinstance(token, str) else None).repo_info(name, revision=revision, repo_type=repo_type,
                                                                          timeout=timeout)
    except RevisionNotFoundError:
        return f"is not a folder here, and repo {name!r} on {endpoint} has no revision {revision!r}"
    except RepositoryNotFoundError:
        return (f"is not a folder here, nor a {repo_type} repo on {endpoint} (for a private repo, set HF_TOKEN or run "
                "`hf auth login`)")
    except _transport_errors() as e:
        return (f"is not a folder here, and {endpoint} is unreachable ({type(e).__name__}); check the network, proxy "
                "and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the local Hub cache")
    except Exception:  # noqa: BLE001 - a gated repo, a rejected token...: the download explains those better
        return None
    return None
