"""The bytes of a delimited text file as pyarrow's CSV reader is to parse them, checked.

`TextStream` is a file object that reads a text file block by block and hands on UTF-8 bytes,
doing what `dnis.data.readers.read_csv` does to a whole file before parsing it:

- a compressed file is refused (streaming does not decompress), a UTF-8 byte-order mark is dropped
  and a UTF-16/32 one refused;
- every byte is checked against the encoding: an invalid one is refused naming its file line and
  its byte within the line, as `read_csv` names them;
- a file in another ASCII-compatible encoding (latin-1, cp1252, ...) is transcoded to UTF-8;
- a multi-character delimiter (MovieLens-1M's "::") is replaced by the byte 0x1f, which pyarrow
  takes as its one-character delimiter, and a file that already holds 0x1f is refused. Bytes are
  handed on up to the last newline read, so a delimiter is never cut in two.

`dnis.data.streaming.sources` reads it in Python (line checks, the csv module) and writes it out
for pyarrow when the file is not UTF-8 already; pyarrow itself always reads a file.
"""

from __future__ import annotations

import codecs
import io
from pathlib import Path

from dnis.data import readers

# The first read is at least this long, so that the compression check sees a whole magic number.
_HEAD_BYTES = 64


class TextStream(io.RawIOBase):
    """A readable binary stream of the file's text as UTF-8, checked as `read_csv` checks it."""

    def __init__(self, path: Path, encoding: str, delimiter: str, block_bytes: int) -> None:
        super().__init__()
        self.path, self.encoding, self.delimiter = path, encoding, delimiter
        self.block_bytes = max(block_bytes, _HEAD_BYTES)
        self.handle = open(path, "rb")  # noqa: SIM115 (closed by `close`)
        self.decoder = codecs.getincrementaldecoder(encoding)()
        sep = delimiter.encode("utf-8")
        self.multi = sep if len(sep) != 1 else None  # the delimiter to replace by 0x1f
        self.out, self.at = b"", 0  # bytes ready to hand on, and how many are handed on
        self.carry = b""  # transcoded bytes after the last newline (multi-character delimiter)
        self.started = self.done = False
        self.consumed = 0  # file bytes decoded so far (after a byte-order mark)
        self.newlines = 0  # newlines among them
        self.line_start = 0  # offset of the first byte of the line being read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while self.at == len(self.out) and not self.done:
            self._fill()
        n = min(len(buffer), len(self.out) - self.at)
        buffer[:n] = self.out[self.at : self.at + n]
        self.at += n
        return n

    def close(self) -> None:
        self.handle.close()
        super().close()

    def _fill(self) -> None:
        raw = self.handle.read(self.block_bytes)
        final = not raw
        if not self.started:
            self.started = True
            kind = readers.compression(raw)
            if kind is not None:
                raise readers.compressed_error(kind, self.path)
            raw = readers.without_bom(raw, self.path, self.encoding)
        text = self._decode(raw, final)
        data = raw if self.encoding == "utf-8" else text.encode("utf-8")
        if self.multi is not None:
            data = self._replace(data, final)
        self.out, self.at, self.done = data, 0, final

    def _decode(self, raw: bytes, final: bool) -> str:
        """`raw` decoded; an invalid byte is refused naming its line and its byte in the line."""
        held = len(self.decoder.getstate()[0])  # bytes of a character cut at the last block's end
        try:
            text = self.decoder.decode(raw, final)
        except UnicodeDecodeError as error:
            at = error.start - held  # offset in `raw` (negative: in the bytes held back)
            before = raw[: max(at, 0)]
            last = before.rfind(b"\n")
            line_start = self.consumed + last + 1 if last >= 0 else self.line_start
            raise readers.undecodable(
                error.object[error.start],
                self.newlines + before.count(b"\n") + 1,
                self.consumed + at - line_start + 1,
                self.path,
                self.encoding,
            ) from None
        last = raw.rfind(b"\n")
        if last >= 0:
            self.line_start = self.consumed + last + 1
        self.newlines += raw.count(b"\n")
        self.consumed += len(raw)
        return text

    def _replace(self, data: bytes, final: bool) -> bytes:
        """The complete lines of `carry + data` with the delimiter replaced by 0x1f."""
        assert self.multi is not None
        if readers.UNIT_SEPARATOR in data:
            raise readers.separator_in_file(self.path, self.delimiter)
        data = self.carry + data
        cut = len(data) if final else data.rfind(b"\n") + 1
        self.carry = data[cut:]
        return data[:cut].replace(self.multi, readers.UNIT_SEPARATOR)


def text_stream(path: Path, encoding: str, delimiter: str, block_bytes: int) -> io.BufferedReader:
    """A buffered `TextStream` (what pyarrow and `io.TextIOWrapper` read from)."""
    return io.BufferedReader(TextStream(path, encoding, delimiter, block_bytes), block_bytes)
