// libFuzzer target 5: compressed clusters. The input is a shape byte (zlib
// or zstd, cluster size), a compressed-cluster descriptor as an L2 entry
// holds it, then the image bytes the descriptor points into. The engine's
// path is followed: decode the descriptor, read its sectors (zeros past the
// end of the file), decompress one cluster. Pooled stream state is reused
// across runs, so each input is decoded twice and must give the same answer.
@testable import QCOW2
import FuzzSupport

func fuzzDecompression(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    let shape: UInt8 = input.next()
    let type: QCOW2Header.CompressionType = shape & 1 == 0 ? .zlib : .zstd
    let clusterBits = 9 + UInt32(shape >> 1) % 8  // up to 64 KiB, to keep runs fast
    var h = try! QCOW2Header.parse(minimalQCOW2Header)
    h.clusterBits = clusterBits
    let g = Geometry(header: h)
    let entry = input.next(UInt64.self) | EntryBits.compressed
    let file = input.rest()

    guard case .compressed(let host, let length) = Mapping.decode(entry: entry, bitmap: 0, unit: 0, geometry: g) else {
        return 0
    }
    fuzzCheck(length > 0 && length <= 2 * Int(g.clusterSize), "descriptor of \(length) bytes")
    // As QCOW2Device.readCompressed reads it: zero-filled past the end of the file.
    let compressed = UnsafeMutableRawBufferPointer.allocate(byteCount: length, alignment: 8)
    defer { compressed.deallocate() }
    compressed.initializeMemory(as: UInt8.self, repeating: 0)
    if host < UInt64(file.count) {
        let available = min(length, file.count - Int(host))
        compressed.copyMemory(from: UnsafeRawBufferPointer(rebasing: file[Int(host)..<Int(host) + available]))
    }
    let clusterSize = Int(g.clusterSize)
    var first = [UInt8](repeating: 0xA5, count: clusterSize), second = [UInt8](repeating: 0x5A, count: clusterSize)
    let ok1 = first.withUnsafeMutableBytes { Decompression.decompress(UnsafeRawBufferPointer(compressed), into: $0, type: type) }
    let ok2 = second.withUnsafeMutableBytes { Decompression.decompress(UnsafeRawBufferPointer(compressed), into: $0, type: type) }
    fuzzCheck(ok1 == ok2, "\(type) decoded the same cluster differently on reuse: \(ok1) then \(ok2)")
    if ok1 { fuzzCheck(first == second, "\(type) output differs on reuse") }
    return 0
}
