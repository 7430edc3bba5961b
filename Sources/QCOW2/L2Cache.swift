import BlockDevice
import Synchronization

/// A bounded cache of L2 tables shared by every request thread. Tables are
/// spread over stripes, each a small LRU behind its own lock, so requests
/// on different tables rarely contend. No lock is held during disk I/O: on
/// a miss the caller loads the table unlocked, and if two threads load the
/// same table at once both copies are equal. A load that raced with a
/// writer's update is returned to its caller but not cached.
final class L2Cache: Sendable {
    private struct Entry {
        var table: L2Table
        var lastUse: UInt64
    }

    private struct StripeState {
        var entries: [UInt64: Entry] = [:]
        var clock: UInt64 = 0
        /// Bumped by every update from a writer, so a table loaded from disk
        /// before an update is never cached after it.
        var generation: UInt64 = 0
    }

    private final class Stripe: Sendable {
        let state = Mutex(StripeState())
    }

    private let stripes: [Stripe]
    /// Lookups answered from memory and lookups that loaded the table, for metrics.
    let hits = Atomic<UInt64>(0)
    let misses = Atomic<UInt64>(0)
    private let capacityPerStripe: Int
    private let clusterBits: Int

    /// - Parameters:
    ///   - capacityBytes: memory to spend on tables, at least one table per stripe.
    ///   - clusterBits: log2 of the table size, to spread keys across stripes.
    init(capacityBytes: Int, clusterBits: Int) {
        let tables = max(1, capacityBytes >> clusterBits)
        let stripeCount = min(16, tables)
        stripes = (0..<stripeCount).map { _ in Stripe() }
        capacityPerStripe = max(1, tables / stripeCount)
        self.clusterBits = clusterBits
    }

    private func stripe(for offset: UInt64) -> Stripe {
        stripes[Int((offset >> UInt64(clusterBits)) % UInt64(stripes.count))]
    }

    /// The table at host `offset`, loaded with `load` on a miss.
    func table(at offset: UInt64, load: () throws(DeviceError) -> L2Table) throws(DeviceError) -> L2Table {
        let stripe = stripe(for: offset)
        let (cached, generation): (L2Table?, UInt64) = stripe.state.withLock { state in
            state.clock += 1
            guard state.entries[offset] != nil else { return (nil, state.generation) }
            state.entries[offset]!.lastUse = state.clock
            return (state.entries[offset]!.table, state.generation)
        }
        if let cached {
            hits.add(1, ordering: .relaxed)
            return cached
        }
        misses.add(1, ordering: .relaxed)
        let loaded = try load()
        return stripe.state.withLock { state in
            if let present = state.entries[offset] { return present.table }
            if state.generation == generation { store(loaded, at: offset, in: &state) }
            return loaded
        }
    }

    private func store(_ table: L2Table, at offset: UInt64, in state: inout StripeState) {
        state.clock += 1
        if state.entries[offset] == nil, state.entries.count >= capacityPerStripe,
           let victim = state.entries.min(by: { $0.value.lastUse < $1.value.lastUse })?.key {
            state.entries[victim] = nil
        }
        state.entries[offset] = Entry(table: table, lastUse: state.clock)
    }

    /// Stores `table` for host `offset`, evicting the least recently used
    /// table of its stripe when full. Writers use this to publish an update.
    func insert(_ table: L2Table, at offset: UInt64) {
        stripe(for: offset).state.withLock { state in
            state.generation += 1
            store(table, at: offset, in: &state)
        }
    }

    /// Forgets the table at `offset` (its cluster was freed or moved).
    func remove(at offset: UInt64) {
        stripe(for: offset).state.withLock { state in
            state.generation += 1
            state.entries[offset] = nil
        }
    }
}
