#!/usr/bin/env python3
"""Writes the committed seed corpora under fuzz/corpus/ (run from anywhere;
needs qemu-img and qemu-io from qemu-utils, and the zstd command).

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


# --- qcow2: images made by qemu-img, small clusters so metadata is dense


def run(*args, cwd):
    subprocess.run(args, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def make_images(d):
    """Returns {name: bytes} of small valid images of every kind the engine reads."""
    raw = os.path.join(d, "pattern.raw")
    with open(raw, "wb") as f:
        for i in range(256):  # 128 KiB, every 512-byte sector different and compressible
            f.write(bytes([i]) * 256 + bytes(range(256)))
    specs = {
        "plain": (["create", "-f", "qcow2", "-o", "cluster_size=512", "img", "128k"],
                  ["write -P 0x11 0 4k", "write -P 0x12 9k 3k", "write -z 20k 4k", "write -P 0x13 100k 512"]),
        "snapshots": (["create", "-f", "qcow2", "-o", "cluster_size=512", "img", "64k"],
                      ["write -P 0x21 0 2k"]),
        "compressed-zlib": (["convert", "-c", "-O", "qcow2", "-o", "cluster_size=512", "pattern.raw", "img"], []),
        "compressed-zstd": (["convert", "-c", "-O", "qcow2", "-o", "cluster_size=512,compression_type=zstd",
                             "pattern.raw", "img"], []),
        "lazy-refcounts": (["create", "-f", "qcow2", "-o", "cluster_size=512,lazy_refcounts=on", "img", "64k"],
                           ["write -P 0x31 0 3k", "write -P 0x32 30k 1k"]),
        "extended-l2": (["create", "-f", "qcow2", "-o", "cluster_size=16k,extended_l2=on", "img", "256k"],
                        ["write -P 0x41 0 1k", "write -P 0x42 18k 2k", "write -z 40k 2k", "write -P 0x43 64k 16k"]),
        "v2": (["create", "-f", "qcow2", "-o", "cluster_size=512,compat=0.10", "img", "64k"],
               ["write -P 0x51 0 2k", "write -z 4k 1k"]),
        "bitmaps": (["create", "-f", "qcow2", "-o", "cluster_size=512", "img", "64k"], ["write -P 0x61 0 2k"]),
        "refcount-bits-1": (["create", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=1", "img", "64k"],
                            ["write -P 0x71 0 2k"]),
    }
    images = {}
    for name, (create, writes) in specs.items():
        img = os.path.join(d, "img")
        if os.path.exists(img):
            os.remove(img)
        run("qemu-img", *create, cwd=d)
        if writes:
            run("qemu-io", "-f", "qcow2", *sum((["-c", w] for w in writes), []), "img", cwd=d)
        if name == "snapshots":
            run("qemu-img", "snapshot", "-c", "first", "img", cwd=d)
            run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1k 2k", "img", cwd=d)
            run("qemu-img", "snapshot", "-c", "second", "img", cwd=d)
        if name == "bitmaps":
            run("qemu-img", "bitmap", "--add", "img", "b0", cwd=d)
            run("qemu-img", "bitmap", "--add", "-g", "4096", "img", "b1", cwd=d)
        with open(img, "rb") as f:
            images[name] = f.read()
    # Headers only (their files are not needed): backing file and format, external data file.
    run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "pattern.raw", "-F", "raw",
        "backed", "128k", cwd=d)
    run("qemu-img", "create", "-f", "qcow2", "-o", "data_file=data.raw,data_file_raw=on", "external", "64k", cwd=d)
    headers = {}
    for name in ("backed", "external"):
        with open(os.path.join(d, name), "rb") as f:
            headers[name] = f.read(4096)
    return images, headers


def be(fmt, data, at):
    return struct.unpack_from(">" + fmt, data, at)[0]


def extensions(img):
    """{type: payload} of the header extensions."""
    at, out = be("I", img, 100), {}
    while at + 8 <= len(img):
        kind, length = be("I", img, at), be("I", img, at + 4)
        if kind == 0:
            break
        out[kind] = img[at + 8:at + 8 + length]
        at += 8 + (length + 7) // 8 * 8
    return out


def qcow2_seeds():
    with tempfile.TemporaryDirectory() as d:
        images, headers = make_images(d)
    engine, meta = "FuzzQCOW2Engine", "FuzzQCOW2Metadata"
    # Mode bits: 1 read-write, 2 dirty (repair at open), 4 export snapshot "1", 8 small L2 cache.
    modes = {"plain": [0, 1, 9], "snapshots": [1, 4], "compressed-zlib": [0, 1], "compressed-zstd": [0, 9],
             "lazy-refcounts": [3], "extended-l2": [0, 1], "v2": [1, 3], "bitmaps": [1], "refcount-bits-1": [3]}
    for name, img in images.items():
        for mode in modes[name]:
            write(engine, "%s-mode%d" % (name, mode), bytes([mode]) + img)
        cluster = 1 << be("I", img, 20)
        head = img[:min(cluster, 4096)]
        write(meta, "header-" + name, bytes([0]) + struct.pack(">Q", len(img)) + bytes([1]) + head)
        l1 = be("Q", img, 40)
        l2 = be("Q", img, l1) & 0x00FFFFFFFFFFFE00
        if l2:
            extended = name == "extended-l2"
            shape = (0x80 | (be("I", img, 20) - 14)) if extended else be("I", img, 20) - 9
            write(meta, "l2-" + name, bytes([3, shape]) + struct.pack(">QI", 1000, 1 << 16) + img[l2:l2 + cluster])
    for name, head in headers.items():
        write(meta, "header-" + name, bytes([0]) + struct.pack(">Q", 1 << 20) + bytes([0]) + head)
    snaps = images["snapshots"]
    count, offset = be("I", snaps, 60), be("Q", snaps, 64)
    write(meta, "snapshot-table", bytes([1, count]) + snaps[offset:offset + 1024])
    bitmaps = extensions(images["bitmaps"])[0x23852875]
    count, size, offset = be("I", bitmaps, 0), be("Q", bitmaps, 8), be("Q", bitmaps, 16)
    write(meta, "bitmap-directory", bytes([2, count]) + images["bitmaps"][offset:offset + size])


# --- compressed clusters: [shape][descriptor][file bytes]


def descriptor(cluster_bits, host, length):
    shift = 62 - (cluster_bits - 8)
    sectors = ((host & 511) + length + 511) // 512
    return struct.pack(">Q", (1 << 62) | ((sectors - 1) << shift) | host)


def decompression_seeds():
    t = "FuzzDecompression"
    for bits in (9, 12, 16):
        cluster = (bytes(range(256)) * 2 + b"qcow2" * 100)[:1 << bits].ljust(1 << bits, b"z")
        deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
        streams = {0: deflate.compress(cluster) + deflate.flush()}
        streams[1] = subprocess.run(["zstd", "-q", "-c", "-19"], input=cluster, check=True,
                                    stdout=subprocess.PIPE).stdout
        for kind, stream in streams.items():
            host = 24 + bits  # unaligned on purpose: the descriptor's sector arithmetic
            shape = kind | ((bits - 9) << 1)
            write(t, "%s-%d" % ("zlib" if kind == 0 else "zstd", 1 << bits),
                  bytes([shape]) + descriptor(bits, host, len(stream)) + bytes(host) + stream)


if __name__ == "__main__":
    negotiation_seeds()
    transmission_seeds()
    qcow2_seeds()
    decompression_seeds()
