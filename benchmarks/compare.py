#!/usr/bin/env python3
"""Runs swiftnbd and the reference servers (qemu-nbd, nbdkit) side by side on
the same images in one run and prints throughput and ratios.

The machine is small and noisy: compare the ratios printed by one run, not
absolute figures across runs. Each measurement is the best of --repeat runs.

Usage: benchmarks/compare.py [--size-gib N] [--repeat N] [--only NAME ...] [--also NAME=BINARY ...]

--also adds another swiftnbd build to every row (say, main's before a change), so
a change is measured against its base in the same run.
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
# Other swiftnbd builds to run beside this one: [(name, path)], from --also.
EXTRA_BUILDS = []


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
    swiftnbd = lambda binary: lambda p: [binary, "-t", "-b", "127.0.0.1", "-p", str(p), "-f", fmt,
                                         "-e", str(connections)] + ro + [image]
    result = [("swiftnbd", swiftnbd(SWIFTNBD))] + [(name, swiftnbd(path)) for name, path in EXTRA_BUILDS] + [
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


def make_x509(work):
    """A CA and a server certificate for 127.0.0.1, made with certtool, in work/pki."""
    pki = os.path.join(work, "pki")
    os.makedirs(pki)
    run = lambda *a: subprocess.run(["certtool", *a], check=True, capture_output=True)
    for name, lines in [("ca", ["cn = bench CA", "ca", "cert_signing_key"]),
                        ("server", ["cn = 127.0.0.1", "ip_address = 127.0.0.1", "tls_www_server", "encryption_key",
                                    "signing_key"])]:
        with open(os.path.join(pki, name + ".info"), "w") as f:
            f.write("\n".join(lines + ["expiration_days = 2"]) + "\n")
    run("--generate-privkey", "--outfile", os.path.join(pki, "ca-key.pem"))
    run("--generate-self-signed", "--load-privkey", os.path.join(pki, "ca-key.pem"),
        "--template", os.path.join(pki, "ca.info"), "--outfile", os.path.join(pki, "ca-cert.pem"))
    run("--generate-privkey", "--outfile", os.path.join(pki, "server-key.pem"))
    run("--generate-certificate", "--load-privkey", os.path.join(pki, "server-key.pem"),
        "--load-ca-certificate", os.path.join(pki, "ca-cert.pem"), "--load-ca-privkey", os.path.join(pki, "ca-key.pem"),
        "--template", os.path.join(pki, "server.info"), "--outfile", os.path.join(pki, "server-cert.pem"))
    return pki


def bench_tls_read(work, size, repeat):
    """nbdcopy reads of a fully random qcow2 (every byte crosses the wire), plaintext and over TLS
    with X.509 credentials (no client certificates), swiftnbd and qemu-nbd, one connection each."""
    raw = os.path.join(work, "random.raw")
    with open(raw, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    qcow = os.path.join(work, "random.qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow], check=True)
    os.unlink(raw)
    pki = make_x509(work)
    swift = lambda extra: lambda p: [SWIFTNBD, "-t", "-b", "127.0.0.1", "-p", str(p), "-f", "qcow2", "-r"] + extra + [qcow]
    qemu = lambda extra: lambda p: ["qemu-nbd", "-t", "-b", "127.0.0.1", "-p", str(p), "-f", "qcow2", "-r",
                                     "--cache=writeback", "--aio=threads"] + extra + [qcow]
    qemu_tls = ["--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=server,verify-peer=off", "--tls-creds", "tls0"]
    cases = [("swiftnbd", swift([]), False), ("qemu-nbd", qemu([]), False),
             ("swiftnbd+tls", swift(["--tls-certificates", pki]), True), ("qemu-nbd+tls", qemu(qemu_tls), True)]
    results = {}
    for name, argv, tls in cases:
        server = Server(name, argv)
        uri = f"nbds://127.0.0.1:{server.port}/?tls-certificates={pki}" if tls else server.uri
        try:
            best = min(timed(["nbdcopy", "--no-extents", "--connections=1", uri, "null:"]) for _ in range(repeat))
            results[name] = size / best / (1 << 20)
        finally:
            server.stop()
    report(f"qcow2-tls-read: nbdcopy --no-extents --connections=1 URI null: ({size >> 20} MiB random)", "MiB/s",
           results)
    print(f"  TLS: swiftnbd+tls/qemu-nbd+tls = {results['swiftnbd+tls'] / results['qemu-nbd+tls']:.2f}")


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
    parser.add_argument("--also", nargs="*", default=[], metavar="NAME=BINARY")
    args = parser.parse_args()
    for spec in args.also:
        name, _, path = spec.partition("=")
        EXTRA_BUILDS.append((name, os.path.abspath(path)))
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
        if wanted("qcow2-tls-read"):
            bench_tls_read(work, size, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
