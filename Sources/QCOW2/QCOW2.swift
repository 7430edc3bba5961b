import SystemIO

/// The qcow2 image engine (docs/interop/qcow2.txt), knowing nothing of NBD.
///
/// `QCOW2Device` opens an image as a `BlockDevice`:
/// - versions 2 and 3, clusters of 512 B to 2 MiB, refcount orders 0-6,
///   extended L2 entries (subclusters), zlib and zstd compressed clusters,
///   external data files (raw or not), internal snapshots (`QCOW2Options.snapshot`,
///   read-only), backing chains of qcow2 and raw files (relative names from the
///   image's directory, the backing format extension honoured, else probed);
/// - reads and `extents`/`allocationDepth` as qemu-nbd reports them;
/// - writes when opened read-write without a snapshot: in place, or by
///   allocation with copy-on-write, refcounts kept exact (no lazy refcounts;
///   a dirty image is repaired at open), the zero flag, trim, and an order of
///   metadata writes under which a crash only leaks clusters.
///
/// Refused at open with a `QCOW2Error`: encryption, unknown incompatible
/// features, impossible geometry, a corrupt image opened writable, backing
/// chains that loop or are too deep. Metadata found broken while serving
/// fails that request with `DeviceError(.io)`; found broken by a write, it
/// also sets the corrupt bit.
public enum QCOW2 {
    /// The four bytes every qcow2 image starts with: "QFI\xfb".
    public static let magic: UInt32 = 0x5146_49FB

    /// Whether the file at `path` starts with the qcow2 magic. Unreadable or
    /// short files are not qcow2; the caller then treats them as raw and
    /// reports its own open error.
    public static func hasMagic(path: String) -> Bool {
        guard let file = try? FileHandle.open(path, mode: .readOnly) else { return false }
        defer { file.close() }
        var bytes: [UInt8] = [0, 0, 0, 0]
        let ok = bytes.withUnsafeMutableBytes { buffer in
            (try? file.read(into: buffer, at: 0)) != nil
        }
        return ok && hasMagic(bytes)
    }

    /// Whether `bytes` start with the qcow2 magic.
    public static func hasMagic(_ bytes: [UInt8]) -> Bool {
        var cursor = ByteCursor(bytes)
        return cursor.read(UInt32.self) == magic
    }
}
