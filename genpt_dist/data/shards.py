"""The shard format: a WebDataset tar whose samples are `<key>.tokens.npy`, one (seq_len + 1,) row each.

Any WebDataset reader opens these shards (`wds.WebDataset(urls)` decodes `tokens.npy` with numpy).
This module writes and reads them in bulk, because going member by member through `tarfile` and
`np.load` pays Python-level work per sample, which caps the loader far below what training consumes
(BENCHMARKS.md, "bench loader"):

- `encode_shard` builds the whole tar in numpy: plain ustar headers from one template (only the
  name and checksum differ), the .npy header computed once, the rows copied in one strided write.
- `decode_shard` walks the ustar headers of a shard held in memory, checks that every tokens.npy
  member carries the same .npy header, and gathers all payloads with one fancy index. A tar it
  does not understand (pax or GNU long-name headers, other members, other dtypes) goes through
  webdataset's own tar iterator and `np.load` instead, so any valid WebDataset shard still reads.
"""

from __future__ import annotations

import io

import numpy as np

BLOCK = 512
SUFFIX = "tokens.npy"


def _npy_header(row: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, row, allow_pickle=False)
    return buf.getvalue()[: -row.nbytes]


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _header_template(size: int) -> np.ndarray:
    h = bytearray(BLOCK)
    h[100:108] = b"0000644\x00"  # mode
    h[108:116] = b"0000000\x00"  # uid
    h[116:124] = b"0000000\x00"  # gid
    h[124:136] = b"%011o\x00" % size
    h[136:148] = b"00000000000\x00"  # mtime 0: the same rows give the same bytes
    h[148:156] = b" " * 8  # checksum placeholder, counted as spaces
    h[156:157] = b"0"  # regular file
    h[257:263] = b"ustar\x00"
    h[263:265] = b"00"
    h[329:337] = b"0000000\x00"  # devmajor
    h[337:345] = b"0000000\x00"  # devminor
    return np.frombuffer(bytes(h), dtype=np.uint8)


def encode_shard(keys: list[str], rows: np.ndarray) -> bytes:
    """(N, T) rows -> the bytes of a tar holding `<keys[i]>.tokens.npy` for each row, in order."""
    rows = np.ascontiguousarray(rows)
    n, _ = rows.shape
    names = [f"{k}.{SUFFIX}".encode() for k in keys]
    width = len(names[0]) if names else 0
    if n != len(names) or any(len(x) != width for x in names) or width > 100:
        raise ValueError("encode_shard needs one key per row, all of the same length (< 90 chars)")
    if n == 0:
        return bytes(2 * BLOCK)
    npy_head = _npy_header(rows[0])
    size = len(npy_head) + rows.shape[1] * rows.itemsize
    member = BLOCK + _padded(size)
    out = np.zeros((n, member), dtype=np.uint8)
    template = _header_template(size)
    out[:, :BLOCK] = template
    out[:, :width] = np.frombuffer(b"".join(names), dtype=np.uint8).reshape(n, width)
    checksum = int(template.sum(dtype=np.int64)) + out[:, :width].sum(axis=1, dtype=np.int64)  # (N,)
    powers = 8 ** np.arange(5, -1, -1, dtype=np.int64)  # six octal digits
    out[:, 148:154] = (checksum[:, None] // powers % 8 + ord("0")).astype(np.uint8)
    out[:, 154] = 0
    out[:, 155] = ord(" ")
    out[:, BLOCK : BLOCK + len(npy_head)] = np.frombuffer(npy_head, dtype=np.uint8)
    out[:, BLOCK + len(npy_head) : BLOCK + size] = rows.view(np.uint8).reshape(n, -1)
    return out.tobytes() + bytes(2 * BLOCK)


def _ustar_members(data: bytes) -> list[tuple[str, int, int]] | None:
    """(name, payload offset, size) of each member, or None if the tar needs the general reader."""
    members: list[tuple[str, int, int]] = []
    off, end = 0, len(data)
    while True:
        if off + BLOCK > end:
            raise ValueError(f"truncated tar: header at byte {off} of {end}")
        header = data[off : off + BLOCK]
        if header[0] == 0 and not header.strip(b"\x00"):
            return members  # end-of-archive block
        if header[156] not in (0, 48) or header[257:262] != b"ustar":  # not a plain regular file (pax, GNU, ...)
            return None
        stored = int(header[148:156].strip(b"\x00 ") or b"-1", 8)
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise ValueError(f"bad tar header checksum at byte {off}")
        size = int(header[124:136].strip(b"\x00 ") or b"0", 8)
        name = header[:100].split(b"\x00", 1)[0]
        prefix = header[345:500].split(b"\x00", 1)[0]
        if prefix:
            name = prefix + b"/" + name
        if off + BLOCK + size > end:
            raise ValueError(f"truncated tar: member {name!r} runs past the end ({end} bytes)")
        members.append((name.decode("utf-8", "replace"), off + BLOCK, size))
        off += BLOCK + _padded(size)


def _decode_general(data: bytes) -> list[np.ndarray]:
    import webdataset as wds

    rows = []
    for item in wds.tariterators.tar_file_iterator(io.BytesIO(data)):
        if item["fname"].endswith("." + SUFFIX):
            rows.append(np.load(io.BytesIO(item["data"]), allow_pickle=False))
    return rows


def decode_shard(data: bytes, row_len: int) -> np.ndarray:
    """The (N, row_len) token rows of a shard's bytes, in tar order; raises ValueError if it is damaged."""
    members = _ustar_members(data)
    if members is not None:
        rows = [(off, size) for name, off, size in members if name.endswith("." + SUFFIX)]
        if not rows:
            return np.zeros((0, row_len), dtype=np.int64)
        off0, size0 = rows[0]
        magic = io.BytesIO(data[off0 : off0 + size0])
        version = np.lib.format.read_magic(magic)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(magic)  # the one .npy header we parse
        head_len = magic.tell()
        head = data[off0 : off0 + head_len]
        uniform = (
            shape == (row_len,)
            and not fortran
            and not dtype.hasobject
            and all(size == size0 and data[off : off + head_len] == head for off, size in rows)
            and size0 == head_len + row_len * dtype.itemsize
        )
        if uniform:
            buf = np.frombuffer(data, dtype=np.uint8)
            starts = np.fromiter((off for off, _ in rows), dtype=np.int64, count=len(rows)) + head_len
            nbytes = row_len * dtype.itemsize
            gathered = buf[starts[:, None] + np.arange(nbytes)[None, :]]  # (N, row_len * itemsize)
            return gathered.view(dtype).reshape(len(rows), row_len)
    found = _decode_general(data)
    bad = [r.shape for r in found if r.shape != (row_len,)]
    if bad:
        raise ValueError(f"a tokens.npy row has shape {bad[0]}, expected ({row_len},)")
    return np.stack(found) if found else np.zeros((0, row_len), dtype=np.int64)
