import BlockDevice
import Foundation
@testable import QCOW2
import SystemIO
import TestSupport
import Testing

/// The device is stopped dead after its k-th write or sync (every later one
/// fails, through `FaultInjectingFile`), for every k through a
/// workload: the image must pass `qemu-img check` with at worst leaked
/// clusters (exit 0 or 3, never 2: corruption), and every request that
/// completed before the crash must read back.
@Suite struct CrashTests {
    static let kinds: [WriteTests.Kind] = [
        WriteTests.kinds[0],  // v3 64k
        WriteTests.kinds[9],  // 512-byte clusters, 64-bit refcounts: blocks and table growth
        WriteTests.kinds[10],  // backing chain
        WriteTests.kinds[12],  // extended L2 over a backing file
        WriteTests.kinds[13],  // compressed zstd
        WriteTests.Kind(name: "snapshot-shared", make: { dir in
            let path = try WriteTests.plain("compat=1.1,cluster_size=4k")(dir)
            try Q.img(["snapshot", "-c", "s", path])
            return path
        }),
    ]

    @Test(arguments: kinds)
    func crashAtEveryWrite(_ kind: WriteTests.Kind) throws {
        let dir = try TemporaryDirectory("qcow2-crash")
        let (pristineBytes, initial, work, ops) = try Scenario.make(kind, in: dir, seed: 99)

        var crashes = 0
        for budget in stride(from: 0, through: 400, by: kind.name.contains("512") ? 7 : 3) {
            try pristineBytes.write(to: URL(fileURLWithPath: work))
            let faults = FileFaults()
            faults.errorCode.store(EIO, ordering: .relaxed)
            let device = try QCOW2Device(path: work, readOnly: false, options: QCOW2Options(opener: faults.opener))
            faults.writesLeft.store(budget, ordering: .relaxed)
            var model = initial
            var failed: (UInt64, UInt64)?
            for op in ops {
                var attempt = model
                do {
                    try WriteTests.apply([op], to: device, model: &attempt)
                    model = attempt
                } catch {
                    switch op {
                    case .write(let o, let b): failed = (o, UInt64(b.count))
                    case .zero(let o, let l, _), .trim(let o, let l): failed = (o, l)
                    }
                    break
                }
            }
            device.close()
            guard let failed else { break }  // the budget outlasted the workload
            crashes += 1
            let check = try Tools.run("qemu-img", ["check", "-f", "qcow2", work])
            #expect(check.status == 0 || check.status == 3, "crash after \(budget) writes: \(check.stdout)")
            let reopened = try QCOW2Device(path: work, readOnly: true)
            var actual = try Q.readAll(reopened)
            reopened.close()
            // The request that was cut short may be partly applied: ignore its range.
            let range = Int(failed.0)..<Int(failed.0 + failed.1)
            actual.replaceSubrange(range, with: model[range])
            #expect(actual == model, "crash after \(budget) writes: completed requests lost")
        }
        #expect(crashes > 3)
    }
}

/// One write fails (as with ENOSPC or EIO) and the device carries on: the
/// failed request's range is unspecified, everything else stays right, and
/// the image stays consistent for qemu-img check.
@Suite struct TransientFailureTests {
    @Test(arguments: [WriteTests.kinds[0], WriteTests.kinds[9], WriteTests.kinds[10], WriteTests.kinds[12]])
    func failOneWriteThenContinue(_ kind: WriteTests.Kind) throws {
        let dir = try TemporaryDirectory("qcow2-transient")
        let (pristineBytes, initial, work, ops) = try Scenario.make(kind, in: dir, seed: 1234)

        for budget in stride(from: 0, through: 300, by: kind.name.contains("512") ? 13 : 7) {
            try pristineBytes.write(to: URL(fileURLWithPath: work))
            let faults = FileFaults()
            let device = try QCOW2Device(path: work, readOnly: false, options: QCOW2Options(opener: faults.opener))
            faults.writesLeft.store(budget, ordering: .relaxed)
            var model = initial
            var unknown = [Bool](repeating: false, count: initial.count)
            var failedOnce = false, refused = false
            var failedRanges: [Range<Int>] = []
            for op in ops {
                var attempt = model
                do {
                    try WriteTests.apply([op], to: device, model: &attempt)
                    // Bytes this request set are known again.
                    let (o, l) = Self.range(op)
                    for i in Int(o)..<Int(o + l) where Self.covers(op, i) || attempt[i] != model[i] { unknown[i] = false }
                    model = attempt
                } catch {
                    let (o, l) = Self.range(op)
                    if failedOnce {
                        // A failed refcount table move refuses later writes; nothing else may fail.
                        #expect("\(error)".contains("refused"), "budget \(budget): \(error)")
                        refused = true
                    }
                    for i in Int(o)..<Int(o + l) { unknown[i] = true }
                    failedRanges.append(Int(o)..<Int(o + l))
                    failedOnce = true
                    faults.writesLeft.store(.max, ordering: .relaxed)
                }
            }
            var actual = try Q.readAll(device)
            device.close()
            guard failedOnce else { break }
            let check = try Tools.run("qemu-img", ["check", "-f", "qcow2", work])
            #expect(check.status == 0 || check.status == 3, "budget \(budget): \(check.stdout)")
            for range in failedRanges { for i in range where unknown[i] { actual[i] = model[i] } }
            #expect(actual == model, "budget \(budget): data lost after a failed write (refused: \(refused))")
        }
    }

    static func range(_ op: WriteTests.Op) -> (UInt64, UInt64) {
        switch op {
        case .write(let o, let b): (o, UInt64(b.count))
        case .zero(let o, let l, _), .trim(let o, let l): (o, l)
        }
    }

    /// Whether a write or zero request sets byte `i` (trims only clear what they zero).
    static func covers(_ op: WriteTests.Op, _ i: Int) -> Bool {
        switch op {
        case .write(let o, let b): i >= Int(o) && i < Int(o) + b.count
        case .zero(let o, let l, _): i >= Int(o) && i < Int(o + l)
        case .trim: false
        }
    }
}

/// The setup both crash suites share: a pristine image, what qemu reads from it,
/// a path for the working copy, and a random workload for its geometry.
enum Scenario {
    static func make(_ kind: WriteTests.Kind, in dir: TemporaryDirectory, seed: UInt64) throws
        -> (pristine: Data, initial: [UInt8], work: String, ops: [WriteTests.Op]) {
        let pristine = try kind.make(dir)
        let probe = try QCOW2Device(path: pristine, readOnly: true)
        let cluster = probe.geometry.clusterSize, size = probe.size
        probe.close()
        var ops = WriteTests.randomOps(count: 14, size: size, cluster: cluster, seed: seed)
        if kind.name.contains("512") {  // enough allocation to need new refcount blocks
            ops.insert(.write(0, [UInt8](repeating: 0x3C, count: 256 * 1024)), at: 0)
        }
        return (try Data(contentsOf: URL(fileURLWithPath: pristine)), try Q.qemuRaw(pristine, scratch: dir),
                pristine + ".work", ops)
    }
}

/// The disk fills up mid-workload (writes past a size limit fail with
/// ENOSPC, through `FaultInjectingFile`): the failed requests fail, the
/// allocations they made are rolled back, and after close `qemu-img check`
/// finds the image clean, not even a leak; completed writes read back.
@Suite struct DiskFullTests {
    /// 512-byte clusters with 64-bit refcounts: a table cluster covers 2 MiB, so the
    /// refcount table moves while the disk fills up (`RefcountManager.undoMove`).
    @Test(arguments: ["cluster_size=4k", "cluster_size=4k,refcount_bits=2", "compat=0.10,cluster_size=64k",
                      "cluster_size=512,refcount_bits=64", "cluster_size=512"])
    func allocationsRollBack(_ options: String) throws {
        let dir = try TemporaryDirectory("qcow2-enospc")
        let path = dir.file("full.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", options, path, "16M"])
        let faults = FileFaults()
        faults.sizeLimit.store(UInt64(try Q.fileBytes(path).count + 3 << 20), ordering: .relaxed)
        let device = try QCOW2Device(path: path, readOnly: false, options: QCOW2Options(opener: faults.opener))
        var model = [UInt8](repeating: 0, count: 16 << 20)
        var unknown = IndexSet()
        var rng = SplitMix(seed: 11)
        var failures = 0
        for i in 0..<200 {
            let offset = Int.random(in: 0..<(model.count - 70_000), using: &rng)
            let bytes = [UInt8](repeating: UInt8(i % 250 + 1), count: Int.random(in: 1...65536, using: &rng))
            do {
                try bytes.withUnsafeBytes { try device.write($0, at: UInt64(offset), fua: false) }
                model.replaceSubrange(offset..<offset + bytes.count, with: bytes)
                unknown.remove(integersIn: offset..<offset + bytes.count)
            } catch let error as DeviceError {
                #expect(error.kind == .noSpace, "\(error)")
                unknown.insert(integersIn: offset..<offset + bytes.count)
                failures += 1
            }
        }
        #expect(failures > 10)
        device.close()
        let check = try Tools.run("qemu-img", ["check", "-f", "qcow2", path])
        #expect(check.status == 0, "qemu-img check after ENOSPC: \(check.stdout)")
        var actual = try Q.qemuRaw(path, scratch: dir)
        for range in unknown.rangeView { actual.replaceSubrange(range, with: model[range]) }
        #expect(actual == model)
    }
}
