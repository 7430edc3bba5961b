import SystemIO

/// Everything a metadata change reads and writes besides the files and the
/// shared caches: the refcounts and allocator, the guest clusters being
/// allocated, the releases waiting for a sync point, and the only handle
/// that may change the active L1 table. It lives in
/// `QCOW2Device.metadataState`, so it is reached only inside `withLock`;
/// the functions that need it take it `inout`. Not copyable: it cannot be
/// carried out of the lock.
struct MetadataState: ~Copyable {
    /// Refcounts and the allocator. Nil when read-only.
    let refcounts: RefcountManager?
    /// Guest clusters whose allocation is under way (see `writeCluster`).
    var pendingClusters: Set<UInt64> = []
    /// A refill claimed ahead of need is being synced outside the lock (`claimAhead`).
    var refillInFlight = false
    /// Releases waiting for a sync point (see `commit`).
    var deferred = DeferredMetadata()
    /// Writes to the active L1 table go through here, so only under the lock.
    let l1Writer: L1Writer
}

/// The active (or selected snapshot's) L1 table in memory, entries in host
/// order. Anyone reads it (a leaf lock); only `L1Writer`, which lives in
/// `MetadataState`, changes it.
final class ActiveL1Table: Sendable {
    private let entries: Locked<[UInt64]>

    init(_ entries: [UInt64]) { self.entries = Locked(entries) }

    /// Entry `index`, or 0 (unallocated) past the end of the table.
    func entry(at index: Int) -> UInt64 { entries.withLock { index < $0.count ? $0[index] : 0 } }

    var count: Int { entries.withLock { $0.count } }

    /// A copy of every entry.
    var snapshot: [UInt64] { entries.withLock { $0 } }

    fileprivate func store(_ entry: UInt64, at index: Int) { entries.withLock { $0[index] = entry } }
}

/// The right to change `ActiveL1Table`: one per device, in its `MetadataState`.
struct L1Writer: ~Copyable {
    let table: ActiveL1Table

    /// Changes the in-memory entry; the caller has written it to the file first.
    func store(_ entry: UInt64, at index: Int) { table.store(entry, at: index) }
}
