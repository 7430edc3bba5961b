// libFuzzer target 1: the option phase. The input is two bytes choosing the
// export, then what a client sends after the greeting (client flags and
// option requests), fed to `Negotiation` as `Connection` feeds it. Every
// action must be one the protocol allows, with well-formed replies.
import BlockDevice
import FuzzSupport
import NBDProtocol
@testable import NBDServer


func fuzzNegotiation(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    let capabilities = DeviceCapabilities(fuzzBits: input.next())
    let config: UInt8 = input.next()
    let export = Export(name: config & 1 != 0 ? "disk" : "", description: config & 2 != 0 ? "a fuzzed export" : "",
                        device: StubDevice(size: UInt64(config >> 4) << 20, capabilities: capabilities),
                        readOnly: config & 4 != 0, exposeAllocationDepth: config & 8 != 0,
                        dirtyBitmaps: config & 0x10 != 0 ? ["b0", "b1"] : [])

    let rawFlags: UInt32 = input.next()
    guard let clientFlags = try? ClientFlags.decode(rawFlags) else {
        fuzzCheck(rawFlags & ~3 != 0, "refused valid client flags \(rawFlags)")
        return 0
    }
    var negotiation = Negotiation(exports: [export], clientFlags: clientFlags)
    var received = 0
    while input.remaining >= OptionHeader.wireSize {
        let header: OptionHeader
        do {
            var r = WireReader(input.take(OptionHeader.wireSize))
            header = try OptionHeader.decode(&r)!
        } catch {
            return 0  // the connection closes: bad magic or an absurd length
        }
        fuzzCheck(header.length <= Limits.maxOptionLength, "accepted option length \(header.length)")
        let payload = input.take(Int(header.length))
        guard payload.count == Int(header.length) else { return 0 }  // the server would still be reading
        received += 1
        let action = negotiation.received(header.option, payload: payload)
        if received > Limits.maxOptions {
            guard case .close([], _) = action else { fatalError("option \(received) was not refused") }
            return 0
        }
        guard check(action, for: header.option, export: export, clientFlags: clientFlags,
                    extended: negotiation.session.extendedHeaders) else {
            return 0
        }
    }
    return 0
}

/// Checks one action; returns whether negotiation goes on.
private func check(_ action: Negotiation.Action, for option: OptionCode, export: Export,
                   clientFlags: ClientFlags, extended: Bool) -> Bool {
    switch action {
    case .reply(let replies):
        checkReplies(replies, for: option, export: export)
        fuzzCheck(option != .exportName && option != .abort, "\(option) did not end negotiation")
        // A failed NBD_OPT_GO leaves the client free to try again.
        if option == .go { fuzzCheck(replies.last!.type.rawValue & (1 << 31) != 0, "NBD_OPT_GO acked but not done") }
        return true
    case .transmit(let replies, let session):
        fuzzCheck(option == .go, "\(option) entered transmission")
        checkReplies(replies, for: option, export: export)
        fuzzCheck(replies.last?.type == .ack, "NBD_OPT_GO succeeded without an ack")
        checkSession(session, export: export)
        // The flags announced in NBD_INFO_EXPORT are the ones the session runs with.
        let announced = replies.first { $0.type == .info && $0.payload.prefix(2) == [0, 0] }
        fuzzCheck(announced?.payload.suffix(2) == bigEndian(session.flags.rawValue), "NBD_INFO_EXPORT flags differ")
        return false
    case .transmitAfterExportName(let bytes, let session):
        fuzzCheck(option == .exportName, "\(option) answered like NBD_OPT_EXPORT_NAME")
        fuzzCheck(bytes.count == (clientFlags.contains(.noZeroes) ? 10 : 134), "export name reply of \(bytes.count)")
        fuzzCheck(Array(bytes[0..<8]) == bigEndian(export.device.size), "export name reply has the wrong size")
        fuzzCheck(Array(bytes[8..<10]) == bigEndian(session.flags.rawValue), "export name reply has other flags")
        checkSession(session, export: export)
        return false
    case .close(let replies, let reason):
        fuzzCheck(!reason.isEmpty, "closed without a reason")
        // Only ABORT, EXPORT_NAME (which can't carry an error) and any option from a client
        // without fixed newstyle (which can't read a reply) end negotiation.
        fuzzCheck(option == .abort || option == .exportName || !clientFlags.contains(.fixedNewstyle),
                  "\(option) closed the connection")
        fuzzCheck(replies == (option == .abort && clientFlags.contains(.fixedNewstyle) ? [.ack(.abort)] : []),
                  "close sent \(replies)")
        if option == .exportName && extended { fuzzCheck(replies.isEmpty, "EXPORT_NAME after extended headers") }
        return false
    case .startTLS:
        fuzzCheck(false, "STARTTLS accepted by a server without TLS")
        return false
    }
}

/// Replies to one option: each names it, encodes and decodes back to
/// itself, and only the last one ends the reply (an ack or an error).
private func checkReplies(_ replies: [OptionReply], for option: OptionCode, export: Export) {
    fuzzCheck(!replies.isEmpty, "no reply to \(option)")
    for (index, reply) in replies.enumerated() {
        fuzzCheck(reply.option == option, "reply for \(reply.option) to \(option)")
        let isError = reply.type.rawValue & (1 << 31) != 0
        let terminal = isError || reply.type == .ack
        fuzzCheck(terminal == (index == replies.count - 1), "reply \(index) of \(replies.count) is \(reply.type)")
        if reply.type == .ack { fuzzCheck(reply.payload.isEmpty, "an ack with data") }
        if isError { fuzzCheck(reply.payload.count <= Limits.maxString, "error message of \(reply.payload.count)") }
        if reply.type == .info {
            fuzzCheck(reply.payload.count >= 2 && reply.payload.count <= 2 + Limits.maxString, "info reply size")
            if reply.payload.prefix(2) == [0, 0] {
                fuzzCheck(reply.payload.count == 12, "NBD_INFO_EXPORT of \(reply.payload.count) bytes")
                fuzzCheck(Array(reply.payload[2..<10]) == bigEndian(export.device.size), "NBD_INFO_EXPORT size")
            }
        }
        if reply.type == .metaContext {
            fuzzCheck(reply.payload.count > 4, "empty context name")
            let id = reply.payload.prefix(4).reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
            fuzzCheck((id != 0) == (option == .setMetaContext), "context id \(id) for \(option)")
        }
        var w = WireWriter()
        reply.encode(into: &w)
        w.bytes.withUnsafeBytes { raw in
            var r = WireReader(raw)
            let decoded = try? OptionReply.decode(&r)
            fuzzCheck(decoded == reply && r.readableBytes == 0, "reply does not survive the wire")
        }
    }
}

private func checkSession(_ session: Session, export: Export) {
    fuzzCheck(session.flags.contains(.hasFlags), "transmission flags without HAS_FLAGS")
    fuzzCheck(session.flags.contains(.readOnly) == export.readOnly, "read-only flag disagrees with the export")
    fuzzCheck(session.metaContexts.isEmpty || session.structuredReplies, "contexts without structured replies")
    fuzzCheck(session.flags.contains(.sendDF) == session.structuredReplies, "DF without structured replies")
    fuzzCheck(!session.extendedHeaders || session.structuredReplies, "extended headers without chunked replies")
    fuzzCheck(!session.flags.contains(.blockStatusPayload) || (session.extendedHeaders && !session.metaContexts.isEmpty),
              "block status payload offered without extended headers and contexts")
    fuzzCheck(Set(session.metaContexts.map(\.rawValue)).count == session.metaContexts.count, "a context twice")
    fuzzCheck(session.metaContexts.allSatisfy(export.metaContexts.contains), "a context the export does not offer")
}

private func bigEndian<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    withUnsafeBytes(of: value.bigEndian) { Array($0) }
}
