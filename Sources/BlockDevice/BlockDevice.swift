import SystemIO

/// A virtual disk that can be exported: a raw file, a qcow2 image, or a
/// wrapper around another device. Every method may be called from many
/// threads at once; implementations serialise what they must themselves.
public protocol BlockDevice: AnyObject, Sendable {
    /// Virtual size in bytes.
    var size: UInt64 { get }
    var capabilities: DeviceCapabilities { get }

    /// Fills `buffer` with the bytes at `offset`. The range is within `size`.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DeviceError)
    /// Writes `data` at `offset`; with `fua` it is durable before returning.
    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws(DeviceError)
    /// Makes every completed write durable.
    func flush() throws(DeviceError)
    /// Hints that a range is no longer needed; its contents become unspecified.
    func trim(at offset: UInt64, length: UInt64, fua: Bool) throws(DeviceError)
    /// Makes a range read as zeros. `mayDeallocate` allows a hole; `fast`
    /// demands a cheap operation or `DeviceError.notSupported`.
    func writeZeroes(at offset: UInt64, length: UInt64, mayDeallocate: Bool, fast: Bool, fua: Bool) throws(DeviceError)
    /// Hints that a range will be read soon.
    func cache(at offset: UInt64, length: UInt64) throws(DeviceError)
    /// Describes allocation from `offset`: contiguous extents covering at
    /// least one byte and at most `length` bytes, in order.
    func extents(at offset: UInt64, length: UInt64) throws(DeviceError) -> [Extent]
    /// How many layers of a backing chain down each range is allocated
    /// (0: nowhere, 1: this image, 2: its backing file, ...).
    func allocationDepth(at offset: UInt64, length: UInt64) throws(DeviceError) -> [DepthExtent]
    /// Which ranges from `offset` the persistent dirty bitmap `name` marks dirty: contiguous
    /// extents covering at least one byte and at most `length` bytes, in order. Devices
    /// without bitmaps throw `.notSupported`.
    func dirtyBitmapExtents(named name: String, at offset: UInt64, length: UInt64) throws(DeviceError) -> [BitmapExtent]
    /// Flushes and releases resources; called once when the export stops.
    func close()
    /// Where the `length` bytes at `offset` lie unchanged in an open file, so
    /// a reply can send them with sendfile(2) instead of copying them through
    /// a buffer; nil when the device transforms, maps or may zero-fill them.
    func fileRange(at offset: UInt64, length: UInt64) -> FileRange?
    /// Reads like `read` if that needs no wait for storage (the bytes are cached); false, with
    /// `buffer` unspecified, when it would wait or fail. Lets the connection's reader thread
    /// answer cached reads itself instead of handing them to a device thread.
    func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool
}

/// A run of bytes in an open file: `descriptor` stays open until the device is closed.
public struct FileRange: Sendable, Equatable {
    public var descriptor: Int32
    public var offset: UInt64
    public init(descriptor: Int32, offset: UInt64) {
        self.descriptor = descriptor
        self.offset = offset
    }
}

extension BlockDevice {
    public func cache(at offset: UInt64, length: UInt64) throws(DeviceError) {}
    public func fileRange(at offset: UInt64, length: UInt64) -> FileRange? { nil }
    public func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool { false }
    public func allocationDepth(at offset: UInt64, length: UInt64) throws(DeviceError) -> [DepthExtent] {
        let extents = try extents(at: offset, length: length)
        return extents.map { DepthExtent(length: $0.length, depth: $0.flags.contains(.hole) ? 0 : 1) }
    }
    public func dirtyBitmapExtents(named name: String, at offset: UInt64,
                                   length: UInt64) throws(DeviceError) -> [BitmapExtent] {
        throw DeviceError(.notSupported, "this image has no bitmap '\(name)'")
    }
}

/// What a device can do, queried once when an export opens.
public struct DeviceCapabilities: Sendable, Equatable {
    public var canWrite: Bool
    public var canFlush: Bool
    public var canFUA: Bool
    public var canTrim: Bool
    public var canZero: Bool
    public var canFastZero: Bool
    public var canCache: Bool
    /// Whether a flush on one connection covers writes completed on every
    /// other connection (true when all connections share one device object).
    public var canMultiConn: Bool
    public var isRotational: Bool
    /// Preferred I/O granularity, reported as NBD_INFO_BLOCK_SIZE.
    public var preferredBlockSize: UInt32

    public init(canWrite: Bool, canFlush: Bool = true, canFUA: Bool = true, canTrim: Bool = false,
                canZero: Bool = true, canFastZero: Bool = false, canCache: Bool = true,
                canMultiConn: Bool = true, isRotational: Bool = false, preferredBlockSize: UInt32 = 4096) {
        self.canWrite = canWrite
        self.canFlush = canFlush
        self.canFUA = canFUA
        self.canTrim = canTrim
        self.canZero = canZero
        self.canFastZero = canFastZero
        self.canCache = canCache
        self.canMultiConn = canMultiConn
        self.isRotational = isRotational
        self.preferredBlockSize = preferredBlockSize
    }
}

/// One run of bytes with the same allocation state.
public struct Extent: Sendable, Equatable {
    public struct Flags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// Not allocated here (reads come from a backing file, or as zeros).
        public static let hole = Flags(rawValue: 1 << 0)
        /// Reads as zeros.
        public static let zero = Flags(rawValue: 1 << 1)
    }
    public var length: UInt64
    public var flags: Flags
    public init(length: UInt64, flags: Flags) {
        self.length = length
        self.flags = flags
    }
}

/// One run of bytes allocated at the same depth of a backing chain.
public struct DepthExtent: Sendable, Equatable {
    public var length: UInt64
    public var depth: UInt32
    public init(length: UInt64, depth: UInt32) {
        self.length = length
        self.depth = depth
    }
}

/// One run of bytes a dirty bitmap marks the same way.
public struct BitmapExtent: Sendable, Equatable {
    public var length: UInt64
    /// Written since the bitmap was created or last cleared.
    public var dirty: Bool
    public init(length: UInt64, dirty: Bool) {
        self.length = length
        self.dirty = dirty
    }
}

extension Array where Element == Extent {
    /// Appends, merging with the last extent when the flags match.
    public mutating func appendMerging(_ extent: Extent) {
        guard extent.length > 0 else { return }
        if let last = self.last, last.flags == extent.flags {
            self[count - 1].length += extent.length
        } else {
            append(extent)
        }
    }
}
