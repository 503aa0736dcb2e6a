"""File-backed datasets: locating, verifying and (where a public copy exists) downloading them.

Every file is described in a manifest (``data/manifest.json`` in the repository, packaged as
``sclatent/datasets/manifest.json`` in a wheel) with its path relative to the data directory and a
checksum. Files are looked up in the data directory, verified, and only downloaded on an explicit
call when the manifest gives a URL; nothing is fetched at import time.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

ENV_VAR = "SCLATENT_DATA_DIR"
_DEFAULT_DIR = Path("~/.cache/sclatent/data")
_MANIFEST_NAME = "manifest.json"
_REPO_MANIFEST = Path(__file__).resolve().parents[2] / "data" / _MANIFEST_NAME
_CHUNK = 1 << 20
_DOWNLOAD_TIMEOUT_S = 60

# Verified files, keyed by (resolved path, mtime_ns, size). Kept in memory because the data
# directory may be read-only (the shared CI folder is), and a changed file gets a new key.
_VERIFIED: set[tuple[str, int, int]] = set()

MNIST_FILES = {
    "train_images": "MNIST/raw/train-images-idx3-ubyte.gz",
    "train_labels": "MNIST/raw/train-labels-idx1-ubyte.gz",
    "test_images": "MNIST/raw/t10k-images-idx3-ubyte.gz",
    "test_labels": "MNIST/raw/t10k-labels-idx1-ubyte.gz",
}


class DatasetUnavailableError(RuntimeError):
    """A dataset file is missing, fails its checksum, or cannot be downloaded."""


def data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Directory holding the dataset files.

    Parameters
    ----------
    path
        Explicit directory; wins over everything else.

    Returns
    -------
    Path
        ``path`` if given, else ``$SCLATENT_DATA_DIR`` if set and non-empty, else
        ``~/.cache/sclatent/data``. The directory is not created here.
    """
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return _DEFAULT_DIR.expanduser()


# Loaders take a ``data_dir`` argument, which shadows the function inside them.
_resolve_data_dir = data_dir


@lru_cache(maxsize=1)
def _manifest() -> dict[str, dict[str, Any]]:
    """Datasets of the manifest, by name."""
    text = None
    # A wheel carries the manifest inside the package; an editable install reads the repo copy.
    try:
        packaged = resources.files(__package__) / _MANIFEST_NAME
        if packaged.is_file():
            text = packaged.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, TypeError):
        text = None
    if text is None:
        if not _REPO_MANIFEST.is_file():
            raise FileNotFoundError(
                f"sclatent dataset manifest not found: neither sclatent/datasets/{_MANIFEST_NAME} in the package "
                f"nor {_REPO_MANIFEST}"
            )
        text = _REPO_MANIFEST.read_text(encoding="utf-8")
    return {entry["name"]: entry for entry in json.loads(text)["datasets"]}


def _file_entry(name: str, relpath: str) -> tuple[dict[str, Any], dict[str, Any]]:
    datasets = _manifest()
    if name not in datasets:
        raise KeyError(f"unknown dataset {name!r}; the manifest lists {sorted(datasets)}")
    dataset = datasets[name]
    for entry in dataset["files"]:
        if entry["path"] == relpath:
            return dataset, entry
    listed = [entry["path"] for entry in dataset["files"]]
    raise KeyError(f"dataset {name!r} has no file {relpath!r}; the manifest lists {listed}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _md5_uncompressed(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with gzip.open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _checksum_problem(path: Path, entry: dict[str, Any]) -> str | None:
    """Why ``path`` does not match its manifest entry, or None if it does."""
    if entry.get("verify") == "md5_uncompressed":
        # Compressed bytes may legitimately differ (a recompressed copy); the content may not.
        expected = entry["md5_uncompressed"]
        try:
            actual = _md5_uncompressed(path)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            actual = f"<not a readable gzip file: {exc}>"
        if actual != expected:
            return f"md5 checksum of the uncompressed bytes: expected {expected}, got {actual}"
        return None
    size = path.stat().st_size
    if size != entry["size"]:
        # Cheap to detect, and explains truncated downloads without hashing.
        return f"sha256 checksum: size is {size} bytes, expected {entry['size']} (sha256 {entry['sha256']})"
    actual = _sha256(path)
    if actual != entry["sha256"]:
        return f"sha256 checksum: expected {entry['sha256']}, got {actual}"
    return None


def _verify(path: Path, entry: dict[str, Any], fix: str) -> None:
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key in _VERIFIED:
        return
    problem = _checksum_problem(path, entry)
    if problem is not None:
        raise DatasetUnavailableError(f"{path} failed verification ({problem}). {fix}")
    _VERIFIED.add(key)


def _how_to_get(dataset: dict[str, Any], entry: dict[str, Any], root: Path) -> str:
    where = (
        f"Set {ENV_VAR} (or pass data_dir=) to a folder holding {entry['path']}; looked in {root} "
        f"(explicit data_dir, else ${ENV_VAR}, else {_DEFAULT_DIR})."
    )
    if entry.get("url"):
        return f"{where} It can be downloaded from {entry['url']}."
    return (
        f"{where} There is no public copy of this exact file to download; it was made from "
        f"{dataset.get('source')}: {dataset.get('recipe')}"
    )


def _download(url: str, target: Path, entry: dict[str, Any], help_text: str) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as exc:
        raise DatasetUnavailableError(
            f"{target} is missing and cannot be downloaded into {target.parent} (not writable: {exc}). {help_text}"
        ) from exc
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                shutil.copyfileobj(response, out, _CHUNK)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise DatasetUnavailableError(
                f"{target} is missing and downloading it from {url} failed ({exc}). {help_text}"
            ) from exc
        problem = _checksum_problem(tmp, entry)
        if problem is not None:
            raise DatasetUnavailableError(
                f"the file downloaded from {url} failed verification ({problem}); it was not kept. {help_text}"
            )
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def fetch_file(name: str, relpath: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of a verified dataset file, downloading it first if it is absent and has a URL.

    Parameters
    ----------
    name
        Dataset name in the manifest (``"pbmc3k"``, ``"mnist"``, ...).
    relpath
        File path relative to the data directory, as listed in the manifest.
    data_dir
        Data directory; see :func:`data_dir` for the default.

    Returns
    -------
    Path
        ``data_dir / relpath``, checked against the manifest checksum (sha256, or the md5 of the
        uncompressed bytes where the manifest says so). A successful check is remembered for the
        process as long as the file's mtime and size are unchanged; nothing is written next to it.

    Raises
    ------
    DatasetUnavailableError
        The file fails its checksum; or it is absent and has no URL; or the download fails or
        cannot be written.
    """
    dataset, entry = _file_entry(name, relpath)
    root = _resolve_data_dir(data_dir)
    target = root / relpath
    help_text = _how_to_get(dataset, entry, root)
    if target.is_file():
        fix = (
            f"The file is corrupt or a different version: replace it with the file from the manifest "
            f"(delete it{' to download it again' if entry.get('url') else ''}), or point {ENV_VAR} at a "
            "folder holding the correct copy."
        )
        _verify(target, entry, fix)
        return target
    if not entry.get("url"):
        raise DatasetUnavailableError(f"Dataset file {target} is missing. {help_text}")
    _download(entry["url"], target, entry, help_text)
    _verify(target, entry, f"Delete {target} and try again.")
    return target


def _read_counts_h5ad(name: str, data_dir: str | os.PathLike[str] | None) -> ad.AnnData:
    (entry,) = _manifest()[name]["files"]
    adata = ad.read_h5ad(fetch_file(name, entry["path"], data_dir))
    x = adata.X
    if sp.issparse(x):
        # astype on CSR converts the stored values only, never densifying.
        x = sp.csr_matrix(x).astype(np.float32, copy=False)
    else:
        x = sp.csr_matrix(np.asarray(x, dtype=np.float32))
    adata.X = x
    adata.layers["counts"] = x.copy()
    adata.uns["dataset"] = name
    return adata


def pbmc3k(data_dir: str | os.PathLike[str] | None = None) -> ad.AnnData:
    """10x Genomics 3k PBMCs from a healthy donor, raw UMI counts with Seurat tutorial labels.

    Parameters
    ----------
    data_dir
        Folder holding ``pbmc3k/pbmc3k.h5ad``; see :func:`data_dir` for the default.

    Returns
    -------
    AnnData
        ``(2700, 32738)``; ``X`` and ``layers["counts"]``: CSR float32 integer counts (2.6 %
        nonzero, median library 2,197; most genes all-zero, so select genes before modelling).
        ``obs["cell_type"]``: the Seurat tutorial annotation (9 types) for the 2,638 cells passing
        its QC, NaN for the other 62 (``obs["labelled"]`` False). ``var["gene_ids"]``: Ensembl.
        One batch.

    Raises
    ------
    DatasetUnavailableError
        The file is missing (there is no download; point ``SCLATENT_DATA_DIR`` at a folder
        holding it) or fails its checksum.
    """
    return _read_counts_h5ad("pbmc3k", data_dir)


def mouse_brain_10k_chr1(data_dir: str | os.PathLike[str] | None = None) -> ad.AnnData:
    """10,000 mouse brain cells (10x Chromium) on the first 1,000 genes of chromosome 1.

    Parameters
    ----------
    data_dir
        Folder holding ``mouse_brain_10k_chr1/mouse_brain_10k_chr1.h5ad``.

    Returns
    -------
    AnnData
        ``(10000, 1000)``; ``X`` and ``layers["counts"]``: CSR float32 integer counts (about 7 %
        nonzero, median library 137). Not every cell has counts (one cell's total is 0 and 80
        have fewer than 10): models and normalisations must cope with (or filter) them. No cell
        labels; ``var["gene_ids"]``: Ensembl.

    Raises
    ------
    DatasetUnavailableError
        The file is missing or fails its checksum.
    """
    return _read_counts_h5ad("mouse_brain_10k_chr1", data_dir)


def cellbench_5cl(data_dir: str | os.PathLike[str] | None = None) -> ad.AnnData:
    """CellBench mixture of five lung cancer cell lines, CEL-seq2 on three plates (Tian et al. 2019).

    Parameters
    ----------
    data_dir
        Folder holding ``cellbench_5cl/cellbench_5cl.h5ad``.

    Returns
    -------
    AnnData
        ``(909, 16039)``; ``X`` and ``layers["counts"]``: CSR float32 integer UMI counts (34 %
        nonzero, median library 21,209). ``obs["cell_type"]``: cell line from SNP genotypes
        (A549, H838, H2228, H1975, HCC827); ``obs["batch"]``: plate1/plate2/plate3;
        ``obs["demuxlet_cls"]``: ``SNG`` (571) or ``DBL`` (338 doublets, kept here).

    Raises
    ------
    DatasetUnavailableError
        The file is missing or fails its checksum.
    """
    return _read_counts_h5ad("cellbench_5cl", data_dir)


def mnist_files(data_dir: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """The four MNIST idx ``.gz`` files, verified (downloaded from the public mirror if absent).

    Parameters
    ----------
    data_dir
        Folder holding ``MNIST/raw/*.gz`` (the torchvision layout).

    Returns
    -------
    dict[str, Path]
        Keys ``train_images``, ``train_labels``, ``test_images``, ``test_labels``. Each file is
        verified by the md5 of its uncompressed bytes, so a recompressed copy is accepted.

    Raises
    ------
    DatasetUnavailableError
        A file fails verification or is absent and cannot be downloaded.
    """
    return {key: fetch_file("mnist", relpath, data_dir) for key, relpath in MNIST_FILES.items()}
