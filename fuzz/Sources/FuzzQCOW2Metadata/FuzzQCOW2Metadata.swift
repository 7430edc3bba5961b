// libFuzzer target 3: the qcow2 metadata parsers, which take bytes and do no
// I/O: the header with its extensions and backing name, the snapshot table,
// the bitmap directory and L2 tables. The first input byte picks the parser;
// each must return or throw, and what it returns must stay inside its input.
@testable import QCOW2
import FuzzSupport

func fuzzQCOW2Metadata(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    let mode: UInt8 = input.next()
    switch mode % 4 {
    case 0: header(&input)
    case 1: snapshotTable(&input)
    case 2: bitmapDirectory(&input)
    default: l2Table(&input)
    }
    return 0
}

/// [0][file size, 8 bytes][flags][header cluster...]
private func header(_ input: inout FuzzInput) {
    let fileSize: UInt64 = input.next()
    let writable = input.nextBool()
    let bytes = Array(input.rest())
    guard let h = try? QCOW2Header.parse(bytes) else { return }
    fuzzCheck((9...21).contains(h.clusterBits), "cluster bits \(h.clusterBits)")
    fuzzCheck(h.version == 2 || (h.headerLength >= 104 && UInt64(h.headerLength) <= h.clusterSize), "header length")
    if let name = h.backingFile {
        fuzzCheck(h.backingFileOffset + UInt64(h.backingFileSize) <= h.clusterSize, "backing name outside cluster 0")
        fuzzCheck(name.utf8.count <= 4 * Int(h.backingFileSize), "backing name longer than its bytes")
    }
    _ = h.featureNames(for: h.incompatibleFeatures.rawValue | h.compatibleFeatures, kind: .incompatible)
    let g = Geometry(header: h)
    fuzzCheck(g.l2Entries > 0 && g.unitBits >= 9, "geometry \(g)")
    // validate() is what stands between these numbers and the engine's allocations.
    guard (try? h.validate(fileSize: fileSize, writable: writable)) != nil else { return }
    fuzzCheck(h.size <= UInt64(Int64.max), "accepted size \(h.size)")
    fuzzCheck(UInt64(h.l1Size) <= UInt64(QCOW2Header.maximumL1Entries), "accepted \(h.l1Size) L1 entries")
    fuzzCheck(h.l1Size == 0 || UInt64(h.l1Size) * 8 <= fileSize - h.l1TableOffset, "L1 table past the end")
    fuzzCheck(h.refcountTableOffset < fileSize, "refcount table past the end")
    fuzzCheck(!(writable && h.incompatibleFeatures.contains(.corrupt)), "corrupt image accepted for writing")
}

/// [1][count][table bytes...]
private func snapshotTable(_ input: inout FuzzInput) {
    let count = Int(input.next(UInt8.self))
    let bytes = Array(input.rest())
    guard let parsed = try? QCOW2Snapshot.parseTableAndLength(bytes, count: count) else { return }
    fuzzCheck(parsed.snapshots.count == count, "\(parsed.snapshots.count) snapshots for \(count)")
    fuzzCheck(parsed.length <= bytes.count && parsed.length % 8 == 0, "table length \(parsed.length)")
    if let first = parsed.snapshots.first {
        fuzzCheck(QCOW2Snapshot.find(first.id, in: parsed.snapshots) != nil, "snapshot not found by its id")
    }
}

/// [2][count][directory bytes...]
private func bitmapDirectory(_ input: inout FuzzInput) {
    let count = Int(input.next(UInt8.self))
    let bytes = Array(input.rest())
    guard let offsets = Bitmaps.flagOffsets(in: bytes, count: count) else { return }
    fuzzCheck(offsets.count == count, "\(offsets.count) flags for \(count) bitmaps")
    // Marking a bitmap in use (and clearing it) rewrites four bytes at each offset: they must lie in the directory.
    fuzzCheck(offsets.allSatisfy { $0 >= 0 && $0 + 4 <= bytes.count }, "flag offsets \(offsets) in \(bytes.count)")
    fuzzCheck(zip(offsets, offsets.dropFirst()).allSatisfy { $0 < $1 }, "flag offsets out of order")
}

/// [3][geometry][offset, 8][limit, 4][table bytes...]: every run is within
/// the table's range and no longer than asked for.
private func l2Table(_ input: inout FuzzInput) {
    let shape: UInt8 = input.next()
    let extended = shape & 0x80 != 0
    let clusterBits = UInt32(extended ? 14 + Int(shape & 7) % 3 : 9 + Int(shape & 7))
    var h = try! QCOW2Header.parse(minimalQCOW2Header)
    h.clusterBits = clusterBits
    if extended { h.incompatibleFeatures.insert(.extendedL2) }
    if shape & 0x40 != 0 { h.incompatibleFeatures.insert(.externalDataFile) }
    let g = Geometry(header: h)
    let offset = input.next(UInt64.self) % g.bytesPerL2
    let limit = UInt64(input.next(UInt32.self)) % (4 * g.clusterSize) + 1
    // The engine only builds tables of a whole cluster; pad or cut to that.
    var bytes = Array(input.rest().prefix(Int(g.clusterSize)))
    bytes += [UInt8](repeating: 0, count: Int(g.clusterSize) - bytes.count)
    let table = bytes.withUnsafeBytes { L2Table(bytes: $0) }
    let (mapping, length) = table.run(at: offset, limit: limit, geometry: g)
    fuzzCheck(length > 0 && length <= limit && offset + length <= g.bytesPerL2, "run of \(length) at \(offset)")
    if case .compressed(let host, let compressedLength) = mapping {
        fuzzCheck(host != 0 && compressedLength > 0 && compressedLength <= 2 * Int(g.clusterSize), "descriptor")
    }
    if case .data(let host) = mapping, !g.hasDataFile { fuzzCheck(host != 0, "data at host offset 0") }
}
