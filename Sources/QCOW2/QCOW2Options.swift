import Logging
import SystemIO

/// How to open a qcow2 image.
public struct QCOW2Options: Sendable {
    /// Memory for cached L2 tables and refcount blocks, shared by all requests
    /// and every image of the backing chain (qemu's cache-size). 32 MiB of L2
    /// tables map 256 GiB of virtual disk with 64 KiB clusters, 2 GiB with 512 B.
    public var cacheBytes: Int
    /// An internal snapshot to export, by ID or name (IDs win, as in
    /// qemu-nbd -l). The export is then read-only.
    public var snapshot: String?
    /// How many backing images may sit below the top image.
    public var maxBackingDepth: Int
    /// When set, backing files and external data files must lie under one
    /// of these directories (after resolving symlinks); nil allows any path.
    public var allowedDirectories: [String]?
    /// Opens the image, its data file and its backing files. Tests pass an
    /// opener that wraps the files to record or fail their I/O.
    public var opener: FileOpener
    /// Where the backing chain and refused writes are reported (nowhere by default).
    public var logger: Logger
    /// The chain's cache, handed down by the top image to its backing images.
    var sharedCache: MetadataCache?

    public static let defaultCacheBytes = 32 << 20

    public init(cacheBytes: Int = QCOW2Options.defaultCacheBytes, snapshot: String? = nil, maxBackingDepth: Int = 16,
                allowedDirectories: [String]? = nil, opener: @escaping FileOpener = FileHandle.opener,
                logger: Logger = Logger(label: "swiftnbd.qcow2", factory: { _ in SwiftLogNoOpLogHandler() })) {
        self.cacheBytes = cacheBytes
        self.snapshot = snapshot
        self.maxBackingDepth = maxBackingDepth
        self.allowedDirectories = allowedDirectories
        self.opener = opener
        self.logger = logger
    }
}
