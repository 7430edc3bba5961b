import Synchronization
import SystemIO

/// A `PositionalFile` held in memory, so the qcow2 engine can open fuzzed
/// bytes without touching the disk. It never grows past `limit` (writes
/// and truncations beyond it fail with ENOSPC, as on a full disk), which
/// bounds what a mutated image can make the engine allocate.
public final class MemoryFile: PositionalFile {
    private let bytes: Mutex<[UInt8]>
    public let limit: Int

    public init(_ bytes: [UInt8], limit: Int = 64 << 20) {
        self.bytes = Mutex(bytes)
        self.limit = limit
    }

    public var contents: [UInt8] { bytes.withLock { $0 } }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64,
                     zeroFillPastEOF: Bool) throws(Errno) {
        try bytes.withLock { (b) throws(Errno) in
            let start = Int(min(offset, UInt64(b.count)))
            let n = min(buffer.count, b.count - start)
            guard n == buffer.count || zeroFillPastEOF else { throw Errno.io }
            if n > 0 { b.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[start..<start + n])) } }
            if n < buffer.count {
                UnsafeMutableRawBufferPointer(rebasing: buffer[n...]).initializeMemory(as: UInt8.self, repeating: 0)
            }
        }
    }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws(Errno) {
        try bytes.withLock { (b) throws(Errno) in
            let end = try Self.end(offset, UInt64(data.count), limit: limit)
            if end > b.count { b += [UInt8](repeating: 0, count: end - b.count) }
            b.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[Int(offset)..<end]).copyMemory(from: data) }
        }
    }

    public func size() throws(Errno) -> UInt64 { UInt64(bytes.withLock { $0.count }) }

    public func truncate(to size: UInt64) throws(Errno) {
        guard size <= UInt64(limit) else { throw Errno.noSpace }
        bytes.withLock { b in
            if Int(size) < b.count { b.removeLast(b.count - Int(size)) } else {
                b += [UInt8](repeating: 0, count: Int(size) - b.count)
            }
        }
    }

    public func sync() throws(Errno) {}

    /// All data: the file has no holes.
    public func nextData(from offset: UInt64) throws(Errno) -> UInt64? { offset < (try size()) ? offset : nil }
    public func nextHole(from offset: UInt64) throws(Errno) -> UInt64 { max(offset, try size()) }

    /// Zeros within the file; never extends it (FALLOC_FL_KEEP_SIZE, as SystemIO calls fallocate).
    public func punchHole(at offset: UInt64, length: UInt64) throws(Errno) {
        bytes.withLock { b in
            let start = Int(min(offset, UInt64(b.count)))
            let (sum, overflow) = offset.addingReportingOverflow(length)
            let end = Int(min(overflow ? UInt64.max : sum, UInt64(b.count)))
            if start < end { b.replaceSubrange(start..<end, with: repeatElement(0, count: end - start)) }
        }
    }

    public func zeroRange(at offset: UInt64, length: UInt64) throws(Errno) { try punchHole(at: offset, length: length) }

    public func prefetch(at offset: UInt64, length: UInt64) {}
    public func close() {}

    private static func end(_ offset: UInt64, _ length: UInt64, limit: Int) throws(Errno) -> Int {
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow, end <= UInt64(limit) else { throw Errno.noSpace }
        return Int(end)
    }
}
