/// A v3 qcow2 header with 64 KiB clusters that parses and validates against
/// a 256 KiB file; targets change its fields to get other geometries.
public let minimalQCOW2Header: [UInt8] = {
    var b = [UInt8](repeating: 0, count: 512)
    func put<T: FixedWidthInteger>(_ v: T, _ at: Int) {
        withUnsafeBytes(of: v.bigEndian) { b.replaceSubrange(at..<at + MemoryLayout<T>.size, with: $0) }
    }
    put(UInt32(0x5146_49FB), 0); put(UInt32(3), 4); put(UInt32(16), 20); put(UInt64(1 << 20), 24)
    put(UInt32(1), 36); put(UInt64(0x30000), 40); put(UInt64(0x10000), 48); put(UInt32(1), 56)
    put(UInt32(4), 96); put(UInt32(104), 100)
    return b
}()
