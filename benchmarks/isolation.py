#!/usr/bin/python3
"""Hostile-client cases run against swiftnbd and qemu-nbd side by side (and
nbdkit where it applies), each on a fresh server over the same image, and
printed as one table: what one misbehaving client costs the server and the
other clients.

Needs python3-libnbd, so it runs on the system Python (/usr/bin/python3).
Usage: benchmarks/isolation.py [--binary PATH] [--only CASE ...]
"""
import argparse
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import nbd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NBD_MAGIC, OPT_MAGIC, REQ_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x25609513
OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 7, 8, 10
CMD_READ, CMD_WRITE, CMD_BLOCK_STATUS = 0, 1, 7


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name, argv_for_port, image, fmt):
        self.name = name
        self.port = free_port()
        argv = argv_for_port(self.port, image, fmt)
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"{name} did not start")
                time.sleep(0.05)

    @property
    def uri(self):
        return f"nbd://127.0.0.1:{self.port}"

    def cpu_seconds(self):
        fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory_mib(self):
        """(current RSS, peak RSS) in MiB."""
        values = {}
        for line in open(f"/proc/{self.proc.pid}/status"):
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
        return values["VmRSS"], values["VmHWM"]

    def terminate(self, timeout=60):
        """SIGTERM; seconds until exit (None if it had to be killed)."""
        start = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
            return time.perf_counter() - start
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class RawClient:
    """Fixed newstyle by hand, so it can misbehave."""

    def __init__(self, port, structured=False, contexts=()):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.recv_exact(18)
        self.sock.sendall(struct.pack(">I", 3))
        if structured:
            self.option(OPT_STRUCTURED_REPLY, b"")
        if contexts:
            queries = b"".join(struct.pack(">I", len(c)) + c.encode() for c in contexts)
            self.option(OPT_SET_META_CONTEXT, struct.pack(">I", 0) + struct.pack(">I", len(contexts)) + queries)
        self.option(OPT_GO, struct.pack(">IH", 0, 0))

    def option(self, code, payload):
        self.sock.sendall(struct.pack(">QII", OPT_MAGIC, code, len(payload)) + payload)
        while True:
            _, _, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
            self.recv_exact(length)
            if rtype == 1 or rtype & 0x80000000:
                return

    def recv_exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def send_requests(self, command, count, length, offset=0):
        header = b"".join(struct.pack(">IHHQQI", REQ_MAGIC, 0, command, i, offset, length) for i in range(count))
        self.sock.sendall(header)

    def close(self):
        self.sock.close()


def swiftnbd_argv(binary):
    return lambda p, image, fmt: [binary, "-t", "-e", "4", "-b", "127.0.0.1", "-p", str(p), "-f", fmt, image]


def qemu_nbd_argv(p, image, fmt):
    return ["qemu-nbd", "-t", "-e", "4", "-b", "127.0.0.1", "-p", str(p), "-f", fmt, image]


def nbdkit_argv(p, image, fmt):
    return ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(p), "-t", "16", "file", image]


def other_client_seconds(server, reads=10, timeout=30):
    """Time for a well-behaved client to connect and make `reads` 4 KiB reads (None: no answer in time)."""
    result = {}

    def run():
        start = time.perf_counter()
        h = nbd.NBD()
        h.connect_uri(server.uri)
        for i in range(reads):
            h.pread(4096, i * 4096)
        h.shutdown()
        result["t"] = time.perf_counter() - start

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return result.get("t")


def fmt_seconds(t):
    return "no answer in 30 s" if t is None else f"{t:.3f} s"


# Each case: (name, formats, function(server, image) -> text)
def case_stalled_reader(server, image):
    c = RawClient(server.port)
    c.send_requests(CMD_READ, 300, 1 << 20)
    time.sleep(0.5)
    t = other_client_seconds(server)
    c.close()
    return f"other client: {fmt_seconds(t)}"


def case_stalled_then_sigterm(server, image):
    c = RawClient(server.port)
    c.send_requests(CMD_READ, 300, 1 << 20)
    time.sleep(0.5)
    t = server.terminate(timeout=30)
    c.close()
    return "exit: " + ("none within 30 s" if t is None else f"{t:.2f} s, status {server.proc.returncode}")


def case_queued_reads_then_leave(server, image):
    c = RawClient(server.port)
    c.send_requests(CMD_READ, 5000, 32 << 20)
    time.sleep(0.5)
    c.close()
    left = server.cpu_seconds()
    time.sleep(3)
    after = server.cpu_seconds() - left
    t = server.terminate(timeout=60)
    return f"CPU after leaving: {after:.2f} s in 3 s; SIGTERM: " + ("> 60 s" if t is None else f"{t:.2f} s")


def case_block_status(server, image):
    c = RawClient(server.port, structured=True, contexts=["base:allocation"])
    size = os.path.getsize(image)
    length = min(size, (4 << 30) - 4096)
    c.sock.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_BLOCK_STATUS, 1, 0, length))
    total = 0
    while True:
        _, flags, _, _, n = struct.unpack(">IHHQI", c.recv_exact(20))
        c.recv_exact(n)
        total += n
        if flags & 1:
            break
    c.send_requests(CMD_BLOCK_STATUS, 64, length)
    time.sleep(3)
    t = other_client_seconds(server)
    _, peak = server.memory_mib()
    c.close()
    return f"reply {total / 1024:.0f} KiB; 64 unread: peak RSS {peak:.0f} MiB, other client {fmt_seconds(t)}"


def case_oversized_write(server, image):
    c = RawClient(server.port)
    c.sock.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_WRITE, 1, 0, 0xFFFFFFFF))
    block = bytes(1 << 20)
    sent = 0
    c.sock.settimeout(5)
    try:
        while sent < (4 << 30):
            c.sock.sendall(block)
            sent += len(block)
    except OSError:
        pass
    c.close()
    return f"server took {sent >> 20} MiB of the payload before closing"


def case_read_storm_memory(server, image):
    for _ in range(3):
        subprocess.run(["nbdcopy", "--request-size=33554432", "--requests=8", "--connections=4",
                        server.uri, "null:"], check=True)
    rss, peak = server.memory_mib()
    time.sleep(5)
    idle, _ = server.memory_mib()
    return f"peak {peak:.0f} MiB, right after {rss:.0f} MiB, 5 s later {idle:.0f} MiB"


CASES = [
    ("stalled-reader", "one client pipelines 300 reads of 1 MiB and never reads", ["raw", "qcow2"],
     case_stalled_reader),
    ("stalled-sigterm", "same, then SIGTERM", ["raw", "qcow2"], case_stalled_then_sigterm),
    ("queued-reads-leave", "5,000 reads of 32 MiB pipelined, then disconnect", ["raw"], case_queued_reads_then_leave),
    ("block-status", "BLOCK_STATUS over a fragmented 2 GiB raw image", ["fragmented"], case_block_status),
    ("oversized-write", "WRITE header with a 4 GiB length", ["raw"], case_oversized_write),
    ("read-storm-memory", "RSS around 3 nbdcopy runs with 32 MiB requests", ["raw"], case_read_storm_memory),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default=os.path.join(ROOT, ".build", "release", "swiftnbd"))
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    servers = [("swiftnbd", swiftnbd_argv(args.binary)), ("qemu-nbd", qemu_nbd_argv)]
    work = tempfile.mkdtemp(prefix="swiftnbd-isolation.", dir="/var/tmp")
    try:
        raw = os.path.join(work, "disk.raw")
        with open(raw, "wb") as f:
            for i in range(64):
                f.write(os.urandom(1 << 20))
        qcow2 = os.path.join(work, "disk.qcow2")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2], check=True)
        fragmented = os.path.join(work, "fragmented.raw")
        fd = os.open(fragmented, os.O_WRONLY | os.O_CREAT, 0o644)
        os.ftruncate(fd, 2 << 30)
        for offset in range(0, 2 << 30, 8192):
            os.pwrite(fd, b"\x5a" * 4096, offset)
        os.close(fd)
        images = {"raw": (raw, "raw"), "qcow2": (qcow2, "qcow2"), "fragmented": (fragmented, "raw")}
        for name, title, kinds, run in CASES:
            if args.only and name not in args.only:
                continue
            for kind in kinds:
                image, fmt = images[kind]
                print(f"\n{title} ({kind})")
                for server_name, argv in servers:
                    server = Server(server_name, argv, image, fmt)
                    try:
                        print(f"  {server_name:9s} {run(server, image)}")
                    except Exception as e:
                        print(f"  {server_name:9s} failed: {e}")
                    finally:
                        server.stop()
                    sys.stdout.flush()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
