import BlockDevice

extension QCOW2Device: DeviceStatisticsSource {
    /// The top image's L2 table lookups and allocator; lookups in backing images are not included.
    public var statistics: DeviceStatistics {
        DeviceStatistics(cacheHits: l2Cache.hits.load(ordering: .relaxed),
                         cacheMisses: l2Cache.misses.load(ordering: .relaxed),
                         clustersAllocated: allocationCounters?.allocated.load(ordering: .relaxed) ?? 0,
                         clustersFreed: allocationCounters?.freed.load(ordering: .relaxed) ?? 0)
    }
}
