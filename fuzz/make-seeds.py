#!/usr/bin/env python3
"""Writes the committed seed corpora under fuzz/corpus/ (run from anywhere).

Each seed is one well-formed session or image, so the fuzzer starts from
inputs that get deep into the code instead of being refused at the first
byte. The input layouts are the ones the targets in fuzz/Sources/ read."""
import os
import struct
import subprocess
import tempfile
import zlib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(target, name, data):
    os.makedirs(os.path.join(ROOT, target), exist_ok=True)
    with open(os.path.join(ROOT, target, name), "wb") as f:
        f.write(data)


# --- NBD option phase: [capability bits][export config][client flags][options]

IHAVEOPT = 0x49484156454F5054


def option(code, payload=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(payload)) + payload


def name(s):
    return struct.pack(">I", len(s)) + s.encode()


def info(export, *types):
    return name(export) + struct.pack(">H", len(types)) + b"".join(struct.pack(">H", t) for t in types)


def meta(export, *queries):
    return name(export) + struct.pack(">I", len(queries)) + b"".join(name(q) for q in queries)


def negotiation_seeds():
    t = "FuzzNegotiation"
    # caps 0xFF; config: name "disk", description, 1 MiB; fixed newstyle + no zeroes
    write(t, "go-structured", bytes([0xFF, 0x13]) + struct.pack(">I", 3)
          + option(8) + option(10, meta("disk", "base:allocation")) + option(7, info("disk", 1, 2, 3)))
    write(t, "list-info-abort", bytes([0x7F, 0x2B]) + struct.pack(">I", 3)
          + option(3) + option(6, info("", 0)) + option(9, meta("", "base:", "qemu:")) + option(2))
    write(t, "export-name", bytes([0x01, 0x11]) + struct.pack(">I", 1) + option(1, b"disk"))
    write(t, "errors-then-go", bytes([0xFF, 0x1D]) + struct.pack(">I", 3)
          + option(10, meta("disk", "base:allocation")) + option(0x55, b"xx") + option(3, b"x")
          + option(8, b"x") + option(7, info("other")) + option(6, b"\0\0") + option(7, info("")))
    write(t, "allocation-depth", bytes([0xFF, 0x19]) + struct.pack(">I", 3)
          + option(8) + option(9, meta("disk")) + option(10, meta("disk", "qemu:allocation-depth", "base:allocation"))
          + option(10, meta("", "base:")) + option(7, info("disk")))
    write(t, "bad-client-flags", bytes([0, 0]) + struct.pack(">I", 4))


# --- NBD transmission: [capability bits][config][size][requests with payloads]

REQUEST = 0x25609513


def request(command, offset, length, flags=0, cookie=1, payload=None):
    head = struct.pack(">IHHQQI", REQUEST, flags, command, cookie, offset, length)
    return head + (bytes([0x5A]) * length if payload is None and command == 1 else payload or b"")


def transmission_seeds():
    t = "FuzzTransmission"
    # config 0x41: structured replies, one context, size from two bytes (in 512-byte units)
    size = struct.pack(">H", 2048)  # 1 MiB
    write(t, "every-command", bytes([0xFF, 0x41]) + size
          + request(0, 0, 4096, flags=4) + request(1, 4096, 512, flags=1) + request(3, 0, 0)
          + request(4, 8192, 4096) + request(6, 0, 65536, flags=2 | 1) + request(5, 0, 1 << 20)
          + request(7, 0, 1 << 20, flags=8) + request(2, 0, 0))
    write(t, "refusals", bytes([0xFF, 0x02]) + size
          + request(1, 0, 16) + request(0, (1 << 20) - 1, 2) + request(0, 0, 0) + request(3, 1, 0)
          + request(0, 0, 33 << 20) + request(9, 0, 1) + request(7, 0, 512) + request(0, 0, 512, flags=0x40))
    write(t, "huge-export", bytes([0x1B, 0x11]) + struct.pack(">Q", (1 << 64) - 512)
          + request(0, (1 << 64) - 1024, 512) + request(4, (1 << 64) - 513, 1024) + request(1, 1 << 63, 1))
    write(t, "raw-flags", bytes([0x00, 0x04]) + size + struct.pack(">H", 0xFFFF)
          + request(6, 0, 512, flags=0x10) + request(4, 0, 512, flags=1) + request(5, 0, 512))


if __name__ == "__main__":
    negotiation_seeds()
    transmission_seeds()
