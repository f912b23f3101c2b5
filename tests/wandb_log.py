"""Read the records of an offline W&B run file (run-<id>.wandb): the LevelDB log format W&B writes — a 7-byte file
header (b":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks (crc32 u32, length u16, type u8:
1 full, 2 first, 3 middle, 4 last), each record a serialised wandb_internal_pb2.Record."""

import struct

BLOCK = 32768
HEADER = 7


def records(path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, (ident, magic, version)
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec
            pending = b""
