import BlockDevice
import Foundation
import NBDProtocol
@testable import NBDServer
import SystemIO
import TestSupport
import Testing

/// Reads of a cached raw file: large ones leave by sendfile(2) after their
/// header (here forced on, since these clients are on this machine), small ones
/// are answered on the reader thread; both must carry the file's bytes exactly,
/// and all-zero data must still become hole chunks.
@Suite struct FileRangeReplyTests {
    static let size = 4 << 20

    /// A 4 MiB raw file (so in the page cache): random bytes, except 128 KiB of
    /// zeros at 2 MiB and a run starting with 64 zero bytes at 3 MiB.
    final class CachedImage {
        let scratch: TemporaryDirectory
        let bytes: [UInt8]
        let device: RawFileDevice

        init() throws {
            scratch = try TemporaryDirectory()
            var generator = SystemRandomNumberGenerator()
            var bytes = (0..<FileRangeReplyTests.size).map { _ in UInt8.random(in: 1...255, using: &generator) }
            bytes.replaceSubrange(2 << 20..<(2 << 20) + (128 << 10), with: repeatElement(0, count: 128 << 10))
            bytes.replaceSubrange(3 << 20..<(3 << 20) + 64, with: repeatElement(0, count: 64))
            self.bytes = bytes
            let path = scratch.file("cached.raw")
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            device = try RawFileDevice(path: path, readOnly: true)
        }
    }

    func payloadOfDataChunk(_ chunk: RawClient.Chunk, at offset: Int) -> [UInt8] {
        #expect(chunk.type == .offsetData, "got chunk type \(chunk.type.rawValue)")
        #expect(chunk.payload.prefix(8).reduce(0) { $0 << 8 | Int($1) } == offset)
        return Array(chunk.payload.dropFirst(8))
    }

    @Test(arguments: [4096, 64 << 10, 1 << 20])
    func structuredReadsCarryTheFileBytes(length: Int) throws {
        let image = try CachedImage()
        let harness = ServerHarness(image.device) { $0.sendfileToLocalPeers = true }
        defer { harness.stop() }
        let client = try harness.client(structured: true)
        for (cookie, offset) in [0, 12_345 & ~511, 3 << 20].enumerated() {
            try client.sendRequest(Request(command: .read, cookie: UInt64(cookie), offset: UInt64(offset),
                                           length: UInt64(length)))
            let chunk = try #require(try client.receiveChunk())
            #expect(chunk.cookie == UInt64(cookie) && chunk.flags & 1 == 1, "one final chunk")
            #expect(payloadOfDataChunk(chunk, at: offset) == Array(image.bytes[offset..<offset + length]))
        }
    }

    @Test func allZeroDataStillBecomesAHoleChunk() throws {
        let image = try CachedImage()
        let harness = ServerHarness(image.device) { $0.sendfileToLocalPeers = true }
        defer { harness.stop() }
        let client = try harness.client(structured: true)
        try client.sendRequest(Request(command: .read, cookie: 9, offset: 2 << 20, length: 128 << 10))
        let chunk = try #require(try client.receiveChunk())
        #expect(chunk.type == .offsetHole && chunk.cookie == 9)
        #expect(chunk.payload.suffix(4).reduce(0) { $0 << 8 | Int($1) } == 128 << 10, "hole length")
    }

    @Test func simpleRepliesCarryTheFileBytes() throws {
        let image = try CachedImage()
        let harness = ServerHarness(image.device) { $0.sendfileToLocalPeers = true }
        defer { harness.stop() }
        let client = try harness.client()
        // Pipelined, so replies queue behind one another on the writer.
        let offsets = [0, 1 << 20, 2 << 20, 3 << 20 - 4096]
        for (cookie, offset) in offsets.enumerated() {
            try client.sendRequest(Request(command: .read, cookie: UInt64(cookie), offset: UInt64(offset),
                                           length: 1 << 20))
        }
        var seen = Set<UInt64>()
        for _ in offsets {
            let reply = try #require(try client.receiveSimpleReply())
            #expect(reply.error == .ok)
            let offset = offsets[Int(reply.cookie)]
            #expect(try client.receive(1 << 20) == Array(image.bytes[offset..<offset + (1 << 20)]))
            seen.insert(reply.cookie)
        }
        #expect(seen.count == offsets.count)
    }

    /// Serves `served`'s bytes, but names `decoy`'s file as where they lie, so a client
    /// sees which of the two paths a read took.
    final class DecoyRangeDevice: BlockDevice {
        let served: RawFileDevice, decoy: RawFileDevice
        init(served: RawFileDevice, decoy: RawFileDevice) { (self.served, self.decoy) = (served, decoy) }
        var size: UInt64 { served.size }
        var capabilities: DeviceCapabilities { served.capabilities }
        func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DeviceError) {
            try served.read(into: buffer, at: offset)
        }
        func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
            served.readIfCached(into: buffer, at: offset)
        }
        func fileRange(at offset: UInt64, length: UInt64) -> FileRange? { decoy.fileRange(at: offset, length: length) }
        func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws(DeviceError) {}
        func flush() throws(DeviceError) {}
        func trim(at offset: UInt64, length: UInt64, fua: Bool) throws(DeviceError) {}
        func writeZeroes(at offset: UInt64, length: UInt64, mayDeallocate: Bool, fast: Bool,
                         fua: Bool) throws(DeviceError) {}
        func extents(at offset: UInt64, length: UInt64) throws(DeviceError) -> [Extent] { [] }
        func close() {}
    }

    /// A socket pair is a peer on this machine: sendfile only when configured so.
    @Test(arguments: [false, true])
    func localPeersGetSendfileOnlyWhenConfigured(_ sendfileToLocalPeers: Bool) throws {
        let served = try CachedImage(), decoy = try CachedImage()
        let harness = ServerHarness(DecoyRangeDevice(served: served.device, decoy: decoy.device)) {
            $0.sendfileToLocalPeers = sendfileToLocalPeers
        }
        defer { harness.stop() }
        let client = try harness.client()
        try client.sendRequest(Request(command: .read, cookie: 1, offset: 0, length: 1 << 20))
        #expect(try #require(try client.receiveSimpleReply()).error == .ok)
        let expected = sendfileToLocalPeers ? decoy.bytes : served.bytes
        #expect(try client.receive(1 << 20) == Array(expected[0..<(1 << 20)]))
    }
}

/// What decides whether a client is on this machine (and so gets copies, not sendfile).
@Suite struct PeerLocalityTests {
    @Test(arguments: [("127.0.0.1", true), ("127.255.0.3", true), ("::1", true), ("::ffff:127.0.0.1", true),
                      ("10.0.0.1", false), ("128.0.0.1", false), ("::2", false), ("::ffff:10.0.0.1", false)])
    func loopbackAddresses(_ text: String, _ loopback: Bool) throws {
        #expect(try #require(IPAddress(text)).isLoopback == loopback)
    }

    @Test func socketPairsAndLoopbackTCPAreThisMachine() throws {
        let (a, b) = try Socket.pair()
        defer { a.close(); b.close() }
        #expect(a.peerIsThisMachine && b.peerIsThisMachine)

        let listener = try LoopbackTCP.listen()
        defer { listener.close() }
        // From another loopback address, so the two ends' addresses differ.
        let client = try LoopbackTCP.connect(port: Int(listener.port), from: "127.0.0.2")
        defer { client.close() }
        listener.socket.setNonBlocking(false)
        let (server, _, _) = try #require(try listener.socket.accept())
        defer { server.close() }
        #expect(server.peerIsThisMachine && client.peerIsThisMachine)
    }
}
