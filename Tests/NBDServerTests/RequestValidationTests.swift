import NBDProtocol
@testable import NBDServer
import Testing

/// Every request is checked against the session before it reaches the device.
@Suite struct RequestValidationTests {
    static let size: UInt64 = 1 << 20
    static let writable = Session(structuredReplies: true, metaContexts: [.baseAllocation],
                                  flags: [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .sendDF, .sendCache])
    static let readOnly = Session(structuredReplies: false, metaContexts: [],
                                  flags: [.hasFlags, .readOnly, .sendFlush, .sendCache])

    struct Case: Sendable, CustomStringConvertible {
        var name: String
        var request: Request
        var session: Session
        var expected: NBDError?
        var description: String { name }
    }

    static let cases: [Case] = [
        Case(name: "read inside", request: .init(command: .read, cookie: 1, offset: 0, length: 4096), session: writable, expected: nil),
        Case(name: "read to the end", request: .init(command: .read, cookie: 1, offset: size - 1, length: 1), session: writable, expected: nil),
        Case(name: "read past the end", request: .init(command: .read, cookie: 1, offset: size - 1, length: 2), session: writable, expected: .invalid),
        Case(name: "read offset overflow", request: .init(command: .read, cookie: 1, offset: .max, length: 2), session: writable, expected: .invalid),
        Case(name: "read over max payload", request: .init(command: .read, cookie: 1, offset: 0, length: UInt64(Limits.maxPayload) + 1), session: writable, expected: .invalid),
        Case(name: "read zero length", request: .init(command: .read, cookie: 1, offset: 0, length: 0), session: writable, expected: .invalid),
        Case(name: "read with DF", request: .init(flags: .dontFragment, command: .read, cookie: 1, offset: 0, length: 1), session: writable, expected: nil),
        Case(name: "read with DF, simple replies", request: .init(flags: .dontFragment, command: .read, cookie: 1, offset: 0, length: 1), session: readOnly, expected: .invalid),
        Case(name: "read with FUA", request: .init(flags: .fua, command: .read, cookie: 1, offset: 0, length: 1), session: writable, expected: .invalid),
        Case(name: "write past the end", request: .init(command: .write, cookie: 1, offset: size, length: 1), session: writable, expected: .noSpace),
        Case(name: "write zeroes past the end", request: .init(command: .writeZeroes, cookie: 1, offset: size, length: 1), session: writable, expected: .noSpace),
        Case(name: "trim past the end", request: .init(command: .trim, cookie: 1, offset: size, length: 1), session: writable, expected: .invalid),
        Case(name: "write FUA", request: .init(flags: .fua, command: .write, cookie: 1, offset: 0, length: 1), session: writable, expected: nil),
        Case(name: "write read-only", request: .init(command: .write, cookie: 1, offset: 0, length: 1), session: readOnly, expected: .permission),
        Case(name: "trim read-only", request: .init(command: .trim, cookie: 1, offset: 0, length: 1), session: readOnly, expected: .permission),
        Case(name: "zero read-only", request: .init(command: .writeZeroes, cookie: 1, offset: 0, length: 1), session: readOnly, expected: .permission),
        Case(name: "fast zero not advertised", request: .init(flags: .fastZero, command: .writeZeroes, cookie: 1, offset: 0, length: 1), session: writable, expected: .invalid),
        Case(name: "zero no-hole", request: .init(flags: [.noHole, .fua], command: .writeZeroes, cookie: 1, offset: 0, length: 1), session: writable, expected: nil),
        Case(name: "flush", request: .init(command: .flush, cookie: 1, offset: 0, length: 0), session: writable, expected: nil),
        Case(name: "flush with length", request: .init(command: .flush, cookie: 1, offset: 0, length: 1), session: writable, expected: .invalid),
        Case(name: "block status", request: .init(flags: .requestOne, command: .blockStatus, cookie: 1, offset: 0, length: 1), session: writable, expected: nil),
        Case(name: "block status without context", request: .init(command: .blockStatus, cookie: 1, offset: 0, length: 1), session: readOnly, expected: .invalid),
        Case(name: "cache", request: .init(command: .cache, cookie: 1, offset: 0, length: 512), session: readOnly, expected: nil),
        Case(name: "resize", request: .init(command: .resize, cookie: 1, offset: 0, length: 0), session: writable, expected: .invalid),
        Case(name: "unknown command", request: .init(command: Command(rawValue: 99), cookie: 1, offset: 0, length: 1), session: writable, expected: .invalid),
        Case(name: "payload-length flag", request: .init(flags: .payloadLength, command: .write, cookie: 1, offset: 0, length: 1), session: writable, expected: .invalid),
    ]

    @Test(arguments: cases)
    func validation(_ c: Case) {
        #expect(validate(c.request, size: Self.size, session: c.session)?.0 == c.expected)
    }
}
