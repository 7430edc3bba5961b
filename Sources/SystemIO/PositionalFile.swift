/// Positional I/O on an open file: what the raw and qcow2 devices need from
/// the file under them. `FileHandle` is the real one; tests wrap it to record
/// writes and flushes (power-cut simulation), inject failures (crashes,
/// ENOSPC) or run hooks before reads, without any test code in the devices.
///
/// Every call is positional, so one file may be shared between threads.
public protocol PositionalFile: Sendable {
    /// Reads exactly `buffer.count` bytes at `offset`; past the end of the
    /// file, zeros when `zeroFillPastEOF`, else EIO.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, zeroFillPastEOF: Bool) throws(Errno)
    /// Writes all of `data` at `offset`.
    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws(Errno)
    func size() throws(Errno) -> UInt64
    func truncate(to size: UInt64) throws(Errno)
    /// Makes every completed write durable (fdatasync).
    func sync() throws(Errno)
    /// The next data region at or after `offset`, nil if only a hole remains.
    func nextData(from offset: UInt64) throws(Errno) -> UInt64?
    /// The next hole at or after `offset` (the end of the file counts).
    func nextHole(from offset: UInt64) throws(Errno) -> UInt64
    /// Deallocates a range, which then reads as zeros.
    func punchHole(at offset: UInt64, length: UInt64) throws(Errno)
    /// Makes a range read as zeros, keeping it allocated.
    func zeroRange(at offset: UInt64, length: UInt64) throws(Errno)
    /// Hints that a range will be read soon.
    func prefetch(at offset: UInt64, length: UInt64)
    /// Fills `buffer` only if every byte is in memory already, so the caller
    /// never waits for storage; false when it would have to.
    func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool
    func close()
}

extension PositionalFile {
    /// Wrapped files (the tests' fault injection) have no descriptor to read without waiting.
    public func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool { false }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(Errno) {
        try read(into: buffer, at: offset, zeroFillPastEOF: false)
    }
}

/// Opens a file as a `PositionalFile`; the devices take one so tests can
/// hand out wrapped files. `FileHandle.opener` is the real one.
public typealias FileOpener = @Sendable (_ path: String, _ mode: FileHandle.Mode) throws(Errno) -> any PositionalFile

extension FileHandle: PositionalFile {
    /// Opens files as plain `FileHandle`s.
    public static let opener: FileOpener = { (path, mode) throws(Errno) in try FileHandle.open(path, mode: mode) }
}
