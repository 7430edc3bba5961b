import BlockDevice
import NBDProtocol
@testable import NBDServer
import TestSupport
import Testing

/// The option state machine answers each option as the spec says, without sockets.
@Suite struct NegotiationTests {
    let export = Export(name: "disk", description: "test disk", device: MemoryDevice(size: 1 << 20), readOnly: false)

    func payload(_ encode: (inout WireWriter) -> Void) -> [UInt8] {
        var w = WireWriter()
        encode(&w)
        return w.bytes
    }

    func send(_ n: inout Negotiation, _ option: OptionCode, _ bytes: [UInt8] = []) -> Negotiation.Action {
        bytes.withUnsafeBytes { n.received(option, payload: $0) }
    }

    @Test func plainNewstyleClientsMayOnlyAskForAnExportByName() {
        var n = Negotiation(exports: [export], clientFlags: [])
        let request = payload { InfoRequest(exportName: "disk", requests: []).encode(into: &$0) }
        guard case .close(let replies, _) = send(&n, .go, request) else {
            Issue.record("a client without fixed newstyle can't be sent option replies")
            return
        }
        #expect(replies.isEmpty)
        var plain = Negotiation(exports: [export], clientFlags: [])
        guard case .transmitAfterExportName(let bytes, _) = send(&plain, .exportName, Array("disk".utf8)) else {
            Issue.record("NBD_OPT_EXPORT_NAME must work without fixed newstyle")
            return
        }
        #expect(bytes.count == 8 + 2 + 124, "without NBD_FLAG_C_NO_ZEROES the 124 zero bytes follow")
    }

    @Test func goWithTheRightNameEntersTransmission() throws {
        var n = Negotiation(exports: [export], clientFlags: [.fixedNewstyle, .noZeroes])
        let request = payload { InfoRequest(exportName: "disk", requests: [.name, .blockSize]).encode(into: &$0) }
        guard case .transmit(let replies, let session) = send(&n, .go, request) else {
            Issue.record("GO did not start transmission")
            return
        }
        #expect(replies.first?.type == .info)
        #expect(replies.last == .ack(.go))
        #expect(replies.contains(.infoName(.go, "disk")))
        #expect(replies.contains(.infoBlockSize(.go, minimum: 1, preferred: 4096, maximum: Limits.maxPayload)))
        #expect(session.flags.contains(.sendTrim) && !session.flags.contains(.readOnly))
        #expect(!session.flags.contains(.sendDF), "DF needs structured replies")
    }

    @Test func emptyNameMeansTheDefaultExport() {
        var n = Negotiation(exports: [export], clientFlags: [.fixedNewstyle])
        let request = payload { InfoRequest(exportName: "", requests: []).encode(into: &$0) }
        guard case .reply(let replies) = send(&n, .info, request) else {
            Issue.record("INFO must not end negotiation")
            return
        }
        #expect(replies == [.infoExport(.info, size: 1 << 20, flags: [.hasFlags, .sendFlush, .sendFUA, .sendCache,
                                                                        .sendTrim, .sendWriteZeroes, .canMultiConn]),
                            .ack(.info)])
    }

    @Test func wrongNameGetsErrUnknownAndNegotiationGoesOn() {
        var n = Negotiation(exports: [export], clientFlags: [.fixedNewstyle])
        let request = payload { InfoRequest(exportName: "nope", requests: []).encode(into: &$0) }
        guard case .reply(let replies) = send(&n, .go, request) else {
            Issue.record("a wrong name must get an error reply")
            return
        }
        #expect(replies.map(\.type) == [.errUnknown])
    }

    @Test func exportNameWithWrongNameCloses() {
        var n = Negotiation(exports: [export], clientFlags: [.fixedNewstyle])
        guard case .close(let replies, _) = send(&n, .exportName, Array("nope".utf8)) else {
            Issue.record("NBD_OPT_EXPORT_NAME with a wrong name must disconnect")
            return
        }
        #expect(replies.isEmpty)
    }

    @Test(arguments: [true, false])
    func exportNameAnswersSizeAndFlags(noZeroes: Bool) {
        var n = Negotiation(exports: [export], clientFlags: noZeroes ? [.fixedNewstyle, .noZeroes] : [.fixedNewstyle])
        guard case .transmitAfterExportName(let bytes, _) = send(&n, .exportName, Array("disk".utf8)) else {
            Issue.record("EXPORT_NAME must start transmission")
            return
        }
        #expect(bytes.count == (noZeroes ? 10 : 134))
    }

    @Test func unknownOptionIsUnsupportedAndNegotiationContinues() {
        var n = Negotiation(exports: [export], clientFlags: [.fixedNewstyle])
        guard case .reply(let replies) = send(&n, OptionCode(rawValue: 4242), [1, 2, 3]) else {
            Issue.record("unknown option must get a reply")
            return
        }
        #expect(replies.map(\.type) == [.errUnsupported])
        guard case .reply(let list) = send(&n, .list) else {
            Issue.record("LIST after an unknown option must still work")
            return
        }
        #expect(list == [.server(name: "disk", description: "test disk"), .ack(.list)])
    }

    @Test func abortAcksThenCloses() {
        var n = Negotiation(exports: [export], clientFlags: [.fixedNewstyle])
        guard case .close(let replies, _) = send(&n, .abort) else {
            Issue.record("ABORT must close")
            return
        }
        #expect(replies == [.ack(.abort)])
    }

    @Test func setMetaContextNeedsStructuredReplies() {
        var n = Negotiation(exports: [export], clientFlags: [.fixedNewstyle])
        let query = payload { MetaContextRequest(exportName: "disk", queries: ["base:allocation"]).encode(into: &$0) }
        guard case .reply(let refused) = send(&n, .setMetaContext, query) else { return }
        #expect(refused.map(\.type) == [.errInvalid])
        _ = send(&n, .structuredReply)
        guard case .reply(let accepted) = send(&n, .setMetaContext, query) else { return }
        #expect(accepted == [.metaContext(.setMetaContext, id: 1, name: "base:allocation"), .ack(.setMetaContext)])
        let go = payload { InfoRequest(exportName: "disk", requests: []).encode(into: &$0) }
        guard case .transmit(_, let session) = send(&n, .go, go) else { return }
        #expect(session.metaContexts == [.baseAllocation])
        #expect(session.structuredReplies && session.flags.contains(.sendDF))
    }

    @Test func metaContextsChosenForAnotherNameDoNotCarryOver() {
        var n = Negotiation(exports: [export], clientFlags: [.fixedNewstyle])
        _ = send(&n, .structuredReply)
        let query = payload { MetaContextRequest(exportName: "disk", queries: ["base:allocation"]).encode(into: &$0) }
        _ = send(&n, .setMetaContext, query)
        let go = payload { InfoRequest(exportName: "", requests: []).encode(into: &$0) }
        guard case .transmit(_, let session) = send(&n, .go, go) else { return }
        #expect(session.metaContexts.isEmpty)
    }

    @Test func listMetaContextWithoutQueriesListsEverything() {
        let withDepth = Export(name: "", device: MemoryDevice(size: 4096), readOnly: true, exposeAllocationDepth: true)
        var n = Negotiation(exports: [withDepth], clientFlags: [.fixedNewstyle])
        let all = payload { MetaContextRequest(exportName: "", queries: []).encode(into: &$0) }
        guard case .reply(let replies) = send(&n, .listMetaContext, all) else { return }
        #expect(replies.compactMap { $0.type == .metaContext ? String(decoding: $0.payload.dropFirst(4), as: UTF8.self) : nil }
            == ["base:allocation", "qemu:allocation-depth"])
        let qemuOnly = payload { MetaContextRequest(exportName: "", queries: ["qemu:", "other:thing"]).encode(into: &$0) }
        guard case .reply(let some) = send(&n, .listMetaContext, qemuOnly) else { return }
        #expect(some.count == 2 && some[0].type == .metaContext)
    }

    @Test func severalExportsAreListedAndChosenByName() {
        let second = Export(name: "backup", description: "the backup disk", device: MemoryDevice(size: 8192),
                            readOnly: true, exposeAllocationDepth: true)
        var n = Negotiation(exports: [export, second], clientFlags: [.fixedNewstyle])
        guard case .reply(let listed) = send(&n, .list) else { return }
        #expect(listed == [.server(name: "disk", description: "test disk"),
                           .server(name: "backup", description: "the backup disk"), .ack(.list)])
        // Contexts follow the export they were chosen for.
        _ = send(&n, .structuredReply)
        let depth = payload { MetaContextRequest(exportName: "backup", queries: ["qemu:allocation-depth"]).encode(into: &$0) }
        guard case .reply(let chosen) = send(&n, .setMetaContext, depth) else { return }
        #expect(chosen.first?.type == .metaContext)
        let onFirst = payload { MetaContextRequest(exportName: "disk", queries: ["qemu:allocation-depth"]).encode(into: &$0) }
        guard case .reply(let none) = send(&n, .listMetaContext, onFirst) else { return }
        #expect(none == [.ack(.listMetaContext)], "the first export does not offer allocation depth")
        let go = payload { InfoRequest(exportName: "backup", requests: []).encode(into: &$0) }
        guard case .transmit(let replies, let session) = send(&n, .go, go) else {
            Issue.record("GO by name must pick the second export")
            return
        }
        #expect(session.exportIndex == 1 && session.flags.contains(.readOnly))
        #expect(replies.first == .infoExport(.go, size: 8192, flags: session.flags))
        var byDefault = Negotiation(exports: [export, second], clientFlags: [.fixedNewstyle])
        let empty = payload { InfoRequest(exportName: "", requests: []).encode(into: &$0) }
        guard case .transmit(_, let first) = send(&byDefault, .go, empty) else { return }
        #expect(first.exportIndex == 0, "the empty name is the first export")
    }

    @Test func tooManyOptionsCloses() {
        var n = Negotiation(exports: [export], clientFlags: [.fixedNewstyle])
        var last: Negotiation.Action = .reply([])
        for _ in 0...Limits.maxOptions { last = send(&n, .list) }
        guard case .close = last else {
            Issue.record("option flood must be cut off")
            return
        }
    }

    @Test func readOnlyExportFlags() {
        let flags = TransmissionFlags(capabilities: DeviceCapabilities(canWrite: false, canTrim: true), readOnly: true,
                                      multiConn: false, structuredReplies: false)
        #expect(flags.contains(.readOnly))
        #expect(!flags.contains(.sendTrim) && !flags.contains(.sendWriteZeroes) && !flags.contains(.sendFUA))
        #expect(!flags.contains(.canMultiConn))
    }
}
