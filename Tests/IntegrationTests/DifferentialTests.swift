import CLibNBD
import Foundation
import Glibc
import TestSupport
import Testing

/// swiftnbd and qemu-nbd, each serving a copy of the same randomly configured qcow2 image with
/// the same options, end with the same disk after the same random operations: every read along
/// the way, the whole export, and `qemu-img convert` of both files agree byte for byte, and
/// `qemu-img check` finds swiftnbd's image as clean as qemu-nbd's.
///
/// `SWIFTNBD_DIFF_SEEDS` (comma-separated) replaces the CI seed list and `SWIFTNBD_DIFF_OPS` the
/// number of operations per seed; `scripts/soak.sh` runs fresh seeds for a given time.
@Suite struct DifferentialTests {
    /// Together they draw every value of every `DifferentialImage` dimension
    /// (`ciSeedsCoverEveryKindOfImage` holds them to it); under two minutes on two busy cores. The
    /// raw data file trim seeds (4, 6, 30, 122, 127, 163, 275, 291, 325, 334, 388) are back since
    /// swiftnbd punches and zero-flags trimmed clusters as qemu-nbd does. Left out: seeds where
    /// qemu-nbd 7.2 itself lost writes or corrupted its image under concurrent requests (1, 25, 43,
    /// 57, 120, 151, 240, 289, 290, 317, 319, 352; 225, 532, 542).
    static let ciSeeds: [UInt64] = [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
                                    26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 44, 45, 46, 47,
                                    48, 49, 50, 51, 52, 53, 54, 55, 56, 58, 59, 60, 61, 62, 63, 64, 65, 66, 122, 127,
                                    163, 174, 275, 291, 325, 334, 388]

    static let seeds: [UInt64] = {
        guard let list = ProcessInfo.processInfo.environment["SWIFTNBD_DIFF_SEEDS"] else { return ciSeeds }
        return list.split(whereSeparator: { $0 == "," || $0 == " " }).map { item in
            guard let seed = UInt64(item) else { preconditionFailure("SWIFTNBD_DIFF_SEEDS: not a seed: \(item)") }
            return seed
        }
    }()

    static let operationCount: Int = {
        guard let text = ProcessInfo.processInfo.environment["SWIFTNBD_DIFF_OPS"] else { return 300 }
        guard let count = Int(text), count > 0 else { preconditionFailure("SWIFTNBD_DIFF_OPS: not a count: \(text)") }
        return count
    }()

    @Test(.timeLimit(.minutes(10)), arguments: seeds)
    func swiftnbdMatchesQemuNBD(seed: UInt64) throws {
        var run = try DifferentialRun(seed: seed, operationCount: Self.operationCount)
        try run.execute()
    }

    /// The CI seeds reach every image kind the generator can draw, so a change to the generator
    /// cannot quietly shrink what CI covers.
    @Test func ciSeedsCoverEveryKindOfImage() {
        let images = Self.ciSeeds.map { DifferentialImage(seed: $0) }
        func covers(_ what: String, _ predicate: (DifferentialImage) -> Bool) {
            let found = images.contains(where: predicate)
            #expect(found, "no CI seed draws \(what)")
        }
        covers("compat=0.10") { !$0.v3 }
        covers("512-byte clusters") { $0.clusterSize == 512 }
        covers("2 MiB clusters") { $0.clusterSize == 2 << 20 }
        for bits in [1, 2, 4, 8, 16, 32, 64] { covers("refcount_bits=\(bits)") { $0.v3 && $0.refcountBits == bits } }
        covers("lazy_refcounts") { $0.lazyRefcounts }
        covers("extended_l2") { $0.extendedL2 }
        covers("zlib clusters") { $0.compression == "zlib" }
        covers("zstd clusters") { $0.compression == "zstd" }
        covers("a raw backing file") { $0.backing == .raw }
        covers("a qcow2 backing file") { $0.backing == .qcow2 }
        covers("a data file") { $0.dataFileRaw == false }
        covers("a raw data file") { $0.dataFileRaw == true }
        for mode in ["metadata", "falloc", "full"] { covers("preallocation=\(mode)") { $0.preallocation == mode } }
        covers("an internal snapshot") { $0.snapshot }
        covers("one connection") { $0.connections == 1 }
        covers("four connections") { $0.connections == 4 }
        covers("--discard ignore") { $0.discard == "ignore" }
        covers("--discard unmap") { $0.discard == "unmap" }
        covers("--detect-zeroes on") { $0.detectZeroes == "on" }
        covers("--detect-zeroes unmap") { $0.detectZeroes == "unmap" }
    }
}

/// One seed's run: builds the image, starts both servers, replays the operations on both.
struct DifferentialRun {
    /// One server and its connections.
    final class Side: @unchecked Sendable {  // each connection is used by one thread at a time
        let name: String
        var clients: [NBDClient] = []
        init(name: String) { self.name = name }
    }

    let seed: UInt64
    let operationCount: Int
    let image: DifferentialImage
    let scratch: TemporaryDirectory
    private var history: [String] = []
    /// What the disk must hold, from the image before the run and every write and zero since;
    /// bytes a trim touched are unspecified (`trimmed`), unless both servers ignore trims
    /// (`--discard ignore`). Only says which server a difference is on: the servers are
    /// compared with each other.
    private var model: [UInt8] = []
    private var trimmed: [Bool] = []  // Bool is one byte: filled with memset below

    init(seed: UInt64, operationCount: Int) throws {
        self.seed = seed
        self.operationCount = operationCount
        image = DifferentialImage(seed: seed)
        scratch = try TemporaryDirectory("swiftnbd-diff")
    }

    /// What a failure message carries: enough to rebuild and replay the run.
    /// `tag` starts the message: DIFF-FAIL for swiftnbd's faults, QEMU-FAULT for qemu-nbd's.
    func failure(_ what: String, tag: String = "DIFF-FAIL") -> Comment {
        let recent = history.suffix(6).joined(separator: "\n    ")
        var log = ""
        if let directory = ProcessInfo.processInfo.environment["SWIFTNBD_DIFF_LOG"] {
            // Every operation so far, for runs whose cause lies further back than the last few.
            let path = "\(directory)/diff-\(seed).log"
            let written = FileManager.default.createFile(
                atPath: path, contents: Data(([image.description] + history).joined(separator: "\n").utf8))
            log = written ? "\n  all operations: \(path)" : "\n  could not write \(path)"
        }
        return Comment(rawValue: """
            \(tag) seed=\(seed): \(what)
              image: \(image)
              last operations:
                \(recent)
              reproduce: SWIFTNBD_DIFF_SEEDS=\(seed) SWIFTNBD_DIFF_OPS=\(operationCount) swift test --filter DifferentialTests\(log)
            """)
    }

    mutating func execute() throws {
        let original = scratch.file("original")
        try FileManager.default.createDirectory(atPath: original, withIntermediateDirectories: false)
        let originalImage = try image.build(in: original, seed: seed)
        // Both copies start clean, so a corruption found at the end is the server's doing.
        let pristine = try Tools.run("qemu-img", ["check", "-f", "qcow2", originalImage])
        try #require(pristine.status == 0, failure("qemu-img check of the image before the run\n\(pristine.stdout)"))
        model = [UInt8](try ImageFactory.rawContents(of: originalImage, format: "qcow2", scratch: scratch))
        trimmed = [Bool](repeating: false, count: model.count)
        precondition(MemoryLayout<Bool>.size == 1)
        let swiftImage = try image.copy(original, to: scratch.file("swiftnbd"))
        let qemuImage = try image.copy(original, to: scratch.file("qemu-nbd"))

        let options = ["-t", "-f", "qcow2", "-e", "\(image.connections)", "--discard", image.discard,
                       "--detect-zeroes", image.detectZeroes]
        let swiftServer = try ServerProcess(options + [swiftImage])
        let qemuServer = try QemuNBDProcess(options + [qemuImage])
        let swift = Side(name: "swiftnbd"), qemu = Side(name: "qemu-nbd")
        swift.clients = [try NBDClient(uri: swiftServer.uri)]
        qemu.clients = [try qemuServer.connect()]
        for _ in 1..<image.connections {
            swift.clients.append(try NBDClient(uri: swiftServer.uri))
            qemu.clients.append(try NBDClient(uri: qemuServer.uri))
        }
        #expect(swift.clients[0].size == qemu.clients[0].size, failure("export sizes differ"))

        let operations = DifferentialOperation.sequence(seed: seed, count: operationCount, image: image)
        var exported: [UInt8] = []
        var diverged = false
        for (index, op) in (operations + [.compareAll]).enumerated() {
            history.append("#\(index) \(op)")
            guard try perform(op, swift: swift, qemu: qemu, exported: &exported) else {
                diverged = true
                break
            }
        }

        for client in swift.clients + qemu.clients { client.shutdown() }
        #expect(swiftServer.stop() == 0, failure("swiftnbd's exit status\n\(swiftServer.log)"))
        #expect(qemuServer.stop() == 0, failure("qemu-nbd's exit status\n\(qemuServer.log)"))
        history.append("servers stopped")

        // The files as qemu reads them, now that neither server holds anything back.
        // After a divergence only the images' health is still comparable.
        if !diverged {
            let swiftRaw = [UInt8](try ImageFactory.rawContents(of: swiftImage, format: "qcow2", scratch: scratch))
            let qemuRaw = [UInt8](try ImageFactory.rawContents(of: qemuImage, format: "qcow2", scratch: scratch))
            expectSame(swiftRaw, qemuRaw, at: 0, "qemu-img convert of the two image files")
            expectSame(swiftRaw, exported, at: 0, "swiftnbd's image file and what it exported",
                       names: ("file", "export"), blameQemu: false)
        }
        try expectCleanImages(swift: swiftImage, qemu: qemuImage)
    }

    // MARK: - Operations

    /// Performs `op` on both servers; false once the run cannot go on.
    private mutating func perform(_ op: DifferentialOperation, swift: Side, qemu: Side,
                                  exported: inout [UInt8]) throws -> Bool {
        switch op {
        case .compare(let s, let q, let offset, let length):
            let ours = try swift.clients[s].pread(count: length, offset: UInt64(offset))
            let theirs = try qemu.clients[q].pread(count: length, offset: UInt64(offset))
            return expectSame(ours, theirs, at: offset, "reads")
        case .compareAll:
            exported = try swift.clients[0].readAll()
            return expectSame(exported, try qemu.clients[0].readAll(), at: 0, "whole exports")
        default:
            for side in [swift, qemu] {
                do {
                    try Self.apply(op, on: side)
                } catch {
                    Issue.record(failure("\(side.name) failed the last operation: \(error)"))
                    return false
                }
            }
            updateModel(op)
            return true
        }
    }

    private mutating func updateModel(_ op: DifferentialOperation) {
        switch op {
        // memcpy and memset: element-wise updates of megabytes are slow in debug builds.
        case .write(_, let offset, let length, let fill, _):
            let payload = DifferentialOperation.payload(fill, length: length)
            model.withUnsafeMutableBytes { m in payload.withUnsafeBytes { p in
                (m.baseAddress! + offset).copyMemory(from: p.baseAddress!, byteCount: length) } }
            trimmed.withUnsafeMutableBytes { _ = memset($0.baseAddress! + offset, 0, length) }
        case .zero(_, let offset, let length, _):
            model.withUnsafeMutableBytes { _ = memset($0.baseAddress! + offset, 0, length) }
            trimmed.withUnsafeMutableBytes { _ = memset($0.baseAddress! + offset, 0, length) }
        case .trim(_, let offset, let length, _) where image.discard == "unmap":
            trimmed.withUnsafeMutableBytes { _ = memset($0.baseAddress! + offset, 1, length) }
        case .concurrent(let ops):
            for op in ops { updateModel(op) }
        case .trim, .flush, .compare, .compareAll:
            break
        }
    }

    /// Sends a write, zero, trim, flush or concurrent batch to one server.
    static func apply(_ op: DifferentialOperation, on side: Side) throws {
        switch op {
        case .write(let c, let offset, let length, let fill, let fua):
            try side.clients[c].pwrite(DifferentialOperation.payload(fill, length: length), offset: UInt64(offset),
                                       flags: fua ? LIBNBD_CMD_FLAG_FUA : 0)
        case .zero(let c, let offset, let length, let flags):
            let client = side.clients[c]
            do {
                try client.zero(count: UInt64(length), offset: UInt64(offset), flags: flags)
            } catch let error as NBDClientError where flags & LIBNBD_CMD_FLAG_FAST_ZERO != 0
                && (error.errno == EOPNOTSUPP || (error.errno == EINVAL && !client.canFastZero)) {
                // A fast zero may be refused (or not offered at all); a client then zeroes the
                // slow way, and the data afterwards is what must agree.
                try client.zero(count: UInt64(length), offset: UInt64(offset), flags: flags & ~LIBNBD_CMD_FLAG_FAST_ZERO)
            }
        case .trim(let c, let offset, let length, let fua):
            try side.clients[c].trim(count: UInt64(length), offset: UInt64(offset), flags: fua ? LIBNBD_CMD_FLAG_FUA : 0)
        case .flush(let c):
            try side.clients[c].flush()
        case .concurrent(let ops):
            let errors = Failures()
            DispatchQueue.concurrentPerform(iterations: ops.count) { i in
                do { try apply(ops[i], on: side) } catch { errors.add("\(ops[i]): \(error)") }
            }
            if let first = errors.messages.first { throw NBDClientError(message: first, errno: 0) }
        case .compare, .compareAll:
            preconditionFailure("reads are compared in perform")
        }
    }

    // MARK: - Checks

    /// Records a failure naming the first differing byte (at `base` + index) unless equal.
    /// Where swiftnbd holds what was written and qemu-nbd does not (qemu 7.2 loses writes that
    /// race on one cluster), the fault is qemu-nbd's: a known issue, not a failure.
    @discardableResult
    func expectSame(_ ours: [UInt8], _ theirs: [UInt8], at base: Int, _ what: String,
                    names: (String, String) = ("swiftnbd", "qemu-nbd"), blameQemu: Bool = true) -> Bool {
        guard ours.count == theirs.count else {
            Issue.record(failure("\(what): \(names.0) has \(ours.count) bytes, \(names.1) \(theirs.count)"))
            return false
        }
        guard let index = Self.firstDifference(ours, theirs) else { return true }
        let end = min(ours.count, index + 16)
        func hex(_ bytes: [UInt8]) -> String { bytes[index..<end].map { String(format: "%02x", $0) }.joined() }
        let at = base + index
        let expected = at >= model.count ? "past the end"
            : trimmed[at] ? "unspecified (trimmed)"
            : model[at..<min(model.count, at + end - index)].map { String(format: "%02x", $0) }.joined()
        let message = "\(what) differ, first at byte \(at): \(names.0) \(hex(ours)), \(names.1) \(hex(theirs)), "
            + "written there: \(expected)"
        if blameQemu && agreesWithModel(ours, at: base) && !agreesWithModel(theirs, at: base) {
            withKnownIssue(isIntermittent: true) { Issue.record(failure(message, tag: "QEMU-FAULT")) }
        } else {
            Issue.record(failure(message))
        }
        return false
    }

    /// True if `bytes`, read at `base`, hold what was written wherever that is specified.
    private func agreesWithModel(_ bytes: [UInt8], at base: Int) -> Bool {
        guard base + bytes.count <= model.count else { return false }
        return bytes.indices.allSatisfy { trimmed[base + $0] || bytes[$0] == model[base + $0] }
    }

    /// The first index where the arrays differ, found with memcmp over 4 KiB blocks.
    static func firstDifference(_ a: [UInt8], _ b: [UInt8]) -> Int? {
        a.withUnsafeBytes { pa in
            b.withUnsafeBytes { pb in
                var block = 0
                while block < pa.count {
                    let n = min(4096, pa.count - block)
                    if memcmp(pa.baseAddress! + block, pb.baseAddress! + block, n) != 0 {
                        return (block..<(block + n)).first { pa[$0] != pb[$0] }
                    }
                    block += n
                }
                return nil
            }
        }
    }

    /// `qemu-img check`: no corruption in either image, and no leaks in swiftnbd's unless
    /// qemu-nbd's leaks too (qemu leaks on purpose in a few cases, such as lazy refcounts).
    func expectCleanImages(swift: String, qemu: String) throws {
        func check(_ path: String) throws -> (corruptions: Int, leaks: Int, errors: Int, text: String) {
            let result = try Tools.run("qemu-img", ["check", "-f", "qcow2", "--output=json", path])
            let json = try #require(try jsonObject(result.stdout) as? [String: Any], "\(result.stdout)\(result.stderr)")
            return (json["corruptions"] as? Int ?? 0, json["leaks"] as? Int ?? 0, json["check-errors"] as? Int ?? 0,
                    result.stdout + result.stderr)
        }
        let ours = try check(swift), theirs = try check(qemu)
        if theirs.corruptions != 0 || theirs.errors != 0 {
            // qemu-nbd corrupting its own image is qemu's bug; swiftnbd's image is still checked.
            withKnownIssue(isIntermittent: true) {
                Issue.record(failure("qemu-img check of qemu-nbd's image\n\(theirs.text)", tag: "QEMU-FAULT"))
            }
        }
        #expect(ours.corruptions == 0 && ours.errors == 0, failure("qemu-img check of swiftnbd's image\n\(ours.text)"))
        #expect(ours.leaks == 0 || theirs.leaks > 0,
                failure("swiftnbd's image leaks \(ours.leaks) clusters, qemu-nbd's none\n\(ours.text)"))
    }
}
