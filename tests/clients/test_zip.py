"""Adapter zips are checked before anything is written."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import httpx
import pytest
from icm_lora_client import ResponseValidationError, UnsafeArchiveError, extract_peft_zip

from tests.clients.mock import Recorder

PEFT = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"weights"}


def _zip(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(zipfile.ZipInfo(name), data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return buffer.getvalue()


def test_extracts_a_peft_folder(tmp_path: Path) -> None:
    folder = extract_peft_zip(_zip(PEFT), tmp_path / "new" / "adapter")
    assert {p.name for p in folder.iterdir()} == set(PEFT)
    assert (folder / "adapter_model.safetensors").read_bytes() == b"weights"
    extract_peft_zip(_zip(PEFT), folder)  # into an existing folder: overwrites
    assert {p.name for p in folder.iterdir()} == set(PEFT)


@pytest.mark.parametrize(
    "name",
    ["../evil.txt", "sub/../../evil.txt", "/tmp/evil.txt", "..\\evil.txt", "C:\\evil.txt", "C:/evil.txt", ".."],
)
def test_rejects_escaping_paths(tmp_path: Path, name: str) -> None:
    target = tmp_path / "a" / "b"
    with pytest.raises(UnsafeArchiveError):
        extract_peft_zip(_zip({**PEFT, name: b"evil"}), target)
    assert not target.exists()  # nothing written, not even the folder
    assert not (tmp_path / "a" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_rejects_links_missing_files_and_non_zips(tmp_path: Path) -> None:
    with pytest.raises(UnsafeArchiveError, match="link"):
        extract_peft_zip(_zip(PEFT, links={"link": "/etc/passwd"}), tmp_path / "x")
    with pytest.raises(UnsafeArchiveError, match=r"missing adapter_model\.safetensors"):
        extract_peft_zip(_zip({"adapter_config.json": b"{}"}), tmp_path / "x")
    with pytest.raises(UnsafeArchiveError, match="not a zip"):
        extract_peft_zip(b"<html>oops</html>", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_download_adapter_asks_for_a_zip(tmp_path: Path) -> None:
    zipped = httpx.Response(200, headers={"content-type": "application/zip"}, content=_zip(PEFT))
    recorder = Recorder(zipped)
    with recorder.client() as client:
        folder = client.download_adapter("abc123", tmp_path / "peft")
    request = recorder.requests[0]
    assert request.method == "GET" and request.url.path == "/v1/adapters/abc123/weights"
    assert request.headers["accept"] == "application/zip"
    assert (folder / "adapter_config.json").is_file()

    client = Recorder(httpx.Response(200, json={"not": "a zip"})).client()
    with client, pytest.raises(ResponseValidationError, match="application/zip"):
        client.download_adapter("abc123", tmp_path / "other")
