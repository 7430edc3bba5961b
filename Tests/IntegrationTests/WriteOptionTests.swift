import CLibNBD
import Foundation
import TestSupport
import Testing

/// -s, --discard and --detect-zeroes behave as in qemu-nbd.
@Suite struct WriteOptionTests {
    @Test(arguments: ["raw", "qcow2"])
    func snapshotModeNeverTouchesTheImage(format: String) throws {
        let scratch = try TemporaryDirectory()
        let image = scratch.file("disk.\(format)")
        try ImageFactory.create(image, format: format, size: "4M")
        try ImageFactory.io(image, format: format, ["write -P 0x21 0 2M"])
        let before = try Data(contentsOf: URL(fileURLWithPath: image))
        let server = try ServerProcess(["-t", "-s", image])
        let client = try NBDClient(uri: server.uri)
        #expect(!client.isReadOnly)
        let data = [UInt8](repeating: 0x7e, count: 100_000)
        try client.pwrite(data, offset: 1_000_000)               // straddles 64 KiB blocks, over data and hole
        try client.zero(count: 70_000, offset: 3 << 20)
        try client.flush()
        #expect(try client.pread(count: data.count, offset: 1_000_000) == data)
        #expect(try client.pread(count: 4, offset: 999_996) == [0x21, 0x21, 0x21, 0x21])
        #expect(try client.pread(count: 70_000, offset: 3 << 20) == [UInt8](repeating: 0, count: 70_000))
        client.shutdown()
        #expect(server.stop() == 0)
        #expect(try Data(contentsOf: URL(fileURLWithPath: image)) == before)
    }

    /// Allocated bytes of a file, from stat.
    func allocatedBytes(_ path: String) -> Int {
        var st = stat()
        stat(path, &st)
        return Int(st.st_blocks) * 512
    }

    @Test func discardIgnoreKeepsDataAndUnmapFreesIt() throws {
        let fixture = try RawFixture(size: 4 << 20)
        let full = allocatedBytes(fixture.image)
        do {
            let server = try ServerProcess(["-t", fixture.image])
            let client = try NBDClient(uri: server.uri)
            try client.trim(count: 1 << 20, offset: 0)
            client.shutdown()
            #expect(server.stop() == 0)
        }
        #expect(allocatedBytes(fixture.image) == full, "--discard=ignore is the default")
        let server = try ServerProcess(["-t", "--discard", "unmap", fixture.image])
        let client = try NBDClient(uri: server.uri)
        try client.trim(count: 1 << 20, offset: 0)
        client.shutdown()
        #expect(server.stop() == 0)
        #expect(allocatedBytes(fixture.image) <= full - (1 << 20))
    }

    @Test func detectZeroesUnmapTurnsZeroWritesIntoHoles() throws {
        let fixture = try RawFixture(size: 4 << 20)
        let full = allocatedBytes(fixture.image)
        let server = try ServerProcess(["-t", "--discard", "unmap", "--detect-zeroes", "unmap", fixture.image])
        let client = try NBDClient(uri: server.uri, metaContexts: ["base:allocation"])
        try client.pwrite([UInt8](repeating: 0, count: 1 << 20), offset: 2 << 20)
        #expect(try client.blockStatus(count: 1 << 20, offset: 2 << 20).first?.flags == 3)
        #expect(try client.pread(count: 1 << 20, offset: 2 << 20) == [UInt8](repeating: 0, count: 1 << 20))
        client.shutdown()
        #expect(server.stop() == 0)
        #expect(allocatedBytes(fixture.image) <= full - (1 << 20))
    }
}
