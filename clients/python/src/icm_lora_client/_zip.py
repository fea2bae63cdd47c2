"""Safe extraction of a downloaded adapter zip into a PEFT folder.

Every entry is checked before anything is written: no absolute paths or drive letters, no ``..`` components, no
symbolic links, no unreasonable total size (a zip bomb), and the PEFT files must be there. ``zipfile`` itself
sanitises some of this, but silently (it rewrites the name); an archive that tries is refused outright instead.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from ._errors import UnsafeArchiveError

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_UNCOMPRESSED_BYTES = 4 * 1024**3


def _check_name(name: str) -> PurePosixPath:
    unified = name.replace("\\", "/")
    path = PurePosixPath(unified)
    if not name or unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise UnsafeArchiveError(f"absolute path in the adapter zip: {name!r}")
    if any(part == ".." for part in path.parts):
        raise UnsafeArchiveError(f"'..' in a path of the adapter zip: {name!r}")
    return path


def check_members(archive: zipfile.ZipFile, max_bytes: int = MAX_UNCOMPRESSED_BYTES) -> list[zipfile.ZipInfo]:
    """The archive's file entries, after every safety check."""
    files, total = [], 0
    for info in archive.infolist():
        _check_name(info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UnsafeArchiveError(f"symbolic link in the adapter zip: {info.filename!r}")
        if info.is_dir():
            continue
        total += info.file_size
        if total > max_bytes:
            raise UnsafeArchiveError(f"the adapter zip unpacks to more than {max_bytes} bytes")
        files.append(info)
    names = {info.filename for info in files}
    missing = [name for name in PEFT_FILES if name not in names]
    if missing:
        raise UnsafeArchiveError(f"not a PEFT adapter zip: missing {', '.join(missing)}")
    return files


def extract_peft_zip(data: bytes, folder: str | os.PathLike[str]) -> Path:
    """Unpack ``data`` into ``folder`` (created if needed) and return it. Each file is written to a temporary name
    and renamed, so a reader never sees half a file."""
    target = Path(folder)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise UnsafeArchiveError(f"the adapter download is not a zip file: {exc}") from None
    with archive:
        members = check_members(archive)
        target.mkdir(parents=True, exist_ok=True)
        root = target.resolve()
        for info in members:
            destination = (root / _check_name(info.filename)).resolve()
            if not destination.is_relative_to(root):  # belt and braces after _check_name
                raise UnsafeArchiveError(f"path escapes the target folder: {info.filename!r}")
            destination.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=destination.parent, prefix=".part-")
            try:
                with os.fdopen(fd, "wb") as out, archive.open(info) as src:
                    while block := src.read(1 << 20):
                        out.write(block)
                os.replace(tmp, destination)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    return target
