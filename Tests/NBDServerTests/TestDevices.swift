import BlockDevice
import Synchronization
import SystemIO
import TestSupport

/// A device whose reads wait until the test opens the gate, counting how many began.
final class GatedDevice: BlockDevice, @unchecked Sendable {
    let size: UInt64
    let capabilities = DeviceCapabilities(canWrite: true)
    let readsStarted = Atomic<Int>(0)
    private let lock = Lock()
    private let opened: Condition
    private var isOpen: Bool

    init(size: UInt64, open: Bool = false) {
        self.size = size
        isOpen = open
        opened = Condition(lock)
    }

    func open() {
        lock.withLock {
            isOpen = true
            opened.broadcast()
        }
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DeviceError) {
        readsStarted.add(1, ordering: .relaxed)
        lock.withLock { while !isOpen { opened.wait() } }
        for i in 0..<buffer.count { buffer[i] = UInt8(truncatingIfNeeded: (offset + UInt64(i)) / 512 + 1) }
    }

    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws(DeviceError) {}
    func flush() throws(DeviceError) {}
    func trim(at offset: UInt64, length: UInt64, fua: Bool) throws(DeviceError) {}
    func writeZeroes(at offset: UInt64, length: UInt64, mayDeallocate: Bool, fast: Bool,
                     fua: Bool) throws(DeviceError) {}
    func extents(at offset: UInt64, length: UInt64) throws(DeviceError) -> [Extent] {
        [Extent(length: length, flags: [])]
    }
    func close() {}
}

/// A device as fragmented as can be: data and holes alternate every `stripe` bytes.
final class StripedDevice: BlockDevice, @unchecked Sendable {
    let size: UInt64
    let stripe: UInt64
    let capabilities = DeviceCapabilities(canWrite: false)
    /// Bytes of extents handed out, to show the server asks only for what it sends.
    let extentBytesAsked = Atomic<UInt64>(0)

    init(size: UInt64, stripe: UInt64 = 4096) {
        self.size = size
        self.stripe = stripe
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DeviceError) {
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
    }
    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws(DeviceError) {}
    func flush() throws(DeviceError) {}
    func trim(at offset: UInt64, length: UInt64, fua: Bool) throws(DeviceError) {}
    func writeZeroes(at offset: UInt64, length: UInt64, mayDeallocate: Bool, fast: Bool,
                     fua: Bool) throws(DeviceError) {}

    func extents(at offset: UInt64, length: UInt64) throws(DeviceError) -> [Extent] {
        extentBytesAsked.add(length, ordering: .relaxed)
        var result: [Extent] = []
        var at = offset
        while at < offset + length {
            let next = min((at / stripe + 1) * stripe, offset + length)
            result.append(Extent(length: next - at, flags: (at / stripe) % 2 == 0 ? [] : [.hole, .zero]))
            at = next
        }
        return result
    }
    func close() {}
}
