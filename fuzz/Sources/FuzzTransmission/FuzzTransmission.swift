// libFuzzer target 2: the transmission phase's input side. The input is a
// few bytes choosing the export and session, then a stream of request
// headers, each WRITE followed by its payload, decoded and validated as
// `Connection.transmit` does. Whatever `validate` lets through must be safe
// to hand to a device; whatever it refuses must get a legal error, and the
// replies built for it must be well-formed.
import BlockDevice
import FuzzSupport
import NBDProtocol
@testable import NBDServer


func fuzzTransmission(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    let capabilities = DeviceCapabilities(fuzzBits: input.next())
    let config: UInt8 = input.next()
    // Either a size a real device might have or any 64-bit value, for the overflow checks.
    let exportSize: UInt64 = config & 16 != 0 ? input.next() : UInt64(input.next(UInt16.self)) << 9
    var session = Session()
    session.structuredReplies = config & 1 != 0
    session.flags = TransmissionFlags(capabilities: capabilities, readOnly: config & 2 != 0,
                                      structuredReplies: session.structuredReplies)
    if config & 4 != 0 { session.flags = TransmissionFlags(rawValue: input.next()) }  // any flags at all
    if session.structuredReplies { session.metaContexts = Array(MetaContext.allCases.prefix(Int(config >> 5) % 3)) }

    while input.remaining >= Request.wireSize {
        let request: Request
        do {
            var r = WireReader(input.take(Request.wireSize))
            request = try Request.decode(&r)!
        } catch {
            return 0  // bad magic: the connection closes
        }
        checkRoundTrip(request)
        if request.command == .disconnect { return 0 }
        let verdict = validate(request, size: exportSize, session: session)
        if let (error, why) = verdict {
            fuzzCheck([.invalid, .permission, .noSpace].contains(error), "\(request.command) refused with \(error)")
            fuzzCheck(!why.isEmpty, "a refusal without a reason")
            checkErrorReply(request, error, why)
        } else {
            checkAccepted(request, size: exportSize, session: session)
        }
        if request.command.hasPayload {
            // Accepted or not, the payload is on the wire and is consumed.
            guard input.take(Int(request.length)).count == Int(request.length) else { return 0 }
        }
    }
    return 0
}

/// What an accepted request promises the device code.
private func checkAccepted(_ r: Request, size: UInt64, session: Session) {
    let known: [Command] = [.read, .write, .flush, .trim, .cache, .writeZeroes, .blockStatus]
    fuzzCheck(known.contains(r.command), "accepted unknown command \(r.command)")
    fuzzCheck(!(r.command.modifiesData && session.flags.contains(.readOnly)), "accepted \(r.command) on a read-only export")
    fuzzCheck(r.flags.isSubset(of: [.fua, .noHole, .dontFragment, .requestOne, .fastZero]), "accepted flags \(r.flags)")
    if r.flags.contains(.fua) { fuzzCheck(session.flags.contains(.sendFUA), "FUA not negotiated") }
    if r.flags.contains(.dontFragment) { fuzzCheck(session.structuredReplies && r.command == .read, "DF accepted") }
    if r.flags.contains(.fastZero) { fuzzCheck(session.flags.contains(.sendFastZero), "FAST_ZERO not negotiated") }
    if r.command == .blockStatus { fuzzCheck(!session.metaContexts.isEmpty, "block status without a context") }
    if r.command == .flush { fuzzCheck(r.offset == 0 && r.length == 0, "flush with a range") ; return }
    fuzzCheck(r.length > 0, "accepted a zero-length \(r.command)")
    let (end, overflow) = r.offset.addingReportingOverflow(UInt64(r.length))
    fuzzCheck(!overflow && end <= size, "accepted \(r.offset)+\(r.length) on an export of \(size)")
    if r.command == .read || r.command == .write {
        fuzzCheck(r.length <= Limits.maxPayload, "accepted a payload of \(r.length)")
    }
}

/// A request re-encoded decodes to the same request.
private func checkRoundTrip(_ request: Request) {
    var w = WireWriter()
    request.encode(into: &w)
    fuzzCheck(w.count == Request.wireSize, "request encodes to \(w.count) bytes")
    w.bytes.withUnsafeBytes { raw in
        var r = WireReader(raw)
        fuzzCheck((try? Request.decode(&r)) == request, "request does not survive the wire")
    }
}

/// The error reply the connection sends, simple or structured, is well-formed.
private func checkErrorReply(_ request: Request, _ error: NBDError, _ why: String) {
    let chunk = encodeErrorChunk(cookie: request.cookie, error: error, message: why)
    let length = chunk[16..<20].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
    fuzzCheck(Int(length) == chunk.count - ReplyHeader.chunkSize, "error chunk length \(length) for \(chunk.count)")
    let messageLength = chunk[24..<26].reduce(Int(0)) { $0 << 8 | Int($1) }
    fuzzCheck(messageLength == chunk.count - 26 && messageLength <= Limits.maxString, "error message length")
    var simple = [UInt8](repeating: 0, count: ReplyHeader.simpleSize)
    let written = simple.withUnsafeMutableBytes { ReplyHeader.writeSimple($0, error: error, cookie: request.cookie) }
    fuzzCheck(written == ReplyHeader.simpleSize && simple[8..<16].elementsEqual(chunk[8..<16]), "simple reply cookie")
}
