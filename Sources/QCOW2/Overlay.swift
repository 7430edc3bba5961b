import SystemIO

extension QCOW2 {
    /// Creates an empty qcow2 (v3) image over a backing file: every read goes
    /// to the backing file until written. This is the temporary overlay that
    /// `qemu-nbd -s/--snapshot` writes to, leaving the original untouched;
    /// the caller opens it with `QCOW2Device(path:readOnly: false)` and
    /// deletes it when done.
    /// - Parameters:
    ///   - path: the file to create (truncated if it exists).
    ///   - backingFile: the backing file's name as stored; an absolute path is safest.
    ///   - backingFormat: "qcow2" or "raw", stored in the backing format extension.
    ///   - size: the virtual size, normally the backing file's.
    ///   - clusterBits: log2 of the cluster size, 9...21 (64 KiB by default).
    /// - Throws: `QCOW2Error.cannotOpen` or `.io` when the file can't be written,
    ///   `.invalidSize` or `.invalidBackingFileName` for impossible arguments.
    public static func createOverlay(at path: String, backingFile: String, backingFormat: String, size: UInt64,
                                     clusterBits: Int = 16) throws(QCOW2Error) {
        let bytes = try overlayBytes(backingFile: backingFile, backingFormat: backingFormat, size: size,
                                     clusterBits: clusterBits)
        let file: FileHandle
        do throws(Errno) {
            file = try FileHandle.open(path, mode: .readWrite, create: true)
        } catch {
            throw .cannotOpen(path: path, reason: error.description)
        }
        defer { file.close() }
        do throws(Errno) {
            try file.truncate(to: 0)
            try file.write(bytes: bytes, at: 0)
            try file.sync()
        } catch {
            throw .io(reason: "writing '\(path)': \(error)")
        }
    }

    /// The bytes of an empty overlay image: header cluster, refcount table,
    /// one refcount block, L1 table. Pure, for tests.
    static func overlayBytes(backingFile: String, backingFormat: String, size: UInt64,
                             clusterBits: Int) throws(QCOW2Error) -> [UInt8] {
        guard (9...21).contains(clusterBits) else { throw .invalidClusterBits(UInt32(clusterBits)) }
        let name = Array(backingFile.utf8), format = Array(backingFormat.utf8)
        let clusterSize = 1 << clusterBits
        guard !name.isEmpty, name.count <= 1023 else { throw .invalidBackingFileName }
        guard size <= UInt64(Int64.max) else { throw .invalidSize(size) }
        let l2Covers = UInt64(clusterSize / 8) << UInt64(clusterBits)
        let l1Size = (size + l2Covers - 1) / l2Covers
        guard l1Size <= UInt64(QCOW2Header.maximumL1Entries) else { throw .invalidSize(size) }
        let l1Clusters = max(1, (Int(l1Size) * 8 + clusterSize - 1) / clusterSize)
        let totalClusters = 3 + l1Clusters
        // One 16-bit refcount block must count every cluster of the image.
        guard totalClusters <= clusterSize / 2 else { throw .invalidSize(size) }

        var header: [UInt8] = []
        func put<T: FixedWidthInteger>(_ value: T) { header += QCOW2Device.bigEndianBytes(value) }
        let headerLength = 112
        let extensionsLength = 8 + (format.count + 7) / 8 * 8 + 8
        let nameOffset = headerLength + extensionsLength
        guard nameOffset + name.count <= clusterSize else { throw .invalidBackingFileName }
        put(QCOW2.magic); put(UInt32(3))
        put(UInt64(nameOffset)); put(UInt32(name.count))
        put(UInt32(clusterBits)); put(size); put(UInt32(0))  // crypt_method
        put(UInt32(l1Size)); put(UInt64(3 * clusterSize))  // L1 table at cluster 3
        put(UInt64(clusterSize)); put(UInt32(1))  // refcount table at cluster 1, one cluster
        put(UInt32(0)); put(UInt64(0))  // no snapshots
        put(UInt64(0)); put(UInt64(0)); put(UInt64(0))  // incompatible, compatible, autoclear
        put(UInt32(4)); put(UInt32(headerLength))  // refcount_order 4, header_length
        header += [UInt8](repeating: 0, count: headerLength - header.count)  // compression_type zlib + padding
        put(QCOW2Header.ExtensionType.backingFormat.rawValue); put(UInt32(format.count))
        header += format + [UInt8](repeating: 0, count: (8 - format.count % 8) % 8)
        put(UInt32(0)); put(UInt32(0))  // end of extensions
        header += name

        var image = [UInt8](repeating: 0, count: totalClusters * clusterSize)
        image.replaceSubrange(0..<header.count, with: header)
        image.replaceSubrange(clusterSize..<clusterSize + 8, with: QCOW2Device.bigEndianBytes(UInt64(2 * clusterSize)))
        for cluster in 0..<totalClusters {  // refcount 1 for every cluster, 16 bits each
            image[2 * clusterSize + cluster * 2 + 1] = 1
        }
        return image
    }
}
