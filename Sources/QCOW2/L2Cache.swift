import BlockDevice
import Synchronization

/// One image's view of the chain's `MetadataCache`: its L2 tables by host
/// offset, and its own hit and miss counts.
final class L2Cache: Sendable {
    let shared: MetadataCache
    private let owner: UInt64
    /// Lookups answered from memory and lookups that loaded the table, for metrics.
    let hits = Atomic<UInt64>(0)
    let misses = Atomic<UInt64>(0)

    /// - Parameters:
    ///   - shared: the chain's cache.
    ///   - owner: the image's tag from `MetadataCache.newImage()`.
    init(shared: MetadataCache, owner: UInt64) {
        self.shared = shared
        self.owner = owner
    }

    private func key(_ offset: UInt64) -> MetadataCache.Key { .init(owner: owner, offset: offset) }

    /// The table at host `offset`, loaded with `load` on a miss.
    func table(at offset: UInt64, load: () throws(DeviceError) -> L2Table) throws(DeviceError) -> L2Table {
        let key = key(offset)
        let (cached, generation) = shared.lookup(key)
        if case .l2(let table)? = cached {
            hits.add(1, ordering: .relaxed)
            return table
        }
        misses.add(1, ordering: .relaxed)
        let loaded = try load()
        guard case .l2(let table) = shared.storeLoaded(.l2(loaded), for: key, generation: generation) else {
            return loaded
        }
        return table
    }

    /// The table at host `offset` if cached; never loads it (and counts
    /// neither a hit nor a miss, as the caller falls back to `table(at:)`).
    func cachedTable(at offset: UInt64) -> L2Table? {
        if case .l2(let table)? = shared.lookup(key(offset)).0 { return table }
        return nil
    }

    /// Stores `table` for host `offset`. Writers use this to publish an update.
    func insert(_ table: L2Table, at offset: UInt64) { shared.update(.l2(table), for: key(offset)) }

    /// Forgets the table at `offset` (its cluster was freed or moved).
    func remove(at offset: UInt64) { shared.remove(key(offset)) }
}
