"""Read a few members of a zip (a wheel) on an HTTP server without downloading it whole.

A zip keeps its table of contents at the end, and each member at a recorded offset, so
zipfile needs only a handful of byte ranges: the end record, the central directory and
the members asked for. RangeFile is a seekable file over HTTP `Range` requests, reading
whole blocks and keeping them; a server that ignores `Range` (answers 200 with the whole
body) is refused rather than downloaded.
"""

from __future__ import annotations

import io
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

from .errors import FactoryError

BLOCK = 1 << 16  # 64 KiB; a run of missing blocks (the central directory) is one request
TIMEOUT_S = 60.0

# fetch(url, start, end) -> the bytes [start, end) of url
Fetch = Callable[[str, int, int], bytes]


def http_fetch(url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of url by one Range request (a 200 answer is an error)."""
    request = urllib.request.Request(
        url, headers={"Range": f"bytes={start}-{end - 1}", "User-Agent": "flash-attn-factory"}
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            if response.status != 206:
                raise FactoryError(
                    f"{url} does not serve byte ranges (HTTP {response.status} to a Range "
                    "request); refusing to download the whole file"
                )
            return bytes(response.read())
    except (urllib.error.URLError, OSError) as e:
        raise FactoryError(f"cannot read bytes {start}-{end - 1} of {url}: {e}") from e


@dataclass
class Traffic:
    """What reading cost: requests made, bytes received."""

    requests: int = 0
    bytes: int = 0


class RangeFile(io.RawIOBase):
    """A read-only, seekable file of `size` bytes at `url`, fetched block by block."""

    def __init__(self, url: str, size: int, fetch: Fetch = http_fetch, block: int = BLOCK):
        super().__init__()
        self.url, self.size, self.fetch, self.block = url, size, fetch, block
        self.pos = 0
        self.blocks: dict[int, bytes] = {}
        self.traffic = Traffic()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def _load(self, first: int, last: int) -> None:
        """Make blocks first..last present, fetching each missing run with one request."""
        i = first
        while i <= last:
            if i in self.blocks:
                i += 1
                continue
            j = i
            while j + 1 <= last and j + 1 not in self.blocks:
                j += 1
            start, end = i * self.block, min(self.size, (j + 1) * self.block)
            data = self.fetch(self.url, start, end)
            if len(data) != end - start:
                raise FactoryError(
                    f"{self.url}: asked for bytes {start}-{end - 1}, got {len(data)} bytes"
                )
            self.traffic.requests += 1
            self.traffic.bytes += len(data)
            for k in range(i, j + 1):
                offset = (k - i) * self.block
                self.blocks[k] = data[offset : offset + self.block]
            i = j + 1

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        first, last = self.pos // self.block, (self.pos + n - 1) // self.block
        self._load(first, last)
        data = b"".join(self.blocks[k] for k in range(first, last + 1))
        offset = self.pos - first * self.block
        buffer[:n] = data[offset : offset + n]
        self.pos += n
        return n


class RemoteZip:
    """The members of a zip at a URL, by name or by suffix, each read on demand."""

    def __init__(self, url: str, size: int, fetch: Fetch = http_fetch):
        self.file = RangeFile(url, size, fetch)
        try:
            self.zip = zipfile.ZipFile(io.BufferedReader(self.file, 1 << 13))
        except zipfile.BadZipFile as e:
            raise FactoryError(f"{url} is not a zip file: {e}") from e
        self.names = self.zip.namelist()

    def read_text(self, name_or_suffix: str) -> str | None:
        """A member's text: the exact name, else the one member ending in it; None if absent."""
        if name_or_suffix in self.names:
            name = name_or_suffix
        else:
            found = [n for n in self.names if n.endswith(name_or_suffix)]
            if len(found) != 1:
                return None
            name = found[0]
        return self.zip.read(name).decode("utf-8", errors="replace")

    @property
    def traffic(self) -> Traffic:
        return self.file.traffic
