import BlockDevice
import Foundation
@testable import QCOW2
import TestSupport
import Testing

/// The L2 tables and refcount blocks of a whole backing chain share one
/// memory budget, which no workload exceeds; refcount blocks dropped from
/// the cache lose nothing.
@Suite struct MetadataCacheTests {
    static func l2(_ byte: UInt64) -> CachedTable { .l2(L2Table(entries: [UInt64](repeating: byte, count: 64))) }

    static func isCached(_ cache: MetadataCache, _ offset: UInt64) -> Bool {
        cache.lookup(MetadataCache.Key(owner: 2, offset: offset)).0 != nil
    }

    /// CLOCK: a table looked up since the hand last passed survives the
    /// next eviction; the first one found unreferenced goes.
    @Test func evictsTheFirstUnreferencedTable() {
        let entry = 512 + MetadataCache.entryOverhead
        let cache = MetadataCache(budget: 3 * entry)
        for offset in [0, 512, 1024] as [UInt64] {
            cache.update(Self.l2(offset), for: .init(owner: 2, offset: offset))
        }
        // Full: the hand clears every bit on its first lap and evicts the first table.
        cache.update(Self.l2(1536), for: .init(owner: 2, offset: 1536))
        #expect(!Self.isCached(cache, 0))
        #expect(Self.isCached(cache, 512))  // referenced again; 1024 is not
        cache.update(Self.l2(2048), for: .init(owner: 2, offset: 2048))
        #expect(Self.isCached(cache, 512))
        #expect(!Self.isCached(cache, 1024))
        #expect(Self.isCached(cache, 1536) && Self.isCached(cache, 2048))
        #expect(cache.usedBytes == 3 * entry)
    }

    /// A table loaded before a writer's update is handed back but not cached.
    @Test func staleLoadIsNotCached() {
        let cache = MetadataCache(budget: 64 << 10)
        let key = MetadataCache.Key(owner: 2, offset: 4096)
        let (missing, generation) = cache.lookup(key)
        #expect(missing == nil)
        cache.update(Self.l2(7), for: .init(owner: 2, offset: 8192))
        _ = cache.storeLoaded(Self.l2(1), for: key, generation: generation)
        #expect(!Self.isCached(cache, 4096))
        _ = cache.storeLoaded(Self.l2(1), for: key, generation: cache.lookup(key).1)
        #expect(Self.isCached(cache, 4096))
    }

    /// A table larger than the budget is never cached, not even alone.
    @Test func tableLargerThanTheBudgetIsNotCached() {
        let cache = MetadataCache(budget: 512)
        cache.update(Self.l2(1), for: .init(owner: 2, offset: 0))
        #expect(cache.count == 0 && cache.usedBytes == 0)
    }

    /// Many allocations and reads over a 512 B-cluster image with a 64 KiB
    /// cache: far more L2 tables and refcount blocks than fit. The budget
    /// holds after every request, and once closed the image is exactly the
    /// model and `qemu-img check` clean (no refcount change was lost with
    /// an evicted block).
    @Test func tinyCacheHoldsItsBudgetAndLosesNothing() throws {
        let dir = try TemporaryDirectory("qcow2-cache-budget")
        let path = dir.file("small-clusters.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, "48M"])
        try Q.io(path, ["write -P 0x11 0 1M", "write -P 0x22 20M 512k"])
        var model = try Q.qemuRaw(path, scratch: dir)
        let budget = 64 << 10
        let device = try QCOW2Device(path: path, readOnly: false, options: QCOW2Options(cacheBytes: budget))
        let cache = device.l2Cache.shared
        var most = 0
        var buffer = [UInt8](repeating: 0, count: 4096)
        for (i, op) in WriteTests.randomOps(count: 300, size: device.size, cluster: 512, seed: 9).enumerated() {
            try WriteTests.apply([op], to: device, model: &model)
            let offset = UInt64(i) * 160 * 1024 % (device.size - 4096)
            try buffer.withUnsafeMutableBytes { try device.read(into: $0, at: offset) }
            #expect(buffer[...] == model[Int(offset)..<Int(offset) + 4096])
            most = max(most, cache.usedBytes)
        }
        // The workload's L2 tables alone (~300) are three times the budget.
        let tables = device.l1Table.snapshot.filter { $0 != 0 }.count
        #expect(tables * (512 + MetadataCache.entryOverhead) > 3 * budget)
        try Q.expectSameContents(device, model)
        most = max(most, cache.usedBytes)
        #expect(most <= budget)
        #expect(most > budget / 2, "the cache was barely used: \(most) bytes")
        device.close()
        try WriteTests.expectConsistent(path, model: model, dir: dir)
    }

    /// A backing image uses its top image's cache: one budget for the chain.
    @Test func backingChainSharesOneBudget() throws {
        let dir = try TemporaryDirectory("qcow2-cache-chain")
        let base = dir.file("base.qcow2"), top = dir.file("top.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", base, "8M"])
        try Q.io(base, ["write -P 0x33 0 8M"])
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", base, "-F", "qcow2", top])
        try Q.io(top, ["write -P 0x44 1M 1M"])
        let budget = 32 << 10
        let device = try QCOW2Device(path: top, readOnly: true, options: QCOW2Options(cacheBytes: budget))
        defer { device.close() }
        let backing = try #require(device.backing as? QCOW2Device)
        #expect(backing.l2Cache.shared === device.l2Cache.shared)
        try Q.expectSameContents(device, try Q.qemuRaw(top, scratch: dir))
        #expect(device.l2Cache.shared.usedBytes <= budget)
        #expect(backing.l2Cache.misses.load(ordering: .relaxed) > 0)
    }
}
