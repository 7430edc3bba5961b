import BlockDevice
import NBDProtocol
@testable import NBDServer
import TestSupport
import Testing

/// NBD_OPT_STARTTLS in each TLS mode, as the spec's NOTLS, SELECTIVETLS and FORCEDTLS sections say.
@Suite struct NegotiationTLSTests {
    let export = Export(name: "disk", description: "test disk", device: MemoryDevice(size: 1 << 20), readOnly: false)

    func send(_ n: inout Negotiation, _ option: OptionCode, _ bytes: [UInt8] = []) -> Negotiation.Action {
        bytes.withUnsafeBytes { n.received(option, payload: $0) }
    }

    var goRequest: [UInt8] {
        var w = WireWriter()
        InfoRequest(exportName: "disk", requests: []).encode(into: &w)
        return w.bytes
    }

    @Test func withoutTLSStartTLSIsRefusedByPolicy() {
        var n = Negotiation(exports: [export], clientFlags: [.fixedNewstyle], tls: .off)
        #expect(send(&n, .startTLS) == .reply([.error(.startTLS, .errPolicy, "TLS is not configured")]))
    }

    @Test(arguments: [TLSMode.on, .require])
    func startTLSIsAcknowledgedOnceAndTakesNoData(mode: TLSMode) {
        var n = Negotiation(exports: [export], clientFlags: [.fixedNewstyle], tls: mode)
        guard case .reply(let withData) = send(&n, .startTLS, [1]) else {
            Issue.record("STARTTLS with data must be refused, not started")
            return
        }
        #expect(withData.map(\.type) == [.errInvalid])
        #expect(send(&n, .startTLS) == .startTLS([.ack(.startTLS)]))
        n.tlsStarted()
        guard case .reply(let again) = send(&n, .startTLS) else {
            Issue.record("a second STARTTLS must get an error")
            return
        }
        #expect(again.map(\.type) == [.errInvalid])
    }

    @Test(arguments: [OptionCode.list, .info, .go, .structuredReply, .listMetaContext, .setMetaContext,
                      OptionCode(rawValue: 4242)])
    func requireRefusesEveryOptionBeforeTLS(option: OptionCode) {
        var n = Negotiation(exports: [export], clientFlags: [.fixedNewstyle], tls: .require)
        let payload = option == .info || option == .go ? goRequest : []
        guard case .reply(let replies) = send(&n, option, payload) else {
            Issue.record("\(option) before TLS must be answered, not acted on")
            return
        }
        // One error and nothing else: no NBD_REP_SERVER or NBD_REP_INFO leaks.
        #expect(replies.map(\.type) == [.errTLSRequired])
        #expect(n.refusedWithoutTLS)
    }

    @Test func requireClosesOnExportNameAndStillHonoursAbort() {
        var n = Negotiation(exports: [export], clientFlags: [.fixedNewstyle], tls: .require)
        guard case .close(let replies, _) = send(&n, .exportName, Array("disk".utf8)) else {
            Issue.record("EXPORT_NAME can't be refused with an error, so the connection must close")
            return
        }
        #expect(replies.isEmpty)
        var m = Negotiation(exports: [export], clientFlags: [.fixedNewstyle], tls: .require)
        guard case .close(let ack, _) = send(&m, .abort) else {
            Issue.record("ABORT must be honoured before TLS")
            return
        }
        #expect(ack == [.ack(.abort)])
    }

    @Test func requireServesEverythingOnceTLSRuns() {
        var n = Negotiation(exports: [export], clientFlags: [.fixedNewstyle], tls: .require)
        #expect(send(&n, .startTLS) == .startTLS([.ack(.startTLS)]))
        n.tlsStarted()
        guard case .reply(let list) = send(&n, .list) else {
            Issue.record("LIST must work over TLS")
            return
        }
        #expect(list == [.server(name: "disk", description: "test disk"), .ack(.list)])
        guard case .transmit = send(&n, .go, goRequest) else {
            Issue.record("GO over TLS must enter transmission")
            return
        }
    }

    @Test func onModeServesPlaintextClients() {
        var n = Negotiation(exports: [export], clientFlags: [.fixedNewstyle], tls: .on)
        guard case .transmit = send(&n, .go, goRequest) else {
            Issue.record("with --tls=on a plaintext client may enter transmission")
            return
        }
    }

    /// Spec: STARTTLS drops what was negotiated before it, which a man in the middle could have chosen.
    @Test func stateFromBeforeTLSIsForgotten() {
        var n = Negotiation(exports: [export], clientFlags: [.fixedNewstyle], tls: .on)
        #expect(send(&n, .structuredReply) == .reply([.ack(.structuredReply)]))
        #expect(send(&n, .startTLS) == .startTLS([.ack(.startTLS)]))
        n.tlsStarted()
        guard case .transmit(_, let session) = send(&n, .go, goRequest) else {
            Issue.record("GO over TLS must enter transmission")
            return
        }
        #expect(!session.structuredReplies)
    }
}
