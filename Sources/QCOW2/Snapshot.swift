/// One internal snapshot (spec, "Snapshots"): its L1 table and identity.
public struct QCOW2Snapshot: Sendable, Equatable {
    public var l1TableOffset: UInt64
    public var l1Size: UInt32
    public var id: String
    public var name: String
    /// The virtual disk size when the snapshot was taken, if recorded.
    public var diskSize: UInt64?

    /// qemu's cap on the snapshot table (QCOW_MAX_SNAPSHOTS_SIZE).
    static let maximumTableBytes = 64 << 20

    /// Decodes `count` snapshot table entries from `bytes`. Returns nil when
    /// `bytes` ends before the last entry does (read more and try again);
    /// throws when an entry is malformed.
    public static func parseTable(_ bytes: [UInt8], count: Int) throws(QCOW2Error) -> [QCOW2Snapshot]? {
        try parseTableAndLength(bytes, count: count)?.snapshots
    }

    /// As `parseTable`, with the table's length in bytes (padding included).
    static func parseTableAndLength(_ bytes: [UInt8], count: Int)
        throws(QCOW2Error) -> (snapshots: [QCOW2Snapshot], length: Int)? {
        var r = ByteCursor(bytes)
        var snapshots: [QCOW2Snapshot] = []
        for index in 0..<count {
            let start = r.position
            guard let l1Offset = r.read(UInt64.self), let l1Size = r.read(UInt32.self),
                  let idLength = r.read(UInt16.self), let nameLength = r.read(UInt16.self),
                  r.skip(16), let vmState32 = r.read(UInt32.self), let extraLength = r.read(UInt32.self)
            else { return nil }
            _ = vmState32
            guard extraLength <= 1024 else {
                throw .invalidSnapshotTable(reason: "entry \(index) has \(extraLength) bytes of extra data")
            }
            guard let extra = r.read(bytes: Int(extraLength)),
                  let id = r.read(bytes: Int(idLength)), let name = r.read(bytes: Int(nameLength)) else { return nil }
            let unpadded = r.position - start
            guard r.skip((8 - unpadded % 8) % 8) else { return nil }
            var diskSize: UInt64?
            if extra.count >= 16 {
                diskSize = ByteCursor.peek(UInt64.self, in: Array(extra), at: 8)
            }
            snapshots.append(QCOW2Snapshot(l1TableOffset: l1Offset, l1Size: l1Size,
                                           id: String(decoding: id, as: UTF8.self),
                                           name: String(decoding: name, as: UTF8.self), diskSize: diskSize))
        }
        return (snapshots, r.position)
    }

    /// The snapshot `key` names, trying IDs first and then names, as
    /// qemu-nbd's `-l` does (bdrv_snapshot_load_tmp_by_id_or_name).
    public static func find(_ key: String, in snapshots: [QCOW2Snapshot]) -> QCOW2Snapshot? {
        snapshots.first { $0.id == key } ?? snapshots.first { $0.name == key }
    }
}
