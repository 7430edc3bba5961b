/// A cursor over received bytes. Reads return nil when too few bytes
/// remain, so decoders never index past the end.
public struct WireReader {
    public let bytes: UnsafeRawBufferPointer
    public private(set) var position = 0

    public init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    public var readableBytes: Int { bytes.count - position }

    public mutating func readInteger<T: FixedWidthInteger>(as: T.Type = T.self) -> T? {
        let size = MemoryLayout<T>.size
        guard readableBytes >= size else { return nil }
        let value = bytes.loadUnaligned(fromByteOffset: position, as: T.self)
        position += size
        return T(bigEndian: value)
    }

    public mutating func readBytes(_ count: Int) -> UnsafeRawBufferPointer? {
        guard count >= 0, readableBytes >= count else { return nil }
        defer { position += count }
        return UnsafeRawBufferPointer(rebasing: bytes[position..<position + count])
    }

    /// Reads a UTF-8 string of `count` bytes; nil if short or not UTF-8.
    public mutating func readString(_ count: Int) -> String? {
        guard let raw = readBytes(count) else { return nil }
        return String(validating: raw, as: UTF8.self)
    }
}

/// Big-endian encoding into a growing byte array (for negotiation, where
/// messages are small and rare) or a caller's fixed buffer (for reply
/// headers on the hot path).
public struct WireWriter {
    public private(set) var bytes: [UInt8]

    public init(capacity: Int = 64) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    public mutating func write<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.bigEndian) { bytes.append(contentsOf: $0) }
    }

    public mutating func write(_ raw: some Sequence<UInt8>) {
        bytes.append(contentsOf: raw)
    }

    public mutating func write(_ string: String) {
        bytes.append(contentsOf: string.utf8)
    }

    public var count: Int { bytes.count }
}

extension UnsafeMutableRawBufferPointer {
    /// Stores `value` big-endian at `offset`; returns the offset after it.
    @inlinable @discardableResult
    public func storeBigEndian<T: FixedWidthInteger>(_ value: T, at offset: Int) -> Int {
        storeBytes(of: value.bigEndian, toByteOffset: offset, as: T.self)
        return offset + MemoryLayout<T>.size
    }
}
