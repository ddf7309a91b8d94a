"""Small shared helpers: atomic writes and environment lookups."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it onto ``path``.

    The file is flushed to disk (fsync) before the rename, which is atomic on POSIX, so readers see
    either the old file or the complete new one, never a partial write (an interrupted run leaves only a
    stray ``.<name>.*.tmp`` behind, which :func:`remove_stale_temporaries` clears).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` when a process was killed while
    writing (``.<name>.<random>.tmp``); returns what was removed.
    Call it when a run starts, before anything writes there."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def file_hash(path: str | os.PathLike, hash_type: str = "sha256") -> str:
    """The hex digest of a file (``hash_type``: any :func:`hashlib.new` name), read in 1 MB blocks."""
    h = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def data_root() -> Path:
    """Where medssl looks for data sets: ``$MEDSSL_DATA_DIR``; else, in a source checkout with a ``shared``
    folder beside it (the project's layout), ``../shared/data``; else ``~/.cache/medssl/data``."""
    if os.environ.get("MEDSSL_DATA_DIR"):
        return Path(os.environ["MEDSSL_DATA_DIR"]).expanduser()
    checkout = Path(__file__).resolve().parents[1]
    beside = checkout.parent / "shared" / "data"
    if (checkout / "setup.cfg").is_file() and beside.is_dir():
        return beside
    return Path.home() / ".cache" / "medssl" / "data"


def default_dataset_dir(name: str) -> str:
    """The default ``dataset_dir`` of a bundle: ``$MEDSSL_DATA_DIR/<name>``."""
    return str(data_root() / name)


def check_choice(name: str, value: str, choices) -> str:
    """``value`` if it is one of ``choices``, else a ``ValueError`` naming the config id and the choices
    (for string switches of the bundle configs, checked while the config is parsed)."""
    if value not in tuple(choices):
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def choose(name: str, value, **options):
    """The option called ``value`` among ``options``: a bundle config's variant switch, e.g.
    ``"$medssl.utils.choose('pretext', @pretext, block_mix=@classifier, context_restoration=@network_def)"``.

    An unknown ``value`` raises the :func:`check_choice` error naming the config id ``name`` and the
    choices, while the config is parsed. As with a ``$a if c else b`` expression, the config parser has
    built every option before this is called, so options should be cheap to build (ids, not runs)."""
    return options[check_choice(name, value, options)]


def full_batches(num_items: int, batch_size: int, what: str = "training set") -> int:
    """``batch_size`` if ``num_items`` fill at least one batch (for loaders with ``drop_last=True``),
    else a ``ValueError``: with fewer items than one batch every epoch would be empty and the run would
    "finish" without a single step."""
    if int(num_items) < int(batch_size):
        raise ValueError(f"the {what} has {num_items} item(s), fewer than one batch of {batch_size} with drop_last: "
                         "nothing would train; lower batch_size or add data")
    return int(batch_size)
