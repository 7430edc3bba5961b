#if canImport(Glibc)
import Glibc
#endif
import SystemIO

/// `-s/--snapshot`: the image is only read; writes land in a temporary,
/// already-unlinked sparse file, block by block, and vanish when the
/// server stops, as with qemu-nbd's temporary overlay.
public final class SnapshotOverlayDevice: BlockDevice, @unchecked Sendable {
    public let base: any BlockDevice
    public let size: UInt64
    private let overlay: FileHandle
    private let blockSize: UInt64 = 64 * 1024

    /// Which blocks live in the overlay. Guarded by `mapLock`.
    private var copied: [UInt64]
    private let mapLock = Lock()
    /// Serialise copy-up of a block against other writes to it.
    private let stripes = (0..<64).map { _ in Lock() }

    /// - Parameter directory: where the temporary file goes (`$TMPDIR`, else /var/tmp as qemu does).
    public init(base: any BlockDevice, directory: String? = nil) throws(DeviceError) {
        self.base = base
        size = base.size
        let dir = directory ?? getenv("TMPDIR").map { String(cString: $0) } ?? "/var/tmp"
        var template = Array("\(dir)/swiftnbd-snapshot.XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw DeviceError(errno: .current, "cannot create a temporary overlay in \(dir)") }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        unlink(String(cString: template))
        overlay = FileHandle(rawValue: fd)
        let blocks = (size + blockSize - 1) / blockSize
        copied = [UInt64](repeating: 0, count: Int((blocks + 63) / 64))
    }

    public var capabilities: DeviceCapabilities {
        DeviceCapabilities(canWrite: true, canTrim: true, canZero: true, canFastZero: false,
                           preferredBlockSize: base.capabilities.preferredBlockSize)
    }

    private func isCopied(_ block: UInt64) -> Bool {
        mapLock.withLock { copied[Int(block / 64)] & (1 << (block % 64)) != 0 }
    }

    private func markCopied(_ block: UInt64) {
        mapLock.withLock { copied[Int(block / 64)] |= 1 << (block % 64) }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DeviceError) {
        _ = try forEachRun(of: buffer, at: offset) { (inOverlay, part, position) throws(DeviceError) in
            if inOverlay {
                do throws(Errno) { try overlay.read(into: part, at: position, zeroFillPastEOF: true) } catch {
                    throw DeviceError(errno: error, "reading the snapshot overlay")
                }
            } else {
                try base.read(into: part, at: position)
            }
            return true
        }
    }

    /// As `read`, from the overlay's cached pages or the base's `readIfCached`.
    public func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
        guard offset <= size, UInt64(buffer.count) <= size - offset else { return false }
        return forEachRun(of: buffer, at: offset) { inOverlay, part, position in
            inOverlay ? overlay.readIfCached(into: part, at: position) : base.readIfCached(into: part, at: position)
        }
    }

    /// Calls `body` once per run of blocks that are all in the overlay or all not, so
    /// each run is one read; stops, returning false, when `body` does.
    private func forEachRun<E: Error>(
        of buffer: UnsafeMutableRawBufferPointer, at offset: UInt64,
        _ body: (_ inOverlay: Bool, _ part: UnsafeMutableRawBufferPointer, _ position: UInt64) throws(E) -> Bool
    ) throws(E) -> Bool {
        var done: UInt64 = 0
        let total = UInt64(buffer.count)
        while done < total {
            let position = offset + done
            let inOverlay = isCopied(position / blockSize)
            var end = min((position / blockSize + 1) * blockSize, offset + total)
            while end < offset + total && isCopied(end / blockSize) == inOverlay {
                end = min(end + blockSize, offset + total)
            }
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(done)..<Int(end - offset)])
            guard try body(inOverlay, part, position) else { return false }
            done = end - offset
        }
        return true
    }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws(DeviceError) {
        try eachBlock(offset: offset, length: UInt64(data.count)) { (position, range) throws(DeviceError) in
            try overlayWrite(UnsafeRawBufferPointer(rebasing: data[Int(position - offset)..<Int(position - offset) + range]),
                             at: position)
        }
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayDeallocate: Bool, fast: Bool,
                            fua: Bool) throws(DeviceError) {
        guard !fast else { throw DeviceError(.notSupported, "zeroing the snapshot overlay is not fast") }
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(blockSize), alignment: 4096)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        try eachBlock(offset: offset, length: length) { (position, range) throws(DeviceError) in
            try overlayWrite(UnsafeRawBufferPointer(rebasing: zeros[..<range]), at: position)
        }
    }

    /// Calls `body` for each piece of [offset, offset+length) that lies within one block.
    private func eachBlock(offset: UInt64, length: UInt64,
                           _ body: (UInt64, Int) throws(DeviceError) -> Void) throws(DeviceError) {
        var position = offset
        while position < offset + length {
            let end = min((position / blockSize + 1) * blockSize, offset + length)
            try body(position, Int(end - position))
            position = end
        }
    }

    /// Writes within one block, copying the block up from the base first if needed.
    private func overlayWrite(_ data: UnsafeRawBufferPointer, at position: UInt64) throws(DeviceError) {
        let block = position / blockSize
        let stripe = stripes[Int(block % UInt64(stripes.count))]
        try stripe.withLock { () throws(DeviceError) in
            if !isCopied(block) && UInt64(data.count) < blockSize {
                let start = block * blockSize
                let length = Int(min(blockSize, size - start))
                let whole = UnsafeMutableRawBufferPointer.allocate(byteCount: length, alignment: 4096)
                defer { whole.deallocate() }
                try base.read(into: whole, at: start)
                UnsafeMutableRawBufferPointer(rebasing: whole[Int(position - start)...]).copyMemory(from: data)
                try overlayWriteRaw(UnsafeRawBufferPointer(whole), at: start)
            } else {
                try overlayWriteRaw(data, at: position)
            }
            markCopied(block)
        }
    }

    private func overlayWriteRaw(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws(DeviceError) {
        do { try overlay.write(data, at: offset) } catch {
            throw DeviceError(errno: error, "writing the snapshot overlay")
        }
    }

    /// The overlay is thrown away at exit, so nothing in it needs to be durable.
    public func flush() throws(DeviceError) {}

    /// Trimmed contents are unspecified; keeping them is simplest.
    public func trim(at offset: UInt64, length: UInt64, fua: Bool) throws(DeviceError) {}

    public func extents(at offset: UInt64, length: UInt64) throws(DeviceError) -> [Extent] {
        let end = min(offset + length, size)
        var result: [Extent] = []
        var position = offset
        while position < end {
            let inOverlay = isCopied(position / blockSize)
            var runEnd = min((position / blockSize + 1) * blockSize, end)
            while runEnd < end && isCopied(runEnd / blockSize) == inOverlay { runEnd = min(runEnd + blockSize, end) }
            if inOverlay {
                result.appendMerging(Extent(length: runEnd - position, flags: []))
            } else {
                var covered = position
                while covered < runEnd {
                    let extents = try base.extents(at: covered, length: runEnd - covered)
                    guard !extents.isEmpty else { throw DeviceError(.io, "base device reported no extents") }
                    for e in extents where covered < runEnd {
                        let n = min(e.length, runEnd - covered)
                        result.appendMerging(Extent(length: n, flags: e.flags))
                        covered += n
                    }
                }
            }
            position = runEnd
        }
        return result
    }

    /// The image's bitmap, which the overlay's writes never reach (qemu-nbd -s -B reports the same).
    public func dirtyBitmapExtents(named name: String, at offset: UInt64,
                                   length: UInt64) throws(DeviceError) -> [BitmapExtent] {
        try base.dirtyBitmapExtents(named: name, at: offset, length: length)
    }

    public func close() {
        overlay.close()
        base.close()
    }
}
