import CLibNBD
import Foundation
import TestSupport
import Testing

/// The server driven through libnbd: every command, pipelining and several connections.
@Suite struct LibNBDTests {
    @Test func everyCommandThroughLibnbd() throws {
        let fixture = try RawFixture(size: 4 << 20)
        let server = try ServerProcess(["-t", "--discard", "unmap", fixture.image])
        let client = try NBDClient(uri: server.uri, metaContexts: ["base:allocation"])
        #expect(client.size == Int64(fixture.size))
        #expect(client.structuredReplies)
        #expect(client.canMetaContext("base:allocation"))

        let original = try fixture.contents
        #expect(try client.pread(count: 70000, offset: 12345) == Array(original[12345..<(12345 + 70000)]))

        let pattern = (0..<10000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        try client.pwrite(pattern, offset: 5000, flags: UInt32(LIBNBD_CMD_FLAG_FUA))
        #expect(try client.pread(count: pattern.count, offset: 5000) == pattern)

        try client.zero(count: 1 << 20, offset: 2 << 20)
        #expect(try client.pread(count: 1 << 20, offset: 2 << 20) == [UInt8](repeating: 0, count: 1 << 20))
        try client.zero(count: 4096, offset: 0, flags: UInt32(LIBNBD_CMD_FLAG_NO_HOLE))
        #expect(try client.pread(count: 4096, offset: 0) == [UInt8](repeating: 0, count: 4096))

        try client.trim(count: 65536, offset: 1 << 20)
        try client.cache(count: 1 << 20, offset: 0)
        try client.flush()

        // Zeroing a whole MiB without NO_HOLE punches a hole there.
        let extents = try client.blockStatus(count: 1 << 20, offset: 2 << 20)
        #expect(extents.first?.flags == 3)
        let one = try client.blockStatus(count: 4 << 20, offset: 0, flags: UInt32(LIBNBD_CMD_FLAG_REQ_ONE))
        #expect(one.count == 1)
        client.shutdown()
        #expect(server.stop() == 0)

        var expected = original
        expected.replaceSubrange(5000..<15000, with: pattern)
        expected.replaceSubrange((2 << 20)..<(3 << 20), with: Data(count: 1 << 20))
        expected.replaceSubrange(0..<4096, with: Data(count: 4096))
        var got = try fixture.contents
        // Trimmed bytes are unspecified.
        got.replaceSubrange((1 << 20)..<((1 << 20) + 65536), with: Data(count: 65536))
        expected.replaceSubrange((1 << 20)..<((1 << 20) + 65536), with: Data(count: 65536))
        #expect(got == expected)
    }

    @Test func sixtyFourPipelinedReadsAllComplete() throws {
        let fixture = try RawFixture(size: 16 << 20)
        let server = try ServerProcess(["-t", fixture.image])
        let client = try NBDClient(uri: server.uri)
        var generator = SystemRandomNumberGenerator()
        let ranges = (0..<64).map { _ -> (offset: UInt64, count: Int) in
            let count = Int.random(in: 1...(512 << 10), using: &generator)
            return (UInt64(Int.random(in: 0...(fixture.size - count), using: &generator)), count)
        }
        let results = try client.pipelinedReads(ranges)
        let original = try fixture.contents
        for (range, data) in zip(ranges, results) {
            #expect(data == Array(original[Int(range.offset)..<(Int(range.offset) + range.count)]))
        }
    }

    @Test func eightConcurrentConnections() throws {
        let fixture = try RawFixture(size: 8 << 20)
        let server = try ServerProcess(["-t", "-e", "8", fixture.image])
        let original = try fixture.contents
        let failures = Failures()
        DispatchQueue.concurrentPerform(iterations: 8) { index in
            do {
                let client = try NBDClient(uri: server.uri)
                #expect(client.canMultiConn)
                let base = UInt64(index) << 20
                let mine = [UInt8](repeating: UInt8(index + 1), count: 256 << 10)
                for round in 0..<8 {
                    let offset = base + UInt64(round) * (128 << 10)
                    let read = try client.pread(count: 128 << 10, offset: offset)
                    if read != Array(original[Int(offset)..<(Int(offset) + (128 << 10))]) {
                        failures.add("connection \(index) read wrong bytes at \(offset)")
                    }
                }
                try client.pwrite(mine, offset: base + (512 << 10))
                if try client.pread(count: mine.count, offset: base + (512 << 10)) != mine {
                    failures.add("connection \(index) did not read back its write")
                }
                client.shutdown()
            } catch {
                failures.add("connection \(index): \(error)")
            }
        }
        #expect(failures.messages.isEmpty, "\(failures.messages)")
    }
}

final class Failures: @unchecked Sendable {
    private let lock = NSLock()
    private var list: [String] = []
    func add(_ message: String) { lock.withLock { list.append(message) } }
    var messages: [String] { lock.withLock { list } }
}
