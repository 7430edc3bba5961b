/// Reads big-endian integers from bytes, returning nil instead of reading
/// past the end. qcow2 stores every number big-endian (spec, "General").
struct ByteCursor {
    let bytes: [UInt8]
    private(set) var position: Int

    init(_ bytes: [UInt8], at position: Int = 0) {
        self.bytes = bytes
        self.position = position
    }

    var remaining: Int { max(0, bytes.count - position) }

    /// Reads the next `T`, or nil when fewer than `T`'s size bytes remain.
    mutating func read<T: FixedWidthInteger & UnsignedInteger>(_: T.Type) -> T? {
        guard let value = ByteCursor.peek(T.self, in: bytes, at: position) else { return nil }
        position += MemoryLayout<T>.size
        return value
    }

    /// Reads `count` raw bytes, or nil when they are not all there.
    mutating func read(bytes count: Int) -> ArraySlice<UInt8>? {
        guard count >= 0, count <= remaining else { return nil }
        defer { position += count }
        return bytes[position..<position + count]
    }

    mutating func skip(_ count: Int) -> Bool {
        guard count >= 0, count <= remaining else { return false }
        position += count
        return true
    }

    /// The big-endian `T` at `offset` in `bytes`, or nil if out of range.
    static func peek<T: FixedWidthInteger & UnsignedInteger>(_: T.Type, in bytes: [UInt8], at offset: Int) -> T? {
        let size = MemoryLayout<T>.size
        guard offset >= 0, offset <= bytes.count - size else { return nil }
        var value: T = 0
        for i in 0..<size { value = value << 8 | T(bytes[offset + i]) }
        return value
    }
}

extension ArraySlice where Element == UInt8 {
    /// The bytes as a string, cut at the first NUL (padding), invalid UTF-8 repaired.
    var qcow2String: String {
        let end = firstIndex(of: 0) ?? endIndex
        return String(decoding: self[startIndex..<end], as: UTF8.self)
    }
}
