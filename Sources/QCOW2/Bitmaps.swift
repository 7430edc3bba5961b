import BlockDevice
import SystemIO

/// One entry of the bitmap directory (spec, "Bitmap directory").
struct BitmapDirectoryEntry: Equatable, Sendable {
    static let inUse: UInt32 = 1 << 0
    static let auto: UInt32 = 1 << 1
    static let extraDataCompatible: UInt32 = 1 << 2
    static let dirtyTrackingType: UInt8 = 1

    var tableOffset: UInt64
    var tableSize: UInt32
    var flags: UInt32
    var type: UInt8
    var granularityBits: UInt8
    var extraDataSize: UInt32
    var name: String
    /// Where the entry starts within the directory.
    var position: Int

    /// Where the flags field lies within the directory.
    var flagsPosition: Int { position + 12 }
}

/// Parsing of the bitmap directory and table; pure, for fuzzing.
enum Bitmaps {
    /// Table entry bits 9-55: the data cluster's offset (spec, "Bitmap table").
    static let tableOffsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    /// Table entry bit 0, meaningful when the offset is 0: the cluster reads as all ones.
    static let allOnes: UInt64 = 1

    /// The `count` entries of `directory`, or nil if it is malformed.
    static func parseDirectory(_ directory: [UInt8], count: Int) -> [BitmapDirectoryEntry]? {
        var r = ByteCursor(directory)
        var entries: [BitmapDirectoryEntry] = []
        for _ in 0..<count {
            let start = r.position
            guard let tableOffset = r.read(UInt64.self), let tableSize = r.read(UInt32.self),
                  let flags = r.read(UInt32.self), let type = r.read(UInt8.self), let bits = r.read(UInt8.self),
                  let nameSize = r.read(UInt16.self), let extraSize = r.read(UInt32.self),
                  r.skip(Int(extraSize)), let name = r.read(bytes: Int(nameSize))
            else { return nil }
            let unpadded = r.position - start
            guard r.skip(min(r.remaining, (8 - unpadded % 8) % 8)) else { return nil }
            entries.append(BitmapDirectoryEntry(tableOffset: tableOffset, tableSize: tableSize, flags: flags,
                                                type: type, granularityBits: bits, extraDataSize: extraSize,
                                                name: String(decoding: name, as: UTF8.self), position: start))
        }
        return entries
    }

    /// Offsets (within `directory`) of each entry's flags field, or nil if the directory is malformed.
    static func flagOffsets(in directory: [UInt8], count: Int) -> [Int]? {
        parseDirectory(directory, count: count)?.map(\.flagsPosition)
    }

    /// Whether the directory lies within the file at a cluster boundary (at most 64 MiB, as qemu allows).
    static func directoryIsPlaced(offset: UInt64, size: UInt64, fileSize: UInt64, clusterSize: UInt64) -> Bool {
        size <= 64 << 20 && offset & (clusterSize - 1) == 0 && offset <= fileSize && size <= fileSize - offset
    }

    /// Whether a bitmap's table lies within the file at a cluster boundary.
    static func tableIsPlaced(_ entry: BitmapDirectoryEntry, fileSize: UInt64, clusterSize: UInt64) -> Bool {
        entry.tableOffset != 0 && entry.tableOffset & (clusterSize - 1) == 0 && entry.tableOffset <= fileSize
            && UInt64(entry.tableSize) * 8 <= fileSize - entry.tableOffset
    }

    /// Whether a table entry's data cluster (nonzero) lies within the file at a cluster boundary.
    static func dataClusterIsPlaced(_ host: UInt64, fileSize: UInt64, clusterSize: UInt64) -> Bool {
        host & (clusterSize - 1) == 0 && host < fileSize
    }

    /// Bytes of bitmap data for a disk of `size` bytes at `granularityBits`.
    static func dataBytes(size: UInt64, granularityBits: Int) -> UInt64 {
        let bits = (size + (1 << UInt64(granularityBits)) - 1) >> UInt64(granularityBits)
        return (bits + 7) / 8
    }
}

/// A persistent dirty bitmap in memory: bit i (least significant bit first
/// in each byte, as on disk) stands for bytes [i, i+1) × granularity.
final class PersistentBitmap: Sendable {
    let entry: BitmapDirectoryEntry
    /// Enabled (auto), consistent, and the image is open read-write: writes set its bits
    /// and it is written back. Others are never changed.
    let tracked: Bool
    let granularityBits: Int

    struct State {
        var bytes: [UInt8]
        /// The bitmap table, entries in host order.
        var table: [UInt64]
        /// Indices of data clusters changed since they were last written back.
        var changed: Set<Int> = []
    }
    /// A leaf lock: never held while taking another.
    let state: Locked<State>

    init(entry: BitmapDirectoryEntry, tracked: Bool, bytes: [UInt8], table: [UInt64]) {
        self.entry = entry
        self.tracked = tracked
        self.granularityBits = Int(entry.granularityBits)
        self.state = Locked(State(bytes: bytes, table: table))
    }

    /// Sets the bits of every granule `length` bytes at `offset` touch.
    func markDirty(_ offset: UInt64, _ length: UInt64, clusterBits: Int) {
        guard length > 0 else { return }
        let first = Int(offset >> UInt64(granularityBits))
        let last = Int((offset + length - 1) >> UInt64(granularityBits))
        state.withLock { s in
            let firstByte = first / 8, lastByte = last / 8
            var lastChanged = -1  // one set insertion per data cluster, not per byte (a whole-disk trim)
            for byte in firstByte...lastByte {
                let from = byte == firstByte ? first % 8 : 0, to = byte == lastByte ? last % 8 : 7
                let mask = UInt8(truncatingIfNeeded: (0xFF << from) & (0xFF >> (7 - to)))
                guard s.bytes[byte] & mask != mask else { continue }
                s.bytes[byte] |= mask
                if byte >> clusterBits != lastChanged {
                    lastChanged = byte >> clusterBits
                    s.changed.insert(lastChanged)
                }
            }
        }
    }

    /// Runs of granules alike from `offset`, clipped to `length` bytes and the disk's `size`.
    func extents(at offset: UInt64, length: UInt64, size: UInt64) -> [BitmapExtent] {
        let end = min(offset + length, size)
        guard offset < end else { return [] }
        let granule = UInt64(1) << UInt64(granularityBits)
        return state.withLock { s in
            var result: [BitmapExtent] = []
            var position = offset
            while position < end {
                let bit = Int(position >> UInt64(granularityBits))
                let dirty = Self.isSet(s.bytes, bit)
                var next = bit + 1
                // Whole bytes alike are skipped at once: a sparse bitmap is mostly 0x00.
                while UInt64(next) << UInt64(granularityBits) < end {
                    if next % 8 == 0, next / 8 < s.bytes.count, s.bytes[next / 8] == (dirty ? 0xFF : 0) {
                        next += 8
                    } else if Self.isSet(s.bytes, next) == dirty {
                        next += 1
                    } else {
                        break
                    }
                }
                let runEnd = min(UInt64(next) * granule, end)
                result.append(BitmapExtent(length: runEnd - position, dirty: dirty))
                position = runEnd
            }
            return result
        }
    }

    private static func isSet(_ bytes: [UInt8], _ bit: Int) -> Bool {
        bit / 8 < bytes.count && bytes[bit / 8] & (1 << UInt8(bit % 8)) != 0
    }
}

/// The image's persistent bitmaps: every one the directory lists, usable or not.
final class PersistentBitmaps: Sendable {
    let directoryOffset: UInt64
    /// Consistent bitmaps, loaded into memory.
    let usable: [PersistentBitmap]
    /// Bitmaps that can't be exported, and why.
    let unusable: [String: String]
    /// Entries this open marked in_use: the tracked ones, and the enabled ones it could not track.
    let markedInUse: [BitmapDirectoryEntry]
    /// Why a read-only open could not read the directory at all (the image is still served).
    let unreadable: String?

    /// The usable ones that writes update; kept apart so the write path filters nothing.
    let tracked: [PersistentBitmap]

    init(directoryOffset: UInt64, usable: [PersistentBitmap], unusable: [String: String],
         markedInUse: [BitmapDirectoryEntry], unreadable: String? = nil) {
        self.directoryOffset = directoryOffset
        self.usable = usable
        self.tracked = usable.filter(\.tracked)
        self.unusable = unusable
        self.markedInUse = markedInUse
        self.unreadable = unreadable
    }

    func bitmap(named name: String) -> PersistentBitmap? { usable.first { $0.entry.name == name } }

    /// Loads the bitmaps of a consistent bitmaps extension (nil when there is none, or the autoclear
    /// bit says a program without bitmap support wrote the image: then none of them is consistent).
    /// A read-write open (`metadata` given) then marks each enabled bitmap in_use, as qemu does
    /// while it has an image open, so that a crash leaves them inconsistent rather than wrong.
    static func load(file: any PositionalFile, header: QCOW2Header, size: UInt64, fileSize: UInt64,
                     metadata: MetadataMap?) throws(QCOW2Error) -> PersistentBitmaps? {
        guard header.hasBitmapsExtension, header.autoclearFeatures & 1 != 0 else { return nil }
        let clusterSize = header.clusterSize, offset = header.bitmapDirectoryOffset
        let directorySize = header.bitmapDirectorySize
        guard header.bitmapCount > 0,
              Bitmaps.directoryIsPlaced(offset: offset, size: directorySize, fileSize: fileSize,
                                        clusterSize: clusterSize) else {
            throw .invalidHeaderExtension(type: QCOW2Header.ExtensionType.bitmaps.rawValue,
                                          reason: "bitmap directory is misplaced")
        }
        let directory = try QCOW2Device.readBytes(file, at: offset, count: Int(directorySize))
        guard let entries = Bitmaps.parseDirectory(directory, count: Int(header.bitmapCount)) else {
            throw .invalidHeaderExtension(type: QCOW2Header.ExtensionType.bitmaps.rawValue,
                                          reason: "bitmap directory is malformed")
        }
        let writable = metadata != nil
        var usable: [PersistentBitmap] = [], unusable: [String: String] = [:], markInUse: [BitmapDirectoryEntry] = []
        for entry in entries {
            let enabled = entry.flags & BitmapDirectoryEntry.auto != 0
            let loaded = try loadData(entry, file: file, clusterSize: clusterSize, size: size, fileSize: fileSize)
            switch loaded {
            case .failure(let why):
                unusable[entry.name] = why.text
                if writable && enabled && entry.flags & BitmapDirectoryEntry.inUse == 0 { markInUse.append(entry) }
            case .success(let (bytes, table)):
                let bitmap = PersistentBitmap(entry: entry, tracked: writable && enabled, bytes: bytes, table: table)
                usable.append(bitmap)
                if bitmap.tracked { markInUse.append(entry) }
                if let metadata {
                    // The overlap check keeps guest data off the bitmap's clusters.
                    metadata.insert(entry.tableOffset, length: UInt64(entry.tableSize) * 8)
                    for host in table.map({ $0 & Bitmaps.tableOffsetMask }) where host != 0 {
                        metadata.insert(host, length: clusterSize)
                    }
                }
            }
        }
        for entry in markInUse {
            do throws(Errno) {
                try file.write(bytes: QCOW2Device.bigEndianBytes(entry.flags | BitmapDirectoryEntry.inUse),
                               at: offset + UInt64(entry.flagsPosition))
            } catch {
                throw .io(reason: "marking bitmaps in use: \(error)")
            }
        }
        if !markInUse.isEmpty {
            do throws(Errno) { try file.sync() } catch { throw .io(reason: "fdatasync: \(error)") }
        }
        return PersistentBitmaps(directoryOffset: offset, usable: usable, unusable: unusable,
                                 markedInUse: markInUse)
    }

    struct Unusable: Error { var text: String; init(_ text: String) { self.text = text } }

    /// A bitmap's data and table, or why it can't be used (qemu's checks at load).
    private static func loadData(_ entry: BitmapDirectoryEntry, file: any PositionalFile, clusterSize: UInt64,
                                 size: UInt64, fileSize: UInt64)
        throws(QCOW2Error) -> Result<([UInt8], [UInt64]), Unusable> {
        if entry.flags & BitmapDirectoryEntry.inUse != 0 {
            return .failure(Unusable("it is inconsistent (in use: the program that wrote it did not close the image)"))
        }
        guard entry.type == BitmapDirectoryEntry.dirtyTrackingType else {
            return .failure(Unusable("it has unknown type \(entry.type)"))
        }
        guard entry.extraDataSize == 0 || entry.flags & BitmapDirectoryEntry.extraDataCompatible != 0 else {
            return .failure(Unusable("it has extra data this program does not know"))
        }
        guard (9...31).contains(entry.granularityBits) else {
            return .failure(Unusable("its granularity 2^\(entry.granularityBits) is out of range"))
        }
        let dataBytes = Bitmaps.dataBytes(size: size, granularityBits: Int(entry.granularityBits))
        let clusters = (dataBytes + clusterSize - 1) / clusterSize
        guard UInt64(entry.tableSize) == clusters else {
            return .failure(Unusable("its table has \(entry.tableSize) entries, not the \(clusters) the disk size needs"))
        }
        guard Bitmaps.tableIsPlaced(entry, fileSize: fileSize, clusterSize: clusterSize) else {
            return .failure(Unusable("its table is misplaced"))
        }
        let table = try QCOW2Device.readTable(file, at: entry.tableOffset, entries: Int(entry.tableSize))
        var bytes = [UInt8](repeating: 0, count: Int(dataBytes))
        for (index, tableEntry) in table.enumerated() {
            let host = tableEntry & Bitmaps.tableOffsetMask
            guard tableEntry & ~(Bitmaps.tableOffsetMask | Bitmaps.allOnes) == 0, host == 0 || tableEntry & 1 == 0,
                  Bitmaps.dataClusterIsPlaced(host, fileSize: fileSize, clusterSize: clusterSize) else {
                return .failure(Unusable("its table entry \(index) is invalid"))
            }
            let start = index * Int(clusterSize), count = min(Int(clusterSize), bytes.count - start)
            if host != 0 {
                let data = try QCOW2Device.readBytes(file, at: host, count: count)
                bytes.replaceSubrange(start..<start + count, with: data)
            } else if tableEntry & Bitmaps.allOnes != 0 {
                bytes.replaceSubrange(start..<start + count, with: repeatElement(0xFF, count: count))
            }
        }
        return .success((bytes, table))
    }
}
