// libFuzzer target 2: the transmission phase's input side. The input is a
// few bytes choosing the export and session, then a stream of request
// headers (compact, or extended when the session says so), each followed by
// its payload, decoded and validated as `TransmissionReader` does. Whatever `validate` lets through must be safe
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
    session.extendedHeaders = config & 8 != 0
    session.structuredReplies = config & 1 != 0 || session.extendedHeaders
    let extended = session.extendedHeaders
    session.flags = TransmissionFlags(capabilities: capabilities, readOnly: config & 2 != 0,
                                      structuredReplies: session.structuredReplies)
    if config & 4 != 0 { session.flags = TransmissionFlags(rawValue: input.next()) }  // any flags at all
    let contexts: [MetaContext] = [.baseAllocation, .allocationDepth, .dirtyBitmap("b0", id: 3)]
    if session.structuredReplies { session.metaContexts = Array(contexts.prefix(Int(config >> 5) % 4)) }
    if extended && !session.metaContexts.isEmpty { session.flags.insert(.blockStatusPayload) }

    while input.remaining >= Request.wireSize(extended: extended) {
        let request: Request
        do {
            var r = WireReader(input.take(Request.wireSize(extended: extended)))
            request = try Request.decode(&r, extended: extended)!
        } catch {
            return 0  // bad magic: the connection closes
        }
        checkRoundTrip(request, extended: extended)
        if request.command == .disconnect { return 0 }
        let payloadLength = request.payloadLength(extended: extended)
        // Over the limit the connection closes instead of draining.
        guard payloadLength <= UInt64(Limits.maxPayload) else { return 0 }
        // Accepted or not, the payload is on the wire and is consumed.
        let payload = input.take(Int(payloadLength))
        guard payload.count == Int(payloadLength) else { return 0 }
        var effective = request
        if extended && request.command == .blockStatus && request.flags.contains(.payloadLength) {
            guard let form = try? BlockStatusPayload.decode(payload) else {
                fuzzCheck(payload.count < 12 || (payload.count - 8) % 4 != 0, "a well-formed payload refused")
                continue
            }
            fuzzCheck(form.contextIDs.count == (payload.count - 8) / 4, "payload decoded to \(form.contextIDs.count) IDs")
            effective.length = form.effectLength
            effective.flags.remove(.payloadLength)
        }
        let verdict = validate(effective, size: exportSize, session: session)
        if let (error, why) = verdict {
            fuzzCheck([.invalid, .permission, .noSpace].contains(error), "\(request.command) refused with \(error)")
            fuzzCheck(!why.isEmpty, "a refusal without a reason")
            checkErrorReply(request, error, why, extended: extended)
        } else {
            checkAccepted(effective, size: exportSize, session: session)
        }
    }
    return 0
}

/// What an accepted request promises the device code.
private func checkAccepted(_ r: Request, size: UInt64, session: Session) {
    let known: [Command] = [.read, .write, .flush, .trim, .cache, .writeZeroes, .blockStatus]
    fuzzCheck(known.contains(r.command), "accepted unknown command \(r.command)")
    fuzzCheck(!(r.command.modifiesData && session.flags.contains(.readOnly)), "accepted \(r.command) on a read-only export")
    fuzzCheck(r.flags.isSubset(of: [.fua, .noHole, .dontFragment, .requestOne, .fastZero, .payloadLength]),
              "accepted flags \(r.flags)")
    if r.flags.contains(.payloadLength) { fuzzCheck(session.extendedHeaders && r.command == .write, "PAYLOAD_LEN accepted") }
    if session.extendedHeaders && r.command == .write { fuzzCheck(r.flags.contains(.payloadLength), "WRITE without PAYLOAD_LEN") }
    if r.flags.contains(.fua) { fuzzCheck(session.flags.contains(.sendFUA), "FUA not negotiated") }
    if r.flags.contains(.dontFragment) { fuzzCheck(session.structuredReplies && r.command == .read, "DF accepted") }
    if r.flags.contains(.fastZero) { fuzzCheck(session.flags.contains(.sendFastZero), "FAST_ZERO not negotiated") }
    if r.command == .blockStatus { fuzzCheck(!session.metaContexts.isEmpty, "block status without a context") }
    if r.command == .flush { fuzzCheck(r.offset == 0 && r.length == 0, "flush with a range") ; return }
    fuzzCheck(r.length > 0, "accepted a zero-length \(r.command)")
    let (end, overflow) = r.offset.addingReportingOverflow(r.length)
    fuzzCheck(!overflow && end <= size, "accepted \(r.offset)+\(r.length) on an export of \(size)")
    if r.command == .read || r.command == .write {
        fuzzCheck(r.length <= UInt64(Limits.maxPayload), "accepted a payload of \(r.length)")
    }
}

/// A request re-encoded decodes to the same request.
private func checkRoundTrip(_ request: Request, extended: Bool) {
    var w = WireWriter()
    request.encode(into: &w, extended: extended)
    fuzzCheck(w.count == Request.wireSize(extended: extended), "request encodes to \(w.count) bytes")
    w.bytes.withUnsafeBytes { raw in
        var r = WireReader(raw)
        fuzzCheck((try? Request.decode(&r, extended: extended)) == request, "request does not survive the wire")
    }
}

/// The error reply the connection sends, simple or structured, is well-formed.
private func checkErrorReply(_ request: Request, _ error: NBDError, _ why: String, extended: Bool) {
    let framing: ChunkFraming = extended ? .extended(requestOffset: request.offset) : .structured
    let chunk = encodeErrorChunk(framing: framing, cookie: request.cookie, error: error, message: why)
    let header = framing.headerSize
    let length = chunk[(header - (extended ? 8 : 4))..<header].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
    fuzzCheck(Int(length) == chunk.count - header, "error chunk length \(length) for \(chunk.count)")
    let messageLength = chunk[(header + 4)..<(header + 6)].reduce(Int(0)) { $0 << 8 | Int($1) }
    fuzzCheck(messageLength == chunk.count - header - 6 && messageLength <= Limits.maxString, "error message length")
    var simple = [UInt8](repeating: 0, count: ReplyHeader.simpleSize)
    let written = simple.withUnsafeMutableBytes { ReplyHeader.writeSimple($0, error: error, cookie: request.cookie) }
    fuzzCheck(written == ReplyHeader.simpleSize && simple[8..<16].elementsEqual(chunk[8..<16]), "simple reply cookie")
}
