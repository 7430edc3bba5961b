// Micro-benchmarks of the server's hot paths, as a plain release executable:
//   swift build -c release --product HotPathBenchmarks && .build/release/HotPathBenchmarks
// Each line: what ran, how many times, and the time per operation (best of 5 runs, so
// other load on the machine shows less). Images are made with qemu-img in a scratch directory.
import BlockDevice
import Glibc
import NBDProtocol
import QCOW2
import SystemIO

/// Best-of-`runs` nanoseconds per operation of `body`, which does `operations` operations.
func measure(_ name: String, operations: Int, runs: Int = 5, unit: String = "op", bytesPerOperation: Int = 0,
             _ body: () throws -> Void) rethrows {
    var best = UInt64.max
    for _ in 0..<runs {
        let start = MonotonicClock.now()
        try body()
        best = min(best, MonotonicClock.now() - start)
    }
    let perOperation = Double(best) / Double(operations)
    var line = "\(name): \(operations) x, \(formatted(perOperation)) ns/\(unit)"
    if bytesPerOperation > 0 {
        line += ", \(formatted(Double(bytesPerOperation) / perOperation * 1e9 / Double(1 << 20))) MiB/s"
    }
    print(line)
}

func formatted(_ value: Double) -> String {
    let hundredths = Int((value * 100).rounded())
    let fraction = hundredths % 100
    return "\(hundredths / 100).\(fraction < 10 ? "0" : "")\(fraction)"
}

func shell(_ command: String) {
    guard system(command) == 0 else { fatalError("failed: \(command)") }
}

// MARK: - Request decode (every request's header, on the connection's reader thread)

func benchmarkRequestDecode() {
    let count = 1_000_000
    var writer = WireWriter(capacity: 28 * 64)
    for i in 0..<64 {
        Request(command: .read, cookie: UInt64(i), offset: UInt64(i) << 12, length: 4096).encode(into: &writer)
    }
    let headers = writer.bytes
    var checksum: UInt64 = 0
    headers.withUnsafeBytes { raw in
        measure("request decode (compact header)", operations: count) {
            for _ in 0..<(count / 64) {
                var reader = WireReader(raw)
                while let request = try! Request.decode(&reader) { checksum &+= request.offset }
            }
        }
    }
    precondition(checksum != 0)
}

// MARK: - qcow2 reads through the engine (L2 lookup with a warm cache, cluster decompression)

func benchmarkQCOW2(scratch: String) throws {
    let size = 64 << 20
    let raw = scratch + "/source.raw"
    // Compressible but not trivial: 4 KiB of random bytes, then 12 KiB of a repeated pattern.
    shell("python3 -c \"import os,sys; f=open('\(raw)','wb'); [f.write(os.urandom(4096) + bytes(range(256))*48) "
          + "for _ in range(\(size) // 16384)]\"")
    let plain = scratch + "/plain.qcow2"
    shell("qemu-img convert -q -f raw -O qcow2 \(raw) \(plain)")
    let device = try QCOW2Device(path: plain, readOnly: true)
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 10, alignment: 4096)
    defer { buffer.deallocate() }
    var random = SystemRandomNumberGenerator()
    let offsets = (0..<100_000).map { _ in UInt64.random(in: 0..<UInt64(size >> 12), using: &random) << 12 }
    let small = UnsafeMutableRawBufferPointer(rebasing: buffer[..<4096])
    try measure("qcow2 4k random read, warm L2 cache (page-cache pread)", operations: offsets.count,
                unit: "read", bytesPerOperation: 4096) {
        for offset in offsets { try device.read(into: small, at: offset) }
    }
    device.close()
    for compression in ["zlib", "zstd"] {
        let image = scratch + "/\(compression).qcow2"
        shell("qemu-img convert -q -c -f raw -O qcow2 -o compression_type=\(compression) \(raw) \(image)")
        let compressed = try QCOW2Device(path: image, readOnly: true)
        let reads = size / buffer.count
        try measure("qcow2 64k sequential read, \(compression) clusters", operations: reads, unit: "read",
                    bytesPerOperation: buffer.count) {
            for i in 0..<reads { try compressed.read(into: buffer, at: UInt64(i * buffer.count)) }
        }
        compressed.close()
    }
}

let scratch = String(cString: mkdtemp(strdup("/var/tmp/swiftnbd-hotpaths.XXXXXX")))
defer { shell("rm -rf \(scratch)") }
benchmarkRequestDecode()
do {
    try benchmarkQCOW2(scratch: scratch)
} catch {
    print("qcow2 benchmarks failed: \(error)")
}
