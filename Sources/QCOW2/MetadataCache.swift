import Synchronization
import SystemIO

/// A refcount block as cached. Its owner (`RefcountManager`, under the
/// device's metadata lock) changes the bytes in place and writes every
/// change through to the file at once, so a cached block is never dirty:
/// evicting it needs no write-back and cannot reorder it against the syncs
/// the power-loss order relies on.
final class RefcountBlock: @unchecked Sendable {
    var bytes: [UInt8]
    init(_ bytes: [UInt8]) { self.bytes = bytes }
}

/// A table the cache holds.
enum CachedTable: Sendable {
    case l2(L2Table)
    case refcounts(RefcountBlock)

    /// The table's own bytes, plus an estimate of what the cache spends to
    /// index it, so the budget bounds real memory rather than payload only.
    var cost: Int {
        let payload: Int
        switch self {
        case .l2(let table): payload = table.entries.count * 8
        case .refcounts(let block): payload = block.bytes.count
        }
        return payload + MetadataCache.entryOverhead
    }
}

/// One memory budget for the L2 tables and refcount blocks of every image
/// of a backing chain (qemu's cache-size). Keys are spread over stripes,
/// each a CLOCK ring behind its own lock: a hit only sets the entry's
/// reference bit, nothing moves, so concurrent readers hold a stripe lock
/// for one hash lookup. Making room sweeps the ring from its hand, clearing
/// reference bits, and evicts the first entry found unreferenced.
///
/// No lock is held during disk I/O: on a miss the caller loads the table
/// unlocked, and if two threads load the same table at once both copies are
/// equal. A load that raced with a writer's update is returned to its caller
/// but not cached (see `generation`).
final class MetadataCache: Sendable {
    /// What the cache spends per entry besides the table: the ring slot, the
    /// index entry and the table object's header, rounded up.
    static let entryOverhead = 128
    /// Stripes are at least this large, so a tiny budget is one ring that
    /// still holds several tables rather than sixteen that hold none.
    static let minimumStripeBytes = 256 << 10

    /// A table of one image. `owner` comes from `newImage()`, tagged with the
    /// kind so that an L2 table and a refcount block at the same offset of a
    /// corrupt image stay apart.
    struct Key: Hashable {
        var owner: UInt64
        var offset: UInt64
    }

    private struct Slot {
        var key: Key
        var value: CachedTable
        var cost: Int
        var referenced: Bool
    }

    private struct Ring {
        var positions: [Key: Int] = [:]
        var slots: [Slot?] = []
        var freeSlots: [Int] = []
        var hand = 0
        var bytes = 0
        /// Bumped by every update from a writer, so a table loaded from disk
        /// before an update is never cached after it.
        var generation: UInt64 = 0

        /// Makes room for `cost` more bytes within `budget`; false when the
        /// table can never fit.
        mutating func makeRoom(for cost: Int, budget: Int) -> Bool {
            guard cost <= budget else { return false }
            while bytes + cost > budget {
                // Every slot is visited at most twice: the first pass clears
                // the reference bits, so the second finds a victim.
                hand = hand < slots.count ? hand : 0
                if let slot = slots[hand] {
                    if slot.referenced {
                        slots[hand]!.referenced = false
                    } else {
                        remove(at: hand)
                    }
                }
                hand += 1
            }
            return true
        }

        mutating func remove(at position: Int) {
            guard let slot = slots[position] else { return }
            positions[slot.key] = nil
            slots[position] = nil
            freeSlots.append(position)
            bytes -= slot.cost
        }

        mutating func store(_ value: CachedTable, for key: Key, budget: Int) {
            if let position = positions[key] { remove(at: position) }
            let cost = value.cost
            guard makeRoom(for: cost, budget: budget) else { return }
            let slot = Slot(key: key, value: value, cost: cost, referenced: true)
            if let position = freeSlots.popLast() {
                slots[position] = slot
                positions[key] = position
            } else {
                positions[key] = slots.count
                slots.append(slot)
            }
            bytes += cost
        }
    }

    private final class Stripe: Sendable {
        let ring = Locked(Ring())
    }

    /// The most memory the cache may hold, in the units of `CachedTable.cost`.
    let budget: Int
    private let stripes: [Stripe]
    private let stripeBudget: Int
    private let stripeShift: UInt64
    private let nextImage = Atomic<UInt64>(1)

    init(budget: Int) {
        self.budget = max(0, budget)
        var count = 1
        while count < 16 && self.budget / (count * 2) >= MetadataCache.minimumStripeBytes { count *= 2 }
        stripes = (0..<count).map { _ in Stripe() }
        stripeBudget = self.budget / count
        stripeShift = UInt64(64 - count.trailingZeroBitCount)
    }

    /// A new owner tag for one image's tables; `| 1` marks its refcount blocks.
    func newImage() -> UInt64 { nextImage.wrappingAdd(1, ordering: .relaxed).oldValue << 1 }

    private func stripe(for key: Key) -> Stripe {
        guard stripes.count > 1 else { return stripes[0] }
        // Fibonacci hashing: table offsets are multiples of the cluster size,
        // so their low bits alone would put every table in one stripe.
        let mixed = ((key.offset >> 9) ^ (key.owner << 40)) &* 0x9E37_79B9_7F4A_7C15
        return stripes[Int(mixed >> stripeShift)]
    }

    /// The cached table for `key`, marked recently used, and the stripe's
    /// generation to hand back to `storeLoaded` after a miss.
    func lookup(_ key: Key) -> (CachedTable?, UInt64) {
        stripe(for: key).ring.withLock { ring in
            guard let position = ring.positions[key] else { return (nil, ring.generation) }
            ring.slots[position]!.referenced = true
            return (ring.slots[position]!.value, ring.generation)
        }
    }

    /// Caches a table loaded from disk after a miss, unless a writer updated
    /// the stripe since `generation`. Returns the table to use: one another
    /// thread cached meanwhile, or `value`.
    func storeLoaded(_ value: CachedTable, for key: Key, generation: UInt64) -> CachedTable {
        stripe(for: key).ring.withLock { ring in
            if let position = ring.positions[key] { return ring.slots[position]!.value }
            if ring.generation == generation { ring.store(value, for: key, budget: stripeBudget) }
            return value
        }
    }

    /// Publishes a writer's new version of a table.
    func update(_ value: CachedTable, for key: Key) {
        stripe(for: key).ring.withLock { ring in
            ring.generation += 1
            ring.store(value, for: key, budget: stripeBudget)
        }
    }

    /// Forgets a table (its cluster was freed or moved).
    func remove(_ key: Key) {
        stripe(for: key).ring.withLock { ring in
            ring.generation += 1
            if let position = ring.positions[key] { ring.remove(at: position) }
        }
    }

    /// The memory held now; never above `budget`.
    var usedBytes: Int { stripes.reduce(0) { total, stripe in total + stripe.ring.withLock { $0.bytes } } }

    /// How many tables are cached now.
    var count: Int { stripes.reduce(0) { total, stripe in total + stripe.ring.withLock { $0.positions.count } } }
}
