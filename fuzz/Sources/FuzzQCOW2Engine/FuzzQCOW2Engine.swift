// libFuzzer target 4: the whole qcow2 engine over an in-memory file. The
// input is a mode byte and then an image; the seeds are small valid images
// made by qemu-img, so mutations land in real headers, L1/L2 tables,
// refcount blocks and snapshot tables. The image is opened (read-only, or
// read-write, and then possibly with a dirty bit that makes the open repair
// the refcounts) and put through a fixed sequence of requests. Any of them
// may throw; none may crash, hang, touch memory out of bounds or allocate
// without limit (the file is capped, and fuzz.sh caps RSS and mallocs).
import BlockDevice
import FuzzSupport
import QCOW2
import SystemIO

func fuzzQCOW2Engine(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    let mode: UInt8 = input.next()
    var image = Array(input.rest())
    let writable = mode & 1 != 0
    // Bit 0 of the incompatible features at byte 79: dirty, so a read-write open repairs refcounts.
    if writable && mode & 2 != 0 && image.count > 79 { image[79] |= 1 }
    let file = MemoryFile(image, limit: 16 << 20)
    guard let device = open(file, writable: writable, snapshot: mode & 4 != 0 ? "1" : nil,
                            smallCache: mode & 8 != 0) else { return 0 }
    readEverywhere(device)
    if device.capabilities.canWrite { writeSequence(device) }
    device.close()
    // What the engine wrote must open again (or be refused) just as safely.
    if writable, let again = open(MemoryFile(file.contents), writable: false, snapshot: nil, smallCache: true) {
        readEverywhere(again)
        again.close()
    }
    return 0
}

private let imagePath = "/nonexistent-fuzz/image.qcow2"

private func open(_ file: MemoryFile, writable: Bool, snapshot: String?, smallCache: Bool) -> QCOW2Device? {
    // Only the image itself opens: a backing or data file the mutated header names is refused.
    let opener: FileOpener = { (path, _) throws(Errno) in
        guard path == imagePath else { throw Errno.permission }
        return file
    }
    let options = QCOW2Options(cacheBytes: smallCache ? 4096 : 1 << 20, snapshot: snapshot, maxBackingDepth: 1,
                               allowedDirectories: ["/nonexistent-fuzz"], opener: opener)
    return try? QCOW2Device(path: imagePath, readOnly: !writable, options: options)
}

/// Reads the start, middle and end, and maps the whole disk.
private func readEverywhere(_ device: QCOW2Device) {
    let size = device.size
    var buffer = [UInt8](repeating: 0, count: 7 * 1024)
    var offset: UInt64 = 0
    while offset < min(size, 192 * 1024) {
        read(device, at: offset, into: &buffer)
        offset += UInt64(buffer.count)
    }
    read(device, at: size / 2, into: &buffer)
    read(device, at: size - min(size, 5000), into: &buffer)
    _ = try? device.extents(at: 0, length: size)
    _ = try? device.allocationDepth(at: 0, length: size)
    _ = try? device.cache(at: 0, length: min(size, 1 << 20))
}

/// Writes, zeroes and trims of every alignment, then a flush and a read-back.
private func writeSequence(_ device: QCOW2Device) {
    let size = device.size
    write(device, at: 0, count: 4096, byte: 0x5A)
    write(device, at: 1000, count: 3000, byte: 0x33)
    write(device, at: size / 3, count: 70 * 1024, byte: 0x44)
    if let (o, n) = clamp(8192, 20 * 1024, size) {
        _ = try? device.writeZeroes(at: o, length: n, mayDeallocate: true, fast: false, fua: false)
    }
    if let (o, n) = clamp(512, 512, size) {
        _ = try? device.writeZeroes(at: o, length: n, mayDeallocate: false, fast: true, fua: true)
    }
    if let (o, n) = clamp(16 * 1024, 32 * 1024, size) { _ = try? device.trim(at: o, length: n, fua: false) }
    write(device, at: size - min(size, 1000), count: 1000, byte: 0x66)
    _ = try? device.flush()
    readEverywhere(device)
}

/// The request clipped to the disk, as the server's validation guarantees; nil if empty.
private func clamp(_ offset: UInt64, _ length: UInt64, _ size: UInt64) -> (UInt64, UInt64)? {
    guard offset < size else { return nil }
    return (offset, min(length, size - offset))
}

private func read(_ device: QCOW2Device, at offset: UInt64, into buffer: inout [UInt8]) {
    guard let (o, n) = clamp(offset, UInt64(buffer.count), device.size) else { return }
    buffer.withUnsafeMutableBytes { raw in
        _ = try? device.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<Int(n)]), at: o)
    }
}

private func write(_ device: QCOW2Device, at offset: UInt64, count: Int, byte: UInt8) {
    guard let (o, n) = clamp(offset, UInt64(count), device.size) else { return }
    let data = [UInt8](repeating: byte, count: Int(n))
    data.withUnsafeBytes { _ = try? device.write($0, at: o, fua: false) }
}
