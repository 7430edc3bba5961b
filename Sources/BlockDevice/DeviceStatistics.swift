/// Counters an image engine keeps about itself, read for metrics. Reading
/// them costs a few atomic loads, from any thread at any time; the engine
/// bumps them without locks of their own.
public protocol DeviceStatisticsSource: AnyObject, Sendable {
    var statistics: DeviceStatistics { get }
}

/// Totals since the device was opened.
public struct DeviceStatistics: Sendable, Equatable {
    /// Metadata-cache lookups (qcow2: L2 tables) answered from memory.
    public var cacheHits: UInt64 = 0
    /// Metadata-cache lookups that had to read the image.
    public var cacheMisses: UInt64 = 0
    /// Host clusters handed out by the allocator.
    public var clustersAllocated: UInt64 = 0
    /// Host clusters whose reference count dropped to zero.
    public var clustersFreed: UInt64 = 0

    public init(cacheHits: UInt64 = 0, cacheMisses: UInt64 = 0, clustersAllocated: UInt64 = 0,
                clustersFreed: UInt64 = 0) {
        self.cacheHits = cacheHits
        self.cacheMisses = cacheMisses
        self.clustersAllocated = clustersAllocated
        self.clustersFreed = clustersFreed
    }
}
