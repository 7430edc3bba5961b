import BlockDevice
import Foundation
@testable import QCOW2
import SystemIO
import TestSupport
import Testing

/// The power-cut simulator. A workload (writes, zeroes, trims, flushes, FUA)
/// runs once with every write, hole punch, truncate and fdatasync of the
/// image and data files recorded. Then, for many cut points k, the files are
/// rebuilt as a disk could hold them after losing power at k: every event
/// of a file before its last sync preceding k, then a random subset of the
/// later events in a random order (a disk cache reorders freely between
/// flushes). `qemu-img check` must find no corruption (leaks are allowed and
/// counted), and every request acknowledged before a completed flush, or
/// completed with FUA, must read back.
@Suite struct PowerCutTests {
    static let kinds: [WriteTests.Kind] = [
        WriteTests.kinds[0],  // v3 64k
        WriteTests.kinds[1],  // v2 64k
        WriteTests.kinds[9],  // 512-byte clusters, 64-bit refcounts: new blocks, table growth
        WriteTests.kinds[11],  // v2 backing chain, 4k
        WriteTests.kinds[12],  // extended L2 over a backing file
        WriteTests.kinds[13],  // compressed zstd
        WriteTests.kinds[15],  // external data file
        WriteTests.Kind(name: "snapshot-shared", make: { dir in
            let path = try WriteTests.plain("compat=1.1,cluster_size=4k")(dir)
            try Q.img(["snapshot", "-c", "s", path])
            return path
        }),
        WriteTests.Kind(name: "lazy refcounts", make: WriteTests.plain("compat=1.1,lazy_refcounts=on,cluster_size=4k")),
    ]

    /// One request of the workload, with where it sat in the journal.
    struct Step {
        var op: WriteTests.Op
        var fua: Bool
        var start: Int
        var end: Int
    }

    @Test(arguments: kinds)
    func powerCutAnywhere(_ kind: WriteTests.Kind) throws {
        let dir = try TemporaryDirectory("qcow2-powercut")
        let path = try kind.make(dir)
        let initial = try Q.qemuRaw(path, scratch: dir)
        let pristine: [String: Data] = try Dictionary(uniqueKeysWithValues: [path, dir.file("image.data")]
            .filter { FileManager.default.fileExists(atPath: $0) }
            .map { ($0, try Data(contentsOf: URL(fileURLWithPath: $0))) })

        // The workload, recorded.
        let journal = WriteJournal()
        let device = try QCOW2Device(path: path, readOnly: false, options: QCOW2Options(opener: journal.opener))
        let cluster = device.geometry.clusterSize
        var rng = SplitMix(seed: 2024)
        var ops = WriteTests.randomOps(count: 24, size: device.size, cluster: cluster, seed: 77)
        if cluster == 512 { ops.insert(.write(0, [UInt8](repeating: 0x3C, count: 256 * 1024)), at: 0) }
        var steps: [Step] = []
        var flushes: [Int] = []  // journal counts at which a flush had returned
        for (i, op) in ops.enumerated() {
            let fua: Bool
            if case .trim = op { fua = false } else { fua = Int.random(in: 0..<4, using: &rng) == 0 }
            let start = journal.count
            try Self.perform(op, on: device, fua: fua)
            steps.append(Step(op: op, fua: fua, start: start, end: journal.count))
            if i % 5 == 4 {
                try device.flush()
                flushes.append(journal.count)
            }
        }
        device.close()
        let events = journal.events, paths = journal.paths
        #expect(events.count > 20)

        // The cut points: random ones, and just after each sync, where the most is durable.
        // Each cut point gets its own random subset of the unsynced tail, so points may repeat.
        var cuts = (0..<100).map { _ in Int.random(in: 0...events.count, using: &rng) }
        for (i, event) in events.enumerated() { if case .sync = event { cuts.append(i + 1) } }
        var leaks = 0, checked = 0
        for (n, cut) in cuts.enumerated() {
            try Self.rebuild(events: events, paths: paths, cut: cut, pristine: pristine, rng: &rng)
            if kind.name.contains("lazy") {
                // A dirty image's refcounts are repaired at a read-write open, as qemu does.
                try QCOW2Device(path: path, readOnly: false).close()
            }
            let check = try Tools.run("qemu-img", ["check", "-f", "qcow2", path])
            #expect(check.status == 0 || check.status == 3, "cut at \(cut)/\(events.count): \(check.stdout)")
            if let line = check.stdout.split(separator: "\n").first(where: { $0.contains("leaked clusters were found") }),
               let count = Int(line.split(separator: " ").first ?? "") {
                leaks += count
            }
            checked += 1
            // What must read back, checked at every fourth cut (qemu-img check runs at every one):
            // the model after every request begun before the cut, where requests neither flushed
            // nor FUA-completed before the cut are unknown.
            guard n % 4 == 0 else { continue }
            var model = initial
            var unknown = IndexSet()
            var lastTouch: [(Range<Int>, Int)] = []
            let flushed = flushes.last { $0 <= cut } ?? -1
            for (i, step) in steps.enumerated() where step.start < cut {
                let defined = Self.apply(step.op, to: &model, device: (cluster, path, kind))
                let durable = step.end <= flushed || (step.fua && step.end <= cut)
                if durable {
                    unknown.remove(integersIn: defined)
                } else {
                    unknown.insert(integersIn: Self.range(step.op))
                }
                lastTouch.append((Self.range(step.op), i))
            }
            // Every sixteenth cut is read by qemu-img, the rest by this engine.
            var actual: [UInt8]
            if n % 16 == 0 {
                actual = try Q.qemuRaw(path, scratch: dir)
            } else {
                let reopened = try QCOW2Device(path: path, readOnly: true)
                actual = try Q.readAll(reopened)
                reopened.close()
            }
            for range in unknown.rangeView { actual.replaceSubrange(range, with: model[range]) }
            let same = actual.withUnsafeBytes { a in model.withUnsafeBytes { b in memcmp(a.baseAddress!, b.baseAddress!, a.count) == 0 } }
            if !same {
                let lost = zip(actual, model).enumerated().first { $0.element.0 != $0.element.1 }!.offset
                let step = lastTouch.last { $0.0.contains(lost) }
                Issue.record("""
                    cut at \(cut)/\(events.count): durable data lost at byte \(lost) (last request there: \
                    \(step.map { "#\($0.1) \(Self.describe(steps[$0.1].op)) fua \(steps[$0.1].fua) start \(steps[$0.1].start) end \(steps[$0.1].end)" } ?? "none"), \
                    flushed at \(flushed))
                    """)
            }
        }
        #expect(checked >= 100)
        print("power cut \(kind.name): \(checked) cut points over \(events.count) events, \(leaks) leaked clusters in all")
    }

    static func perform(_ op: WriteTests.Op, on device: QCOW2Device, fua: Bool) throws {
        switch op {
        case .write(let offset, let bytes):
            try bytes.withUnsafeBytes { try device.write($0, at: offset, fua: fua) }
        case .zero(let offset, let length, let mayDeallocate):
            // Fast first, as NBD clients do, then the slow way when refused.
            let fast = Result { try device.writeZeroes(at: offset, length: length, mayDeallocate: mayDeallocate,
                                                       fast: true, fua: fua) }
            if case .failure(let error) = fast {
                guard (error as? DeviceError)?.kind == .notSupported else { throw error }
                try device.writeZeroes(at: offset, length: length, mayDeallocate: mayDeallocate, fast: false, fua: fua)
            }
        case .trim(let offset, let length):
            try device.trim(at: offset, length: length, fua: fua)
        }
    }

    static func describe(_ op: WriteTests.Op) -> String {
        switch op {
        case .write(let o, let b): "write \(o)+\(b.count)"
        case .zero(let o, let l, let d): "zero \(o)+\(l) mayDeallocate \(d)"
        case .trim(let o, let l): "trim \(o)+\(l)"
        }
    }

    /// The request's whole byte range.
    static func range(_ op: WriteTests.Op) -> Range<Int> {
        switch op {
        case .write(let o, let b): Int(o)..<Int(o) + b.count
        case .zero(let o, let l, _), .trim(let o, let l): Int(o)..<Int(o + l)
        }
    }

    /// Applies a request to the model as WriteTests.apply does; returns the bytes it defines.
    static func apply(_ op: WriteTests.Op, to model: inout [UInt8],
                      device: (cluster: UInt64, path: String, kind: WriteTests.Kind)) -> Range<Int> {
        switch op {
        case .write(let offset, let bytes):
            model.replaceSubrange(Int(offset)..<Int(offset) + bytes.count, with: bytes)
            return Int(offset)..<Int(offset) + bytes.count
        case .zero(let offset, let length, _):
            model.replaceSubrange(Int(offset)..<Int(offset + length), with: repeatElement(0, count: Int(length)))
            return Int(offset)..<Int(offset + length)
        case .trim(let offset, let length):
            // Only the v2 backing chain keeps trimmed data; the rest zero whole clusters.
            guard !device.kind.name.contains("v2 4k") else { return 0..<0 }
            let c = device.cluster, size = UInt64(model.count)
            let start = (offset + c - 1) & ~(c - 1)
            let end = offset + length == size ? size : (offset + length) & ~(c - 1)
            guard start < end else { return 0..<0 }
            model.replaceSubrange(Int(start)..<Int(end), with: repeatElement(0, count: Int(end - start)))
            return Int(start)..<Int(end)
        }
    }

    /// Writes the files as they would be after a power cut at event `cut`.
    static func rebuild(events: [WriteJournal.Event], paths: [String], cut: Int, pristine: [String: Data],
                        rng: inout SplitMix) throws {
        var files = paths.map { pristine[$0].map { [UInt8]($0) } }
        var lastSync = [Int](repeating: -1, count: paths.count)
        for (i, event) in events[..<cut].enumerated() { if case .sync(let f) = event { lastSync[f] = i } }
        var tail: [WriteJournal.Event] = []
        for (i, event) in events[..<cut].enumerated() {
            let file: Int
            switch event {
            case .write(let f, _, _), .punch(let f, _, _), .truncate(let f, _): file = f
            case .sync: continue
            }
            if i < lastSync[file] {
                apply(event, to: &files)
            } else if Bool.random(using: &rng) {
                tail.append(event)
            }
        }
        for event in tail.shuffled(using: &rng) { apply(event, to: &files) }
        for (i, bytes) in files.enumerated() where pristine[paths[i]] != nil {
            try Data(bytes!).write(to: URL(fileURLWithPath: paths[i]))
        }
    }

    static func apply(_ event: WriteJournal.Event, to files: inout [[UInt8]?]) {
        switch event {
        case .write(let f, let offset, let bytes):
            let end = Int(offset) + bytes.count
            if files[f]!.count < end { files[f]!.append(contentsOf: repeatElement(0, count: end - files[f]!.count)) }
            files[f]!.replaceSubrange(Int(offset)..<end, with: bytes)
        case .punch(let f, let offset, let length):
            let end = min(files[f]!.count, Int(offset + length))
            if Int(offset) < end { files[f]!.replaceSubrange(Int(offset)..<end, with: repeatElement(0, count: end - Int(offset))) }
        case .truncate(let f, let size):
            if files[f]!.count < Int(size) {
                files[f]!.append(contentsOf: repeatElement(0, count: Int(size) - files[f]!.count))
            } else {
                files[f]!.removeLast(files[f]!.count - Int(size))
            }
        case .sync:
            break
        }
    }
}
