import BlockDevice
import SystemIO

/// A device held in memory, for testing the server's logic without files.
public final class MemoryDevice: BlockDevice, @unchecked Sendable {
    private let lock = Lock()
    private var bytes: [UInt8]
    public let size: UInt64
    public let capabilities: DeviceCapabilities

    public init(size: Int, capabilities: DeviceCapabilities = DeviceCapabilities(canWrite: true, canTrim: true)) {
        bytes = [UInt8](repeating: 0, count: size)
        self.size = UInt64(size)
        self.capabilities = capabilities
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DeviceError) {
        lock.withLock { bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count])) } }
    }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws(DeviceError) {
        lock.withLock { bytes.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data) }
    }

    public func flush() throws(DeviceError) {}

    public func trim(at offset: UInt64, length: UInt64, fua: Bool) throws(DeviceError) {}

    public func writeZeroes(at offset: UInt64, length: UInt64, mayDeallocate: Bool, fast: Bool, fua: Bool) throws(DeviceError) {
        lock.withLock {
            for i in Int(offset)..<Int(offset + length) { bytes[i] = 0 }
        }
    }

    public func extents(at offset: UInt64, length: UInt64) throws(DeviceError) -> [Extent] {
        [Extent(length: min(length, size - offset), flags: [])]
    }

    public func close() {}
}
