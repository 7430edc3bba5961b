import Synchronization
import SystemIO

/// Faults shared by every file a device opens through `FaultInjectingFile`.
public final class FileFaults: Sendable {
    /// Writes (and syncs and hole punches) allowed before every later one
    /// fails with `error`, as if the process died or the disk filled up.
    public let writesLeft = Atomic<Int>(.max)
    /// Writes ending past this many bytes fail with ENOSPC, as on a full disk
    /// (overwrites inside it and sparse extensions still succeed).
    public let sizeLimit = Atomic<UInt64>(.max)
    /// ENOSPC by default; EIO for a crash.
    public let errorCode = Atomic<Int32>(Errno.noSpace.code)
    /// Runs before each read of `length` bytes at `offset`.
    public let beforeRead = Locked<(@Sendable (_ offset: UInt64, _ length: Int) -> Void)?>(nil)

    public init() {}

    /// An opener whose files obey these faults.
    public var opener: FileOpener {
        { (path, mode) throws(Errno) in FaultInjectingFile(base: try FileHandle.open(path, mode: mode), faults: self) }
    }

    func permit() throws(Errno) {
        if writesLeft.wrappingSubtract(1, ordering: .relaxed).oldValue <= 0 {
            writesLeft.store(0, ordering: .relaxed)  // no wrap-around after many failures
            throw Errno(errorCode.load(ordering: .relaxed))
        }
    }
}

/// A file whose writes fail on command and whose reads run a hook: crash,
/// disk-full and race tests wrap the device's files with it.
public struct FaultInjectingFile: PositionalFile {
    let base: any PositionalFile
    let faults: FileFaults

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, zeroFillPastEOF: Bool) throws(Errno) {
        if let hook = faults.beforeRead.withLock({ $0 }) { hook(offset, buffer.count) }
        try base.read(into: buffer, at: offset, zeroFillPastEOF: zeroFillPastEOF)
    }
    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws(Errno) {
        try faults.permit()
        if offset + UInt64(data.count) > faults.sizeLimit.load(ordering: .relaxed) { throw Errno.noSpace }
        try base.write(data, at: offset)
    }
    public func sync() throws(Errno) {
        try faults.permit()
        try base.sync()
    }
    public func punchHole(at offset: UInt64, length: UInt64) throws(Errno) {
        try faults.permit()
        try base.punchHole(at: offset, length: length)
    }
    public func zeroRange(at offset: UInt64, length: UInt64) throws(Errno) {
        try faults.permit()
        try base.zeroRange(at: offset, length: length)
    }
    public func size() throws(Errno) -> UInt64 { try base.size() }
    public func truncate(to size: UInt64) throws(Errno) {
        try faults.permit()
        try base.truncate(to: size)
    }
    public func nextData(from offset: UInt64) throws(Errno) -> UInt64? { try base.nextData(from: offset) }
    public func nextHole(from offset: UInt64) throws(Errno) -> UInt64 { try base.nextHole(from: offset) }
    public func prefetch(at offset: UInt64, length: UInt64) { base.prefetch(at: offset, length: length) }
    public func close() { base.close() }
}

/// What reached the files of a device, in order: the power-cut simulator
/// replays a prefix of it, and a random subset of the unsynced tail.
public final class WriteJournal: Sendable {
    public enum Event: Sendable {
        /// `bytes` written at `offset` of file `file` (an index into `paths`).
        case write(file: Int, offset: UInt64, bytes: [UInt8])
        /// A range of a file deallocated (reads as zeros afterwards).
        case punch(file: Int, offset: UInt64, length: UInt64)
        /// The file's size set (ftruncate).
        case truncate(file: Int, size: UInt64)
        /// fdatasync of one file returned: its earlier events are durable.
        case sync(file: Int)
    }

    private let state = Locked<(events: [Event], paths: [String])>(([], []))

    public init() {}

    public var events: [Event] { state.withLock { $0.events } }
    public var count: Int { state.withLock { $0.events.count } }
    public var paths: [String] { state.withLock { $0.paths } }

    /// An opener whose files record into this journal.
    public var opener: FileOpener {
        { (path, mode) throws(Errno) in
            let file = try FileHandle.open(path, mode: mode)
            let index = self.state.withLock { s in
                if let i = s.paths.firstIndex(of: path) { return i }
                s.paths.append(path)
                return s.paths.count - 1
            }
            return JournaledFile(base: file, index: index, journal: self)
        }
    }

    func record(_ event: Event) { state.withLock { $0.events.append(event) } }
}

struct JournaledFile: PositionalFile {
    let base: any PositionalFile
    let index: Int
    let journal: WriteJournal

    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws(Errno) {
        try base.write(data, at: offset)
        journal.record(.write(file: index, offset: offset, bytes: Array(data)))
    }
    func sync() throws(Errno) {
        try base.sync()
        journal.record(.sync(file: index))
    }
    func punchHole(at offset: UInt64, length: UInt64) throws(Errno) {
        try base.punchHole(at: offset, length: length)
        journal.record(.punch(file: index, offset: offset, length: length))
    }
    func zeroRange(at offset: UInt64, length: UInt64) throws(Errno) {
        try base.zeroRange(at: offset, length: length)
        journal.record(.punch(file: index, offset: offset, length: length))
    }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, zeroFillPastEOF: Bool) throws(Errno) {
        try base.read(into: buffer, at: offset, zeroFillPastEOF: zeroFillPastEOF)
    }
    func size() throws(Errno) -> UInt64 { try base.size() }
    func truncate(to size: UInt64) throws(Errno) {
        try base.truncate(to: size)
        journal.record(.truncate(file: index, size: size))
    }
    func nextData(from offset: UInt64) throws(Errno) -> UInt64? { try base.nextData(from: offset) }
    func nextHole(from offset: UInt64) throws(Errno) -> UInt64 { try base.nextHole(from: offset) }
    func prefetch(at offset: UInt64, length: UInt64) { base.prefetch(at: offset, length: length) }
    func close() { base.close() }
}
