import BlockDevice
import Foundation
@testable import QCOW2
import TestSupport
import Testing

/// Shared steps for the qcow2 tests: building images with qemu tools and
/// comparing what QCOW2Device returns with what qemu sees.
enum Q {
    static func img(_ args: [String]) throws { try Tools.check("qemu-img", args) }

    static func io(_ path: String, _ commands: [String], format: String = "qcow2") throws {
        guard !commands.isEmpty else { return }
        try ImageFactory.io(path, format: format, commands)
    }

    /// Reads the whole device in `chunk`-sized requests.
    static func readAll(_ device: any BlockDevice, chunk: Int = 192 * 1024 + 512) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0xEE, count: Int(device.size))
        var offset = 0
        while offset < bytes.count {
            let n = min(chunk, bytes.count - offset)
            try bytes.withUnsafeMutableBytes { raw in
                try device.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[offset..<offset + n]),
                                at: UInt64(offset))
            }
            offset += n
        }
        return bytes
    }

    /// qemu-img's view of the image as raw bytes (optionally of a snapshot).
    static func qemuRaw(_ path: String, snapshot: String? = nil, scratch: TemporaryDirectory) throws -> [UInt8] {
        let out = scratch.file("expected-\(UUID().uuidString).raw")
        var args = ["convert", "-f", "qcow2"]
        if let snapshot { args += ["-l", "snapshot.name=\(snapshot)"] }
        try img(args + ["-O", "raw", path, out])
        defer { try? FileManager.default.removeItem(atPath: out) }
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: out)))
    }

    /// Compares the device's contents with qemu-img's, naming the first difference.
    static func expectSameContents(_ device: any BlockDevice, _ expected: [UInt8],
                                   sourceLocation: SourceLocation = #_sourceLocation) throws {
        #expect(device.size == UInt64(expected.count), sourceLocation: sourceLocation)
        let actual = try readAll(device)
        if actual != expected {
            let first = zip(actual, expected).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? -1
            Issue.record("contents differ from qemu-img convert, first at byte \(first)", sourceLocation: sourceLocation)
        }
    }

    struct MapEntry { var start: UInt64; var length: UInt64; var data: Bool; var zero: Bool }

    static func qemuMap(_ path: String) throws -> [MapEntry] {
        let json = try Tools.check("qemu-img", ["map", "-f", "qcow2", "--output=json", path])
        let array = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [[String: Any]]
        return array.map {
            MapEntry(start: ($0["start"] as! NSNumber).uint64Value, length: ($0["length"] as! NSNumber).uint64Value,
                     data: $0["data"] as! Bool, zero: $0["zero"] as! Bool)
        }
    }

    /// Checks the device's extents against `qemu-img map`: data where qemu
    /// says data, holes elsewhere, and holes that qemu calls zero are zero.
    static func expectSameMap(_ device: QCOW2Device, path: String,
                              sourceLocation: SourceLocation = #_sourceLocation) throws {
        var ours: [(start: UInt64, end: UInt64, flags: Extent.Flags)] = []
        var position: UInt64 = 0
        while position < device.size {
            let extents = try device.extents(at: position, length: device.size - position)
            #expect(!extents.isEmpty, sourceLocation: sourceLocation)
            if extents.isEmpty { return }
            for e in extents {
                ours.append((position, position + e.length, e.flags))
                position += e.length
            }
        }
        #expect(position == device.size, sourceLocation: sourceLocation)
        for entry in try qemuMap(path) {
            for e in ours where e.start < entry.start + entry.length && e.end > entry.start {
                let hole = e.flags.contains(.hole)
                if hole == entry.data {
                    Issue.record("extent at \(max(e.start, entry.start)): ours \(e.flags.rawValue), qemu data=\(entry.data)",
                                 sourceLocation: sourceLocation)
                    return
                }
                if !entry.data && e.flags.contains(.zero) != entry.zero {
                    Issue.record("zero flag at \(max(e.start, entry.start)) differs from qemu-img map",
                                 sourceLocation: sourceLocation)
                    return
                }
            }
        }
    }

    /// Writes that exercise aligned, unaligned, zeroed and discarded ranges in
    /// a 3 MiB + 64 KiB disk.
    static let contentScript = [
        "write -P 0x11 0 64k",
        "write -P 0x22 100k 7k",
        "write -P 0x33 1000k 300k",
        "write -z 2M 64k",
        "write -P 0x44 3M 64k",
        "write -P 0x55 1536k 4k",
        "discard 1088k 64k",
    ]
    static let diskSize = "3200k"

    /// Overwrites `bytes` at `offset` of a file.
    static func patch(_ path: String, at offset: UInt64, _ bytes: [UInt8]) throws {
        let handle = try Foundation.FileHandle(forWritingTo: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        try handle.seek(toOffset: offset)
        handle.write(Data(bytes))
    }

    static func bigEndian<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        withUnsafeBytes(of: value.bigEndian) { Array($0) }
    }

    static func fileBytes(_ path: String) throws -> [UInt8] {
        [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
    }
}
