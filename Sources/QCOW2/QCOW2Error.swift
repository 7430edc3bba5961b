/// Why a qcow2 image was refused at open. Each case names one problem; the
/// description is the one line the CLI prints before exiting 1.
///
/// Problems found while serving (a broken L2 table, an undecompressible
/// cluster) are not refusals: they fail that request with `DeviceError(.io)`.
public enum QCOW2Error: Error, Sendable, Equatable, CustomStringConvertible {
    /// The file could not be opened or read (errno text in `reason`).
    case cannotOpen(path: String, reason: String)
    /// The file does not start with "QFI\xfb".
    case notQCOW2
    /// The header is shorter than its version requires.
    case truncatedHeader
    /// A version other than 2 or 3.
    case unsupportedVersion(UInt32)
    /// header_length is too small, not a multiple of 8, or past the first cluster.
    case invalidHeaderLength(UInt32)
    /// cluster_bits outside 9...21 (512 B to 2 MiB), or below 14 with extended L2 entries.
    case invalidClusterBits(UInt32)
    /// refcount_order above 6.
    case invalidRefcountOrder(UInt32)
    /// The virtual size does not fit in a signed 64-bit offset or the L1 table.
    case invalidSize(UInt64)
    /// AES or LUKS encryption, which swiftnbd does not implement.
    case encrypted(method: String)
    /// Incompatible feature bits this implementation does not know.
    case unknownIncompatibleFeatures(names: [String])
    /// The corrupt bit is set and the image was opened writable.
    case corrupt
    /// A compression_type other than zlib (0) and zstd (1), or one that
    /// contradicts the compression type feature bit.
    case unsupportedCompressionType(UInt8)
    /// A header extension is malformed (overruns the first cluster, bad length).
    case invalidHeaderExtension(type: UInt32, reason: String)
    /// The L1 table is misaligned, beyond the end of the file, too large, or too small for the size.
    case invalidL1Table(reason: String)
    /// The refcount table is misaligned, beyond the end of the file, or too large.
    case invalidRefcountTable(reason: String)
    /// The snapshot table is malformed.
    case invalidSnapshotTable(reason: String)
    /// No internal snapshot has this ID or name.
    case snapshotNotFound(String)
    /// The backing file name is out of the first cluster or too long.
    case invalidBackingFileName
    /// A backing file format other than qcow2 and raw.
    case unsupportedBackingFormat(String)
    /// The backing file could not be opened.
    case backingFileUnavailable(path: String, reason: String)
    /// The backing chain refers back to an image already in it.
    case backingChainLoop(path: String)
    /// The backing chain has more images than `QCOW2Options.maxBackingDepth`.
    case backingChainTooDeep(limit: Int)
    /// The external data file bit is set but no file is named, or it can't be opened.
    case externalDataFileUnavailable(reason: String)
    /// Metadata could not be read at open.
    case io(reason: String)
    /// Something else this implementation does not support.
    case unsupported(reason: String)
    /// A persistent bitmap asked for by name is missing or inconsistent.
    case bitmapUnavailable(name: String, reason: String)

    public var description: String {
        switch self {
        case .cannotOpen(let path, let reason): "cannot open '\(path)': \(reason)"
        case .notQCOW2: "not a qcow2 image (bad magic)"
        case .truncatedHeader: "qcow2 header is truncated"
        case .unsupportedVersion(let v): "unsupported qcow2 version \(v) (only 2 and 3 are supported)"
        case .invalidHeaderLength(let n): "invalid qcow2 header length \(n)"
        case .invalidClusterBits(let bits): "invalid qcow2 cluster_bits \(bits) (cluster size must be 512 B to 2 MiB)"
        case .invalidRefcountOrder(let order): "invalid qcow2 refcount_order \(order) (at most 6)"
        case .invalidSize(let size): "invalid qcow2 virtual size \(size)"
        case .encrypted(let method): "encrypted qcow2 images (\(method)) are not supported"
        case .unknownIncompatibleFeatures(let names):
            "unsupported qcow2 incompatible features: \(names.joined(separator: ", "))"
        case .corrupt: "qcow2 image is marked corrupt; repair it with 'qemu-img check -r all' or open it read-only"
        case .unsupportedCompressionType(let t): "unsupported qcow2 compression type \(t)"
        case .invalidHeaderExtension(let type, let reason):
            "invalid qcow2 header extension 0x\(String(type, radix: 16)): \(reason)"
        case .invalidL1Table(let reason): "invalid qcow2 L1 table: \(reason)"
        case .invalidRefcountTable(let reason): "invalid qcow2 refcount table: \(reason)"
        case .invalidSnapshotTable(let reason): "invalid qcow2 snapshot table: \(reason)"
        case .snapshotNotFound(let name): "qcow2 snapshot '\(name)' not found"
        case .invalidBackingFileName: "invalid qcow2 backing file name"
        case .unsupportedBackingFormat(let f): "unsupported backing file format '\(f)'"
        case .backingFileUnavailable(let path, let reason): "cannot open backing file '\(path)': \(reason)"
        case .backingChainLoop(let path): "backing chain loops back to '\(path)'"
        case .backingChainTooDeep(let limit): "backing chain is deeper than \(limit) images"
        case .externalDataFileUnavailable(let reason): "external data file: \(reason)"
        case .io(let reason): "cannot read qcow2 metadata: \(reason)"
        case .unsupported(let reason): "unsupported qcow2 image: \(reason)"
        case .bitmapUnavailable(let name, let reason): "cannot export bitmap '\(name)': \(reason)"
        }
    }
}
