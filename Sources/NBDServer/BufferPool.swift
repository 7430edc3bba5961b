import SystemIO

/// Reuses request and reply buffers so the transmission path does not
/// allocate per request. Buffers come in power-of-two sizes from 4 KiB to
/// the maximum payload. What is kept is bounded in bytes (`budget`), and
/// `trimIfIdle` hands everything back once the pool has gone unused for a
/// while, so a burst of large reads does not leave its memory behind.
final class BufferPool: @unchecked Sendable {
    private static let smallestShift = 12
    private static let classes = 14  // 4 KiB ... 32 MiB
    /// Buffers of this size and up are whole mappings, returned to the kernel on release.
    private static let mappedFrom = 1 << 17

    let budget: Int
    private let lock = Lock()
    private var free: [[UnsafeMutableRawBufferPointer]] = Array(repeating: [], count: BufferPool.classes)
    private var keptBytes = 0
    private var usedSinceTrim = false

    /// `budget`: the most bytes kept free for reuse.
    init(budget: Int = 64 << 20) {
        self.budget = budget
    }

    private static func sizeClass(_ count: Int) -> Int {
        let needed = max(count, 1 << smallestShift)
        let shift = Int.bitWidth - (needed - 1).leadingZeroBitCount
        return shift - smallestShift
    }

    /// A buffer of at least `count` bytes, sliced to exactly `count`; nil when memory is exhausted.
    func take(_ count: Int) -> UnsafeMutableRawBufferPointer? {
        let c = Self.sizeClass(count)
        guard c < Self.classes else { return Self.allocate(count) }
        let reused = lock.withLock { () -> UnsafeMutableRawBufferPointer? in
            usedSinceTrim = true
            guard let buffer = free[c].popLast() else { return nil }
            keptBytes -= buffer.count
            return buffer
        }
        guard let buffer = reused ?? Self.allocate(1 << (c + Self.smallestShift)) else { return nil }
        return UnsafeMutableRawBufferPointer(start: buffer.baseAddress, count: count)
    }

    /// Returns a buffer from `take`.
    func give(_ buffer: UnsafeMutableRawBufferPointer) {
        let c = Self.sizeClass(buffer.count)
        guard c < Self.classes else {
            Self.deallocate(buffer)
            return
        }
        let whole = UnsafeMutableRawBufferPointer(start: buffer.baseAddress, count: 1 << (c + Self.smallestShift))
        let kept = lock.withLock { () -> Bool in
            guard keptBytes + whole.count <= budget else { return false }
            free[c].append(whole)
            keptBytes += whole.count
            return true
        }
        if !kept { Self.deallocate(whole) }
    }

    /// Frees every kept buffer if none was taken since the last call; the
    /// server calls this every few seconds.
    func trimIfIdle() {
        let released = lock.withLock { () -> [[UnsafeMutableRawBufferPointer]] in
            defer { usedSinceTrim = false }
            guard !usedSinceTrim, keptBytes > 0 else { return [] }
            let all = free
            free = Array(repeating: [], count: Self.classes)
            keptBytes = 0
            return all
        }
        for list in released { for b in list { Self.deallocate(b) } }
    }

    private static func allocate(_ count: Int) -> UnsafeMutableRawBufferPointer? {
        if count >= mappedFrom { return PageMemory.allocate(count) }
        return .allocate(byteCount: count, alignment: 4096)
    }

    private static func deallocate(_ buffer: UnsafeMutableRawBufferPointer) {
        if buffer.count >= mappedFrom { PageMemory.deallocate(buffer) } else { buffer.deallocate() }
    }

    deinit {
        for list in free { for b in list { Self.deallocate(b) } }
    }
}
