/// What to do with discards, as qemu-nbd's `--discard`.
public enum DiscardPolicy: String, Sendable, CaseIterable {
    /// Discards succeed without freeing anything, and zeroing never deallocates (qemu-nbd's default).
    case ignore
    /// Discards free space, and zeroing may deallocate.
    case unmap
}

/// Whether all-zero writes become zeroing, as qemu-nbd's `--detect-zeroes`.
public enum ZeroDetection: String, Sendable, CaseIterable {
    case off, on
    /// Like `on`, and the zeroing may deallocate when discards are `unmap`.
    case unmap
}

/// Applies `--discard` and `--detect-zeroes` in front of another device, as
/// a filter: the wrapped device never sees the policies.
public final class WritePolicyDevice: BlockDevice {
    public let base: any BlockDevice
    public let discard: DiscardPolicy
    public let detectZeroes: ZeroDetection

    public init(_ base: any BlockDevice, discard: DiscardPolicy, detectZeroes: ZeroDetection) {
        self.base = base
        self.discard = discard
        self.detectZeroes = detectZeroes
    }

    public var size: UInt64 { base.size }

    public var capabilities: DeviceCapabilities {
        var c = base.capabilities
        // A fast zero that may not deallocate is only fast where the device can zero without writing.
        if discard == .ignore { c.canFastZero = c.canFastZero && c.canZero }
        return c
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DeviceError) {
        try base.read(into: buffer, at: offset)
    }

    public func fileRange(at offset: UInt64, length: UInt64) -> FileRange? {
        base.fileRange(at: offset, length: length)
    }

    public func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
        base.readIfCached(into: buffer, at: offset)
    }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws(DeviceError) {
        if detectZeroes != .off, base.capabilities.canZero, isAllZero(data) {
            try base.writeZeroes(at: offset, length: UInt64(data.count),
                                 mayDeallocate: detectZeroes == .unmap && discard == .unmap, fast: false, fua: fua)
            return
        }
        try base.write(data, at: offset, fua: fua)
    }

    public func flush() throws(DeviceError) { try base.flush() }

    public func trim(at offset: UInt64, length: UInt64, fua: Bool) throws(DeviceError) {
        guard discard == .unmap else {
            if fua { try base.flush() }
            return
        }
        try base.trim(at: offset, length: length, fua: fua)
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayDeallocate: Bool, fast: Bool,
                            fua: Bool) throws(DeviceError) {
        try base.writeZeroes(at: offset, length: length, mayDeallocate: mayDeallocate && discard == .unmap,
                             fast: fast, fua: fua)
    }

    public func cache(at offset: UInt64, length: UInt64) throws(DeviceError) {
        try base.cache(at: offset, length: length)
    }

    public func extents(at offset: UInt64, length: UInt64) throws(DeviceError) -> [Extent] {
        try base.extents(at: offset, length: length)
    }

    public func allocationDepth(at offset: UInt64, length: UInt64) throws(DeviceError) -> [DepthExtent] {
        try base.allocationDepth(at: offset, length: length)
    }

    public func dirtyBitmapExtents(named name: String, at offset: UInt64,
                                   length: UInt64) throws(DeviceError) -> [BitmapExtent] {
        try base.dirtyBitmapExtents(named: name, at: offset, length: length)
    }

    public func close() { base.close() }
}

/// True when every byte is zero. Checks 8 bytes at a time.
public func isAllZero(_ data: UnsafeRawBufferPointer) -> Bool {
    let words = data.count / 8
    var i = 0
    while i < words {
        if data.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self) != 0 { return false }
        i += 1
    }
    for j in (words * 8)..<data.count where data[j] != 0 { return false }
    return true
}
