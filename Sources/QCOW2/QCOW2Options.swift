/// How to open a qcow2 image.
public struct QCOW2Options: Sendable {
    /// Memory for cached L2 tables, shared by all requests. 32 MiB maps 256 GiB
    /// of virtual disk with 64 KiB clusters.
    public var l2CacheBytes: Int
    /// An internal snapshot to export, by ID or name (IDs win, as in
    /// qemu-nbd -l). The export is then read-only.
    public var snapshot: String?
    /// How many backing images may sit below the top image.
    public var maxBackingDepth: Int

    public init(l2CacheBytes: Int = 32 << 20, snapshot: String? = nil, maxBackingDepth: Int = 16) {
        self.l2CacheBytes = l2CacheBytes
        self.snapshot = snapshot
        self.maxBackingDepth = maxBackingDepth
    }
}
