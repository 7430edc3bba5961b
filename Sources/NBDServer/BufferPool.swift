import SystemIO

/// Reuses request and reply buffers so the transmission path does not
/// allocate per request. Buffers come in power-of-two sizes from 4 KiB to
/// the maximum payload; a few of each size are kept.
final class BufferPool: @unchecked Sendable {
    private static let smallestShift = 12
    private static let classes = 14  // 4 KiB ... 32 MiB
    private static let keptPerClass = 16

    private let lock = Lock()
    private var free: [[UnsafeMutableRawBufferPointer]] = Array(repeating: [], count: BufferPool.classes)

    private static func sizeClass(_ count: Int) -> Int {
        let needed = max(count, 1 << smallestShift)
        let shift = Int.bitWidth - (needed - 1).leadingZeroBitCount
        return shift - smallestShift
    }

    /// A buffer of at least `count` bytes, sliced to exactly `count`.
    func take(_ count: Int) -> UnsafeMutableRawBufferPointer {
        let c = Self.sizeClass(count)
        guard c < Self.classes else {
            return .allocate(byteCount: count, alignment: 4096)
        }
        let buffer = lock.withLock { free[c].popLast() }
            ?? .allocate(byteCount: 1 << (c + Self.smallestShift), alignment: 4096)
        return UnsafeMutableRawBufferPointer(start: buffer.baseAddress, count: count)
    }

    /// Returns a buffer from `take`.
    func give(_ buffer: UnsafeMutableRawBufferPointer) {
        let c = Self.sizeClass(buffer.count)
        guard c < Self.classes else {
            buffer.deallocate()
            return
        }
        let whole = UnsafeMutableRawBufferPointer(start: buffer.baseAddress, count: 1 << (c + Self.smallestShift))
        let kept = lock.withLock { () -> Bool in
            guard free[c].count < Self.keptPerClass else { return false }
            free[c].append(whole)
            return true
        }
        if !kept { whole.deallocate() }
    }

    deinit {
        for list in free { for b in list { b.deallocate() } }
    }
}
