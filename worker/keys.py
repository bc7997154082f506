"""Where the keys that seal endpoint secrets come from: the environment, a key file, or, for
the embedded SQLite default only, a key file generated next to the database."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from sqlalchemy.engine import make_url

from worker.core.errors import KeyRingError
from worker.core.sealing import KeyRing, generate_key
from worker.settings import Settings

HOW_TO_MAKE_ONE = ("make one with `webhooks keys generate` and set "
                   "WEBHOOKS_SECRET_KEYS=<its output> (or WEBHOOKS_SECRET_KEY_FILE=<a file holding "
                   "it>)")


def default_key_file(database_url: str) -> Path | None:
    """`<database>.key` beside a file-backed SQLite database; None for anything else."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database + ".key")


def load_keyring(settings: Settings, *, database_url: str | None = None) -> KeyRing:
    """The key ring for `database_url` (default: settings.database_url).

    Raises KeyRingError with a one-line reason when there is no usable key.
    """
    if settings.secret_keys is not None:
        return KeyRing.parse(settings.secret_keys.get_secret_value(), "WEBHOOKS_SECRET_KEYS")
    if settings.secret_key_file:
        return _read(Path(settings.secret_key_file), "WEBHOOKS_SECRET_KEY_FILE")
    url = database_url or settings.database_url
    path = default_key_file(url)
    if path is None:
        if make_url(url).get_backend_name() == "sqlite":  # in memory: nothing outlives it
            return KeyRing.parse(generate_key("memory"), "a generated in-memory key")
        raise KeyRingError(f"no key to seal endpoint secrets with: {HOW_TO_MAKE_ONE}")
    if not path.exists():
        _create(path)
    return _read(path, str(path))


def _read(path: Path, source: str) -> KeyRing:
    try:
        text = path.read_text()
    except OSError as exc:
        raise KeyRingError(f"{source}: cannot read {path}: {exc.strerror}") from exc
    return KeyRing.parse(text, source)


def _create(path: Path) -> None:
    """Write a fresh key, readable by its owner only. Linked into place whole, so a process
    starting at the same moment reads either no file or the complete one; the first wins."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(generate_key() + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(temp, path)
    except OSError as exc:
        raise KeyRingError(f"cannot create the key file {path}: {exc.strerror}") from exc
    finally:
        temp.unlink(missing_ok=True)
