import BlockDevice
import SystemIO

/// Persistent dirty bitmaps kept true while the image is written: every
/// write, zeroing and trim sets the bits of each enabled bitmap in memory
/// (`PersistentBitmap.markDirty`, a leaf lock, cheap); flush writes the
/// changed bitmap clusters back and a clean close, once they are synced,
/// clears the in_use flags the open set (`PersistentBitmaps.load`). A crash
/// leaves them in_use: qemu then calls them inconsistent, never trusting
/// stale bits. Disabled bitmaps, and every bitmap of a read-only open, are
/// never changed.
extension QCOW2Device {
    /// Throws unless the bitmap `name` exists and is consistent, so that it can be exported
    /// (qemu-nbd -B refuses the same).
    public func requireExportableBitmap(named name: String) throws(QCOW2Error) {
        if bitmaps?.bitmap(named: name) != nil { return }
        if let why = bitmaps?.unusable[name] ?? bitmaps?.unreadable { throw .bitmapUnavailable(name: name, reason: why) }
        throw .bitmapUnavailable(name: name, reason: "the image has no bitmap of that name")
    }

    public func dirtyBitmapExtents(named name: String, at offset: UInt64,
                                   length: UInt64) throws(DeviceError) -> [BitmapExtent] {
        guard let bitmap = bitmaps?.bitmap(named: name) else {
            throw DeviceError(.invalid, "qcow2: no usable bitmap '\(name)'")
        }
        return bitmap.extents(at: offset, length: length, size: size)
    }

    /// Called by every request that changes guest data, before it does.
    func markBitmapsDirty(at offset: UInt64, length: UInt64) {
        guard let bitmaps else { return }
        for bitmap in bitmaps.tracked {
            bitmap.markDirty(offset, length, clusterBits: Int(geometry.clusterBits))
        }
    }

    /// Writes the changed clusters of each tracked bitmap: in place where the
    /// bitmap table names one, else into a newly allocated cluster that the
    /// table then names. The caller's sync point makes them durable; the
    /// bitmaps stay in_use.
    func writeBackBitmaps(_ state: inout MetadataState) throws(DeviceError) {
        guard writable, let bitmaps else { return }
        let clusterSize = geometry.clusterSize
        for bitmap in bitmaps.tracked {
            // Copied under the bitmap's lock, so writes go on setting bits meanwhile.
            let pending = bitmap.state.withLock { s in
                defer { s.changed = [] }
                return s.changed.sorted().map { index in
                    let start = index << geometry.clusterBits
                    return (index, Array(s.bytes[start..<min(start + Int(clusterSize), s.bytes.count)]), s.table[index])
                }
            }
            var remaining = pending[...]
            do throws(DeviceError) {
                while let (index, bytes, tableEntry) = remaining.first {
                    var data = bytes
                    let host = tableEntry & Bitmaps.tableOffsetMask
                    if host != 0 {
                        try writeMetadata(data, at: host, what: "bitmap data")
                    } else if tableEntry & Bitmaps.allOnes == 0 && data.contains(where: { $0 != 0 }) {
                        // A whole cluster, so the file covers it (its tail bits must read as zeros).
                        data += [UInt8](repeating: 0, count: Int(clusterSize) - data.count)
                        let newHost = try allocateClusters(&state, upTo: 1).host
                        metadataMap?.insert(newHost, length: clusterSize)
                        do throws(DeviceError) {
                            try writeMetadata(data, at: newHost, what: "bitmap data")
                            try writeMetadata(QCOW2Device.bigEndianBytes(newHost),
                                              at: bitmap.entry.tableOffset + UInt64(index * 8), what: "bitmap table")
                        } catch {
                            metadataMap?.remove(newHost, length: clusterSize)
                            unallocate(&state, host: newHost, count: 1)
                            throw error
                        }
                        bitmap.state.withLock { $0.table[index] = newHost }
                    }
                    remaining = remaining.dropFirst()
                }
            } catch {
                // Written again at the next flush; until then the bitmap stays in_use.
                bitmap.state.withLock { $0.changed.formUnion(remaining.map(\.0)) }
                throw error
            }
        }
    }

    /// At a clean close, after `closeMetadata` synced everything: the bitmaps
    /// this open marked in_use and kept true lose the flag. Those it could not
    /// track keep it, as do all of them if writing them back failed.
    func closeBitmaps(writtenBack: Bool) {
        guard writable, let bitmaps, writtenBack, !markedCorrupt.load(ordering: .relaxed) else { return }
        let tracked = Set(bitmaps.tracked.map(\.entry.position))
        do throws(DeviceError) {
            try syncImage()
            for entry in bitmaps.markedInUse where tracked.contains(entry.position) {
                try writeMetadata(QCOW2Device.bigEndianBytes(entry.flags & ~BitmapDirectoryEntry.inUse),
                                  at: bitmaps.directoryOffset + UInt64(entry.flagsPosition), what: "bitmap flags")
            }
            try syncImage()
        } catch {
            logger.error("qcow2: bitmaps left in use", metadata: ["qcow2.image": "\(path)", "qcow2.reason": "\(error)"])
        }
    }

    /// `writeBackBitmaps` for `close`; false if they could not be written.
    func writeBackBitmapsForClose() -> Bool {
        guard writable, bitmaps != nil else { return false }
        do {
            try withMetadataLock { state throws(DeviceError) in try writeBackBitmaps(&state) }
            return true
        } catch {
            logger.error("qcow2: bitmaps could not be written back; they stay in use",
                         metadata: ["qcow2.image": "\(path)", "qcow2.reason": "\(error)"])
            return false
        }
    }
}
