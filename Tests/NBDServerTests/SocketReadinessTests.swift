import SystemIO
import Testing

/// The non-blocking read a connection's reader polls with before it sleeps.
@Suite struct SocketReadinessTests {
    @Test func readSomeIfReadyIsNilUntilBytesArriveThenZeroAtClose() throws {
        let (a, b) = try Socket.pair()
        defer { a.close() }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16, alignment: 1)
        defer { buffer.deallocate() }
        #expect(try a.readSomeIfReady(into: buffer) == nil, "nothing sent yet")
        let sent: [UInt8] = [1, 2, 3]
        try sent.withUnsafeBytes { try b.writeAll([$0]) }
        #expect(try a.readSomeIfReady(into: buffer) == 3)
        #expect(Array(buffer.prefix(3)) == [1, 2, 3])
        #expect(try a.readSomeIfReady(into: buffer) == nil, "all taken")
        b.close()
        #expect(try a.readSomeIfReady(into: buffer) == 0, "the peer closed")
    }
}
