import SystemIO

/// A raw image: the file's bytes are the disk's bytes.
public final class RawFileDevice: BlockDevice {
    public let file: any PositionalFile
    public let size: UInt64
    public let capabilities: DeviceCapabilities
    private let readOnly: Bool
    /// The file's descriptor when it is a real file (tests may wrap it in something else).
    private let descriptor: Int32?

    /// Opens `path` with `opener` (tests pass one that wraps the file);
    /// throws with the reason on failure.
    public init(path: String, readOnly: Bool, opener: FileOpener = FileHandle.opener) throws(DeviceError) {
        do {
            file = try opener(path, readOnly ? .readOnly : .readWrite)
        } catch {
            throw DeviceError(errno: error, "cannot open '\(path)'")
        }
        do {
            size = try file.size()
        } catch {
            file.close()
            throw DeviceError(errno: error, "cannot stat '\(path)'")
        }
        self.readOnly = readOnly
        descriptor = (file as? FileHandle)?.rawValue
        capabilities = DeviceCapabilities(canWrite: !readOnly, canTrim: !readOnly, canZero: !readOnly,
                                          canFastZero: !readOnly)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DeviceError) {
        do {
            // A file that shrank under us reads as zeros rather than failing the client.
            try file.read(into: buffer, at: offset, zeroFillPastEOF: true)
        } catch {
            throw DeviceError(errno: error, "pread at \(offset)")
        }
    }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws(DeviceError) {
        guard !readOnly else { throw DeviceError(.readOnly, "read-only export") }
        do {
            try file.write(data, at: offset)
            if fua { try file.sync() }
        } catch {
            throw DeviceError(errno: error, "pwrite at \(offset)")
        }
    }

    public func flush() throws(DeviceError) {
        guard !readOnly else { return }
        do { try file.sync() } catch { throw DeviceError(errno: error, "fdatasync") }
    }

    public func trim(at offset: UInt64, length: UInt64, fua: Bool) throws(DeviceError) {
        guard !readOnly else { throw DeviceError(.readOnly, "read-only export") }
        // Trim is advisory: a file system that can't punch holes just keeps the data.
        try? file.punchHole(at: offset, length: length)
        if fua { try flush() }
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayDeallocate: Bool, fast: Bool,
                            fua: Bool) throws(DeviceError) {
        guard !readOnly else { throw DeviceError(.readOnly, "read-only export") }
        defer { if fua { try? file.sync() } }
        if mayDeallocate, (try? file.punchHole(at: offset, length: length)) != nil { return }
        if (try? file.zeroRange(at: offset, length: length)) != nil { return }
        if fast { throw DeviceError(.notSupported, "no fast zeroing on this file system") }
        try writeZeroBytes(at: offset, length: length)
    }

    private func writeZeroBytes(at offset: UInt64, length: UInt64) throws(DeviceError) {
        let chunk = Int(min(length, 1 << 20))
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(chunk), length - done))
            try write(UnsafeRawBufferPointer(rebasing: zeros[..<n]), at: offset + done, fua: false)
            done += UInt64(n)
        }
    }

    public func cache(at offset: UInt64, length: UInt64) throws(DeviceError) {
        file.prefetch(at: offset, length: length)
    }

    public func extents(at offset: UInt64, length: UInt64) throws(DeviceError) -> [Extent] {
        let end = min(offset + length, size)
        guard offset < end else { return [] }
        var result: [Extent] = []
        var position = offset
        do {
            while position < end {
                guard let data = try file.nextData(from: position) else {
                    result.appendMerging(Extent(length: end - position, flags: [.hole, .zero]))
                    break
                }
                if data > position {
                    result.appendMerging(Extent(length: min(data, end) - position, flags: [.hole, .zero]))
                    position = min(data, end)
                    continue
                }
                let hole = min(try file.nextHole(from: position), end)
                result.appendMerging(Extent(length: hole - position, flags: []))
                position = hole
            }
        } catch let error where error == .notSupported {
            return [Extent(length: end - offset, flags: [])]
        } catch {
            throw DeviceError(errno: error, "lseek at \(position)")
        }
        return result
    }

    public func fileRange(at offset: UInt64, length: UInt64) -> FileRange? {
        descriptor.map { FileRange(descriptor: $0, offset: offset) }
    }

    public func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
        guard let descriptor else { return false }
        return FileHandle(rawValue: descriptor).readIfCached(into: buffer, at: offset)
    }

    public func close() {
        try? flush()
        file.close()
    }
}
