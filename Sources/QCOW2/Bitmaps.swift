import SystemIO

/// Persistent dirty bitmaps (spec, "Bitmaps"). This engine does not track
/// writes in them; a read-write open marks each one in_use so that qemu
/// treats it as inconsistent instead of trusting stale contents.
enum Bitmaps {
    static let inUse: UInt32 = 1 << 0

    /// Offsets (within `directory`) of each entry's flags field, or nil if
    /// the directory is malformed. Pure, for fuzzing.
    static func flagOffsets(in directory: [UInt8], count: Int) -> [Int]? {
        var r = ByteCursor(directory)
        var offsets: [Int] = []
        for _ in 0..<count {
            let start = r.position
            guard r.skip(12), r.read(UInt32.self) != nil, r.skip(2), let nameSize = r.read(UInt16.self),
                  let extraSize = r.read(UInt32.self), r.skip(Int(extraSize)), r.skip(Int(nameSize))
            else { return nil }
            let unpadded = r.position - start
            guard r.skip(min(r.remaining, (8 - unpadded % 8) % 8)) else { return nil }
            offsets.append(start + 12)
        }
        return offsets
    }

    static func markInUse(file: any PositionalFile, header: QCOW2Header, fileSize: UInt64) throws(QCOW2Error) {
        let size = header.bitmapDirectorySize, offset = header.bitmapDirectoryOffset
        guard header.bitmapCount > 0, size <= 64 << 20, offset <= fileSize, size <= fileSize - offset,
              offset & (header.clusterSize - 1) == 0 else {
            throw .invalidHeaderExtension(type: QCOW2Header.ExtensionType.bitmaps.rawValue,
                                          reason: "bitmap directory is misplaced")
        }
        let directory = try QCOW2Device.readBytes(file, at: offset, count: Int(size))
        guard let flags = flagOffsets(in: directory, count: Int(header.bitmapCount)) else {
            throw .invalidHeaderExtension(type: QCOW2Header.ExtensionType.bitmaps.rawValue,
                                          reason: "bitmap directory is malformed")
        }
        for at in flags {
            let current = ByteCursor.peek(UInt32.self, in: directory, at: at)!
            guard current & inUse == 0 else { continue }
            do throws(Errno) {
                try file.write(bytes: QCOW2Device.bigEndianBytes(current | inUse), at: offset + UInt64(at))
            } catch {
                throw .io(reason: "marking bitmaps in use: \(error)")
            }
        }
        do throws(Errno) { try file.sync() } catch { throw .io(reason: "fdatasync: \(error)") }
    }
}
