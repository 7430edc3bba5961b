import BlockDevice

/// A device that has a size and capabilities and nothing else: negotiation
/// and validation only ask for those.
public final class StubDevice: BlockDevice {
    public let size: UInt64
    public let capabilities: DeviceCapabilities

    public init(size: UInt64, capabilities: DeviceCapabilities) {
        self.size = size
        self.capabilities = capabilities
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DeviceError) {
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
    }
    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws(DeviceError) {}
    public func flush() throws(DeviceError) {}
    public func trim(at offset: UInt64, length: UInt64, fua: Bool) throws(DeviceError) {}
    public func writeZeroes(at offset: UInt64, length: UInt64, mayDeallocate: Bool, fast: Bool,
                            fua: Bool) throws(DeviceError) {}
    public func extents(at offset: UInt64, length: UInt64) throws(DeviceError) -> [Extent] {
        [Extent(length: length, flags: [])]
    }
    public func close() {}
}

extension DeviceCapabilities {
    /// Capabilities chosen by eight bits of fuzz input, so every flag
    /// combination the negotiation derives is reachable.
    public init(fuzzBits b: UInt8) {
        self.init(canWrite: b & 1 != 0, canFlush: b & 2 != 0, canFUA: b & 4 != 0, canTrim: b & 8 != 0,
                  canZero: b & 16 != 0, canFastZero: b & 32 != 0, canCache: b & 64 != 0,
                  canMultiConn: b & 128 != 0, isRotational: b & 3 == 3, preferredBlockSize: 4096)
    }
}
