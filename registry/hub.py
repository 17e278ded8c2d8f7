"""Downloads through huggingface_hub into the shared HF cache, with progress and clear errors.

Resuming: huggingface_hub retries a dropped connection mid-file with an HTTP Range request
(up to 5 times per file), and a later pull fetches only the files that are still missing,
since finished files stay in the cache. huggingface_hub (2.x) writes each file to a
process-private temp file and discards it when the process fails, so the bytes of the one
file in flight when a pull dies are fetched again. Nothing partial is ever visible: a file
appears in the snapshot only once complete, and `store.missing_files` decides when the
whole model is.
"""

from pathlib import Path

import httpx2
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm.auto import tqdm

from .errors import NOT_FOUND, UNAVAILABLE, RegistryError
from .names import parse
from .store import ResolvedModel, missing_files, resolve

# Only what mlx-lm loads: configs and tokenizer/chat-template files, the `model*.safetensors`
# weights (not PyTorch bins, GGUF or consolidated.safetensors duplicates), and no `*.py`:
# remote code is never fetched, so it can never be run.
ALLOW_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]


class _SilentTqdm(tqdm):
    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def pull(name: str, progress: bool = True, local: bool = True) -> ResolvedModel:
    """Fetch whatever files of `name`'s current hub revision are missing, then resolve it.

    `progress` shows huggingface_hub's tqdm bars (on stderr); the server passes False.
    A local directory is only checked, never downloaded; `local=False` is `resolve`'s.
    """
    ref = parse(name, local)
    if ref.repo is None:
        return resolve(name)
    path = download(ref.repo, progress=progress)
    missing = missing_files(path)
    if missing:
        raise RegistryError(
            NOT_FOUND,
            f"{ref.repo} downloaded but is not a loadable MLX model: "
            f"missing {', '.join(missing)}",
        )
    return resolve(name, local)


def download(repo: str, progress: bool = True) -> Path:
    """snapshot_download of the model files; hub failures become RegistryError."""
    try:
        return Path(
            snapshot_download(
                repo,
                allow_patterns=ALLOW_PATTERNS,
                tqdm_class=None if progress else _SilentTqdm,
            )
        )
    except GatedRepoError:
        raise RegistryError(
            UNAVAILABLE,
            f"{repo} is gated: accept its terms on the Hugging Face Hub, then set HF_TOKEN",
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise RegistryError(
            NOT_FOUND,
            f"{repo} was not found on the Hugging Face Hub (a private repo needs HF_TOKEN)",
        ) from None
    except LocalEntryNotFoundError:
        raise RegistryError(
            UNAVAILABLE, f"cannot download {repo}: {_unreachable()}"
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code
        raise RegistryError(
            UNAVAILABLE,
            f"downloading {repo} failed: the hub answered HTTP {status}; pull again to resume",
        ) from None
    except httpx2.HTTPError as exc:
        raise RegistryError(
            UNAVAILABLE,
            f"downloading {repo} was interrupted ({exc}); pull again to resume",
        ) from None
    except OSError as exc:
        raise RegistryError(UNAVAILABLE, f"downloading {repo} failed: {exc}") from None


def _unreachable() -> str:
    if constants.is_offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE) and it is not in the local cache"
    return (
        f"the Hugging Face Hub at {constants.ENDPOINT} cannot be reached"
        " (check the network or HF_ENDPOINT)"
    )
