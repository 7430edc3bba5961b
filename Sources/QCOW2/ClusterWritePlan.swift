/// What a write into one guest cluster must do, decided from its L2 entry
/// alone. Pure, so that every case is table-tested (ClusterWritePlanTests);
/// `QCOW2Device.writeCluster` performs the plan.
enum ClusterWritePlan: Equatable {
    /// This image owns the cluster and the touched units are allocated:
    /// write the bytes where they are.
    case inPlace(host: UInt64)
    /// Extended L2: write only the touched subclusters, into `host` (owned)
    /// or a new cluster when nil; the other subclusters keep their state.
    case subclusters(host: UInt64?)
    /// Rewrite the whole cluster (old contents with the new bytes over them)
    /// at `host` (owned, or the data file's fixed place) or a new cluster when nil.
    case rewrite(host: UInt64?)
    /// The entry is inconsistent: writing would go to a wrong place.
    case corrupt(String)

    /// - Parameters:
    ///   - entry, bitmap: the L2 entry (bitmap 0 without extended L2).
    ///   - from, length: the bytes written, relative to the cluster start.
    ///   - guestCluster: the cluster's guest offset (its place in a data file).
    ///   - refcount: the refcount of the entry's host cluster, when the entry
    ///     is a plain uncompressed cluster without COPIED (else unused).
    static func plan(entry: UInt64, bitmap: UInt64, from: UInt64, length: UInt64, guestCluster: UInt64,
                     geometry g: Geometry, refcount: UInt64?) -> ClusterWritePlan {
        let compressed = entry & EntryBits.compressed != 0
        let host = entry & EntryBits.offsetMask
        let copied = entry & EntryBits.copied != 0
        if !compressed && host & (g.clusterSize - 1) != 0 {
            return .corrupt("misaligned cluster offset 0x\(String(host, radix: 16))")
        }
        if compressed && g.hasDataFile { return .corrupt("compressed cluster in an image with an external data file") }
        // Where the cluster may be rewritten without allocating.
        var owned: UInt64?
        if g.hasDataFile {
            guard host == 0 || host == guestCluster else {
                return .corrupt("data file cluster at 0x\(String(host, radix: 16)) for guest 0x\(String(guestCluster, radix: 16))")
            }
            owned = guestCluster
        } else if !compressed && host != 0 && (copied || refcount == 1) {
            owned = host
        }
        if g.extendedL2 {
            if compressed { return .rewrite(host: nil) }
            if let owned, copied || g.hasDataFile {
                let first = from >> UInt64(g.unitBits), last = (from + length - 1) >> UInt64(g.unitBits)
                let mask = ((UInt64(1) << (last - first + 1)) - 1) << first
                if bitmap & mask == mask { return .inPlace(host: owned) }
            }
            if owned != nil || host == 0 { return .subclusters(host: owned) }
            return .rewrite(host: nil)
        }
        let allocated = host != 0 || (g.hasDataFile && copied)
        if let owned, copied, allocated, entry & EntryBits.zero == 0 { return .inPlace(host: owned) }
        return .rewrite(host: owned)
    }
}
