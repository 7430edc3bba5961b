import Logging
import SystemIO

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
    /// When set, backing files and external data files must lie under one
    /// of these directories (after resolving symlinks); nil allows any path.
    public var allowedDirectories: [String]?
    /// Opens the image, its data file and its backing files. Tests pass an
    /// opener that wraps the files to record or fail their I/O.
    public var opener: FileOpener
    /// Where the backing chain and refused writes are reported (nowhere by default).
    public var logger: Logger

    public init(l2CacheBytes: Int = 32 << 20, snapshot: String? = nil, maxBackingDepth: Int = 16,
                allowedDirectories: [String]? = nil, opener: @escaping FileOpener = FileHandle.opener,
                logger: Logger = Logger(label: "swiftnbd.qcow2", factory: { _ in SwiftLogNoOpLogHandler() })) {
        self.l2CacheBytes = l2CacheBytes
        self.snapshot = snapshot
        self.maxBackingDepth = maxBackingDepth
        self.allowedDirectories = allowedDirectories
        self.opener = opener
        self.logger = logger
    }
}
