#!/usr/bin/env python3
"""Runs swiftnbd and the reference servers (qemu-nbd, nbdkit) side by side on
the same images in one run and prints throughput and ratios.

The machine is small and noisy: compare the ratios printed by one run, not
absolute figures across runs. Each measurement is the best of --repeat runs.

Usage: benchmarks/compare.py [--quick] [--size-gib N] [--repeat N] [--only NAME ...] [--also NAME=BINARY ...]

--also adds another swiftnbd build to every row (say, main's before a change), so
a change is measured against its base in the same run. --quick runs a reduced set
(fully random raw reads, 4k random reads, connection rate) in under two minutes.

Beside each figure: the server's CPU seconds per GiB moved (utime+stime from
/proc/PID/stat), its resident memory (idle after start, peak VmHWM, and idle
again once the run has settled, for reads) and, for fio, p50/p99 completion
latency.
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


MIB = 1 << 20
GIB = 1 << 30
# Seconds to wait before reading idle RSS: after start, and after a run (swiftnbd's
# buffer pool gives memory back after two trim ticks of 2 s without use).
START_SETTLE = 0.5
RUN_SETTLE = 5.0


def proc_status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def proc_cpu_seconds(pid):
    """utime + stime of every thread, so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """A server process on a loopback port, stopped by its PID, with its CPU
    time and memory read from /proc around the measured work."""

    def __init__(self, name, argv_for_port):
        self.name = name
        self.port = free_port()
        self.proc = subprocess.Popen(argv_for_port(self.port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_listening(self.port, self.proc)
        time.sleep(START_SETTLE)
        self.idle_kib = proc_status_kib(self.proc.pid, "VmRSS")
        self.cpu_start = proc_cpu_seconds(self.proc.pid)

    def usage(self, moved_bytes, settle=False):
        """The server's cost of the work since start: CPU s/GiB, idle/peak/settled RSS in MiB."""
        if settle:
            time.sleep(RUN_SETTLE)
        return self.usage_now(moved_bytes, settled=settle)

    def usage_now(self, moved_bytes, settled):
        pid = self.proc.pid
        cpu = proc_cpu_seconds(pid) - self.cpu_start
        peak = proc_status_kib(pid, "VmHWM")
        after = proc_status_kib(pid, "VmRSS") / 1024 if settled else None
        return {"cpu_s_per_gib": cpu / (moved_bytes / GIB) if moved_bytes else None,
                "idle_mib": self.idle_kib / 1024, "peak_mib": peak / 1024, "after_mib": after}

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


def alternating(servers, rounds, measure, settle=False):
    """Runs `measure(server)` -> (value, bytes moved) on every server in turn, `rounds` times,
    all servers up at once so that load from elsewhere on the machine falls on each alike.
    Returns {name: best value with the server's usage over all rounds}."""
    started = []
    try:
        for name, argv in servers:
            started.append(Server(name, argv))
        best, moved, extra = {}, {}, {}
        for _ in range(rounds):
            for server in started:
                value, nbytes, details = measure(server)
                moved[server.name] = moved.get(server.name, 0) + nbytes
                if server.name not in best or value > best[server.name]:
                    best[server.name], extra[server.name] = value, details
        if settle:
            time.sleep(RUN_SETTLE)
        return {s.name: {"value": best[s.name], **extra[s.name], **s.usage_now(moved[s.name], settle)}
                for s in started}
    finally:
        for server in started:
            server.stop()


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


def run_fio(uri, rw, seconds, iodepth=32):
    """IOPS and completion latency percentiles (µs) of one fio run."""
    out = subprocess.run(
        ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k", f"--iodepth={iodepth}",
         f"--runtime={seconds}", "--time_based", "--output-format=json", "--size=100%"],
        check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read" if "read" in rw else "write"]
    percentiles = side["clat_ns"].get("percentile", {})
    return {"value": side["iops"], "bytes": side["io_bytes"],
            "p50_us": percentiles.get("50.000000", 0) / 1000, "p99_us": percentiles.get("99.000000", 0) / 1000}


def report(title, unit, results):
    """results: {server: value or dict with "value" and usage figures}; higher value is better.
    Prints each value, its ratio to swiftnbd's, and the usage figures measured."""
    results = {k: (v if isinstance(v, dict) else {"value": v}) for k, v in results.items()}
    base = results.get("swiftnbd", {}).get("value")
    print(f"\n{title}")
    for name, r in results.items():
        value = r["value"]
        ratio = f"{base / value:5.2f}" if base and value else "     "
        extra = []
        if r.get("p50_us") is not None:
            extra.append(f"p50 {r['p50_us']:7.1f} µs  p99 {r['p99_us']:7.1f} µs")
        if r.get("cpu_s_per_gib") is not None:
            extra.append(f"cpu {r['cpu_s_per_gib']:5.2f} s/GiB")
        if r.get("peak_mib") is not None:
            rss = f"rss idle {r['idle_mib']:5.1f} peak {r['peak_mib']:6.1f}"
            if r.get("after_mib") is not None:
                rss += f" after {r['after_mib']:5.1f}"
            extra.append(rss + " MiB")
        print(f"  {name:13s} {value:11.1f} {unit:5s} swiftnbd/this {ratio}  " + "  ".join(extra))
    sys.stdout.flush()


def make_half_random(path, size):
    """Half incompressible data, half zeros, interleaved per MiB pair."""
    with open(path, "wb") as f:
        for i in range(size // MIB):
            f.write(os.urandom(MIB) if i % 2 == 0 else bytes(MIB))


def make_random(path, size):
    """Incompressible data throughout: nothing for a server to skip as zeros."""
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))


def bench_read(name, image, fmt, size, repeat, description=""):
    def measure(server):
        return size / timed(["nbdcopy", "--no-extents", server.uri, "null:"]) / MIB, size, {}
    results = alternating(servers_for(image, fmt), repeat, measure, settle=True)
    report(f"{name}: nbdcopy --no-extents URI null: ({size >> 20} MiB{description}), best of {repeat} alternating",
           "MiB/s", results)


# One connection's life per iteration, as a client that only asks the size does it.
CONNECT_LOOP = """
import nbd, sys, time
uri, seconds = sys.argv[1], float(sys.argv[2])
count, deadline = 0, time.monotonic() + seconds
start = time.monotonic()
while time.monotonic() < deadline:
    h = nbd.NBD()
    h.connect_uri(uri)
    h.get_size()
    h.shutdown()
    del h
    count += 1
print(count / (time.monotonic() - start))
"""


def bench_connections(image, seconds, rounds):
    """Connections per second: libnbd (python3-libnbd) connect, get size, shutdown, in a loop."""
    def measure(server):
        out = subprocess.run(["/usr/bin/python3", "-c", CONNECT_LOOP, server.uri, str(seconds)],
                             check=True, capture_output=True, text=True).stdout
        return float(out.strip()), 0, {}
    results = alternating(servers_for(image, "raw", connections=0), rounds, measure)
    report(f"connections: libnbd connect, get size, shutdown in a loop, {seconds}s, best of {rounds} alternating",
           "/s", results)


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


def bench_fio(name, image, fmt, rw, seconds, writable, rounds, iodepth=32, description=""):
    def measure(server):
        r = run_fio(server.uri, rw, seconds, iodepth)
        return r["value"], r["bytes"], {"p50_us": r["p50_us"], "p99_us": r["p99_us"]}
    results = alternating(servers_for(image, fmt, writable=writable, connections=1), rounds, measure)
    report(f"{name}: fio --ioengine=nbd --rw={rw} --bs=4k --iodepth={iodepth}, {seconds}s{description}, "
           f"best of {rounds} alternating (p50/p99 of that run)", "IOPS", results)


def bench_metrics_cost(name, image, fmt, seconds, work):
    """swiftnbd alone, without and with --metrics-file (rewritten every second, to be harsh)."""
    plain = lambda p: [SWIFTNBD, "-t", "-r", "-b", "127.0.0.1", "-p", str(p), "-f", fmt, image]
    metrics = os.path.join(work, "swiftnbd.prom")
    with_metrics = lambda p: plain(p)[:-1] + ["--metrics-file", metrics, "--metrics-interval", "1", image]
    results, cpu = {}, {}
    for label, argv in [("swiftnbd", plain), ("+metrics", with_metrics)]:
        server = Server(label, argv)
        try:
            results[label] = run_fio(server.uri, "randread", seconds)["value"]
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
            r = run_fio(server.uri, "randwrite", seconds)
            results[server_name] = {**r, **server.usage(r["bytes"])}
        finally:
            server.stop()
        checks[server_name] = qemu_img_check(target)
    report(f"{name}: fio --rw=randwrite --bs=4k --iodepth=32 on a {'preallocated' if preallocation else 'empty'} "
           f"qcow2, {seconds}s", "IOPS", results)
    print("  qemu-img check afterwards: " + ", ".join(f"{k}: {v}" for k, v in checks.items()))


QUICK_ROWS = ["raw-random-read", "raw-fio", "qcow2-fio", "qcow2-fio-qd1", "connections"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true",
                        help="a reduced set on 256 MiB images, one repeat, 4 s fio runs: " + ", ".join(QUICK_ROWS))
    parser.add_argument("--size-gib", type=float, default=None)
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--fio-seconds", type=int, default=None)
    parser.add_argument("--fio-rounds", type=int, default=None, help="fio runs per server, alternating")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--also", nargs="*", default=[], metavar="NAME=BINARY")
    args = parser.parse_args()
    quick = lambda q, full: q if args.quick else full
    size_gib = args.size_gib if args.size_gib is not None else quick(0.25, 1.0)
    repeat = args.repeat if args.repeat is not None else quick(1, 3)
    fio_seconds = args.fio_seconds if args.fio_seconds is not None else quick(4, 10)
    fio_rounds = args.fio_rounds if args.fio_rounds is not None else quick(1, 2)
    only = args.only if args.only is not None else (QUICK_ROWS if args.quick else None)
    for spec in args.also:
        name, _, path = spec.partition("=")
        EXTRA_BUILDS.append((name, os.path.abspath(path)))
    # Always: a release binary left from an older tree would be measured as this one.
    subprocess.run(["swift", "build", "-c", "release", "--product", "swiftnbd"], cwd=ROOT, check=True)
    size = int(size_gib * GIB) // MIB * MIB
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"compare.py {' '.join(sys.argv[1:])}: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} CPUs, load average {load}; swiftnbd/this > 1 means swiftnbd is ahead")
    work = tempfile.mkdtemp(prefix="swiftnbd-bench.", dir="/var/tmp")
    wanted = lambda n: only is None or n in only
    try:
        raw = os.path.join(work, "disk.raw")
        make_half_random(raw, size)
        random_raw = os.path.join(work, "random.raw")
        if wanted("raw-random-read") or wanted("raw-fio") or wanted("connections"):
            make_random(random_raw, size)
        if wanted("raw-read"):
            bench_read("raw-read", raw, "raw", size, repeat, ", half random, half zeros")
        if wanted("raw-random-read"):
            bench_read("raw-random-read", random_raw, "raw", size, repeat, ", all random")
        if wanted("raw-fio"):
            bench_fio("raw-fio", random_raw, "raw", "randread", fio_seconds, False, fio_rounds,
                      description=", all random raw")
        if any(wanted(n) for n in ["qcow2-read", "qcow2-fio", "qcow2-fio-qd1", "metrics-fio"]):
            qcow = os.path.join(work, "disk.qcow2")
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow], check=True)
            if wanted("qcow2-read"):
                bench_read("qcow2-read", qcow, "qcow2", size, repeat, ", half random, half zeros")
            if wanted("qcow2-fio"):
                bench_fio("qcow2-fio", qcow, "qcow2", "randread", fio_seconds, False, fio_rounds)
            if wanted("qcow2-fio-qd1"):
                bench_fio("qcow2-fio-qd1", qcow, "qcow2", "randread", fio_seconds, False, fio_rounds, iodepth=1)
            if wanted("metrics-fio"):
                bench_metrics_cost("metrics-fio qcow2", qcow, "qcow2", fio_seconds, work)
                bench_metrics_cost("metrics-fio raw", raw, "raw", fio_seconds, work)
        if wanted("qcow2-compressed-read"):
            zqcow = os.path.join(work, "disk-z.qcow2")
            subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, zqcow], check=True)
            bench_read("qcow2-compressed-read", zqcow, "qcow2", size, repeat)
        if wanted("qcow2-write-seq"):
            bench_write_seq(raw, size, work, repeat)
        if wanted("qcow2-fio-write-prealloc"):
            bench_fio_write("qcow2-fio-write-prealloc", size, work, fio_seconds, "metadata")
        if wanted("qcow2-fio-write-empty"):
            bench_fio_write("qcow2-fio-write-empty", size, work, fio_seconds, None)
        if wanted("connections"):
            bench_connections(random_raw, quick(2, 4), fio_rounds)
        if wanted("qcow2-tls-read"):
            bench_tls_read(work, size, repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
