#!/usr/bin/env python3
"""Runs swiftnbd and the reference servers (qemu-nbd, nbdkit) side by side on
the same images in one run and prints throughput and ratios.

The machine is small and noisy: compare the ratios printed by one run, not
absolute figures across runs. Each measurement is the best of --repeat runs.

Usage: benchmarks/compare.py [--size-gib N] [--repeat N] [--only NAME ...]
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWIFTNBD = os.path.join(ROOT, ".build", "release", "swiftnbd")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start listening")


class Server:
    """A server process on a loopback port, stopped by its PID."""

    def __init__(self, name, argv_for_port):
        self.name = name
        self.port = free_port()
        self.proc = subprocess.Popen(argv_for_port(self.port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_listening(self.port, self.proc)

    @property
    def uri(self):
        return f"nbd://127.0.0.1:{self.port}"

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def servers_for(image, fmt, writable=False, connections=4):
    """Every server that can export this image, each as (name, argv builder)."""
    ro = [] if writable else ["-r"]
    result = [
        ("swiftnbd", lambda p: [SWIFTNBD, "-t", "-b", "127.0.0.1", "-p", str(p), "-f", fmt,
                                "-e", str(connections)] + ro + [image]),
        ("qemu-nbd", lambda p: ["qemu-nbd", "-t", "-b", "127.0.0.1", "-p", str(p), "-f", fmt,
                                "-e", str(connections), "--cache=writeback", "--aio=threads"] + ro + [image]),
    ]
    if fmt == "raw":
        result.append(("nbdkit", lambda p: ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(p)]
                       + (["-r"] if not writable else []) + ["file", image]))
    return result


def timed(argv):
    start = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return time.perf_counter() - start


def run_fio(uri, rw, seconds):
    port = uri.rsplit(":", 1)[1]
    out = subprocess.run(
        ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k", "--iodepth=32",
         f"--runtime={seconds}", "--time_based", "--output-format=json", "--size=100%"],
        check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return job["read" if "read" in rw else "write"]["iops"]


def report(title, unit, results):
    """results: {server: value}; higher is better. Prints each value and its ratio to swiftnbd's."""
    base = results.get("swiftnbd")
    print(f"\n{title}")
    for name, value in results.items():
        ratio = f"swiftnbd/{name} = {base / value:.2f}" if base and name != "swiftnbd" and value else ""
        print(f"  {name:10s} {value:12.1f} {unit}  {ratio}")
    sys.stdout.flush()


def make_half_random(path, size):
    """Half incompressible data, half zeros, interleaved per MiB pair."""
    mib = 1 << 20
    with open(path, "wb") as f:
        for i in range(size // mib):
            f.write(os.urandom(mib) if i % 2 == 0 else bytes(mib))


def bench_read(name, image, fmt, size, repeat):
    results = {}
    for server_name, argv in servers_for(image, fmt):
        server = Server(server_name, argv)
        try:
            best = min(timed(["nbdcopy", "--no-extents", server.uri, "null:"]) for _ in range(repeat))
            results[server_name] = size / best / (1 << 20)
        finally:
            server.stop()
    report(f"{name}: nbdcopy --no-extents URI null: ({size >> 20} MiB)", "MiB/s", results)


def bench_fio(name, image, fmt, rw, seconds, writable):
    results = {}
    for server_name, argv in servers_for(image, fmt, writable=writable, connections=1):
        server = Server(server_name, argv)
        try:
            results[server_name] = run_fio(server.uri, rw, seconds)
        finally:
            server.stop()
    report(f"{name}: fio --ioengine=nbd --rw={rw} --bs=4k --iodepth=32, {seconds}s", "IOPS", results)


def bench_metrics_cost(name, image, fmt, seconds, work):
    """swiftnbd alone, without and with --metrics-file (rewritten every second, to be harsh)."""
    plain = lambda p: [SWIFTNBD, "-t", "-r", "-b", "127.0.0.1", "-p", str(p), "-f", fmt, image]
    metrics = os.path.join(work, "swiftnbd.prom")
    with_metrics = lambda p: plain(p)[:-1] + ["--metrics-file", metrics, "--metrics-interval", "1", image]
    results, cpu = {}, {}
    for label, argv in [("swiftnbd", plain), ("+metrics", with_metrics)]:
        server = Server(label, argv)
        try:
            results[label] = run_fio(server.uri, "randread", seconds)
            # The server's CPU time per request: less swayed than IOPS by other load on the machine.
            with open(f"/proc/{server.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks = int(fields[11]) + int(fields[12])
            cpu[label] = ticks / os.sysconf("SC_CLK_TCK") / (results[label] * seconds) * 1e6
        finally:
            server.stop()
    report(f"{name}: fio --ioengine=nbd --rw=randread --bs=4k --iodepth=32, {seconds}s, "
           f"without and with --metrics-file", "IOPS", results)
    for label, micros in cpu.items():
        print(f"  {label:10s} {micros:12.2f} µs of server CPU per request")


def fresh_qcow2(path, size, preallocation=None):
    if os.path.exists(path):
        os.remove(path)
    opts = ["-o", f"preallocation={preallocation}"] if preallocation else []
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2"] + opts + [path, str(size)], check=True)


def qemu_img_check(path):
    r = subprocess.run(["qemu-img", "check", "-f", "qcow2", path], capture_output=True, text=True)
    return "clean" if r.returncode == 0 else f"check exit {r.returncode}: {r.stdout.strip().splitlines()[-1:]}"


def bench_write_seq(raw, size, work, repeat):
    """nbdcopy of a raw file into an empty qcow2 twice its size: allocating sequential writes."""
    results, checks = {}, {}
    target = os.path.join(work, "target.qcow2")
    for server_name, _ in servers_for(target, "qcow2", writable=True):
        best = None
        for _ in range(repeat):
            fresh_qcow2(target, 2 * size)
            argv = dict(servers_for(target, "qcow2", writable=True))[server_name]
            server = Server(server_name, argv)
            try:
                t = timed(["nbdcopy", raw, server.uri])
            finally:
                server.stop()
            best = t if best is None else min(best, t)
            checks[server_name] = qemu_img_check(target)
        results[server_name] = size / best / (1 << 20)
    report(f"qcow2-write-seq: nbdcopy {size >> 20} MiB raw file into an empty {2 * size >> 20} MiB qcow2", "MiB/s",
           results)
    print("  qemu-img check afterwards: " + ", ".join(f"{k}: {v}" for k, v in checks.items()))


def bench_fio_write(name, size, work, seconds, preallocation):
    results, checks = {}, {}
    target = os.path.join(work, f"{name}.qcow2")
    for server_name, _ in servers_for(target, "qcow2", writable=True):
        fresh_qcow2(target, size, preallocation)
        argv = dict(servers_for(target, "qcow2", writable=True, connections=1))[server_name]
        server = Server(server_name, argv)
        try:
            results[server_name] = run_fio(server.uri, "randwrite", seconds)
        finally:
            server.stop()
        checks[server_name] = qemu_img_check(target)
    report(f"{name}: fio --rw=randwrite --bs=4k --iodepth=32 on a {'preallocated' if preallocation else 'empty'} "
           f"qcow2, {seconds}s", "IOPS", results)
    print("  qemu-img check afterwards: " + ", ".join(f"{k}: {v}" for k, v in checks.items()))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fio-seconds", type=int, default=10)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    if not os.path.exists(SWIFTNBD):
        subprocess.run(["swift", "build", "-c", "release", "--product", "swiftnbd"], cwd=ROOT, check=True)
    size = int(args.size_gib * (1 << 30)) // (1 << 20) * (1 << 20)
    work = tempfile.mkdtemp(prefix="swiftnbd-bench.", dir="/var/tmp")
    wanted = lambda n: args.only is None or n in args.only
    try:
        raw = os.path.join(work, "disk.raw")
        make_half_random(raw, size)
        if wanted("raw-read"):
            bench_read("raw-read", raw, "raw", size, args.repeat)
        if wanted("qcow2-read") or wanted("qcow2-fio") or wanted("metrics-fio"):
            qcow = os.path.join(work, "disk.qcow2")
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow], check=True)
            if wanted("qcow2-read"):
                bench_read("qcow2-read", qcow, "qcow2", size, args.repeat)
            if wanted("qcow2-fio"):
                bench_fio("qcow2-fio", qcow, "qcow2", "randread", args.fio_seconds, False)
            if wanted("metrics-fio"):
                bench_metrics_cost("metrics-fio qcow2", qcow, "qcow2", args.fio_seconds, work)
                bench_metrics_cost("metrics-fio raw", raw, "raw", args.fio_seconds, work)
        if wanted("qcow2-compressed-read"):
            zqcow = os.path.join(work, "disk-z.qcow2")
            subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, zqcow], check=True)
            bench_read("qcow2-compressed-read", zqcow, "qcow2", size, args.repeat)
        if wanted("qcow2-write-seq"):
            bench_write_seq(raw, size, work, args.repeat)
        if wanted("qcow2-fio-write-prealloc"):
            bench_fio_write("qcow2-fio-write-prealloc", size, work, args.fio_seconds, "metadata")
        if wanted("qcow2-fio-write-empty"):
            bench_fio_write("qcow2-fio-write-empty", size, work, args.fio_seconds, None)
        if wanted("raw-fio"):
            bench_fio("raw-fio", raw, "raw", "randread", args.fio_seconds, False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
