import NBDServer
import SwiftNBDKit
import Testing
import TLS

/// The TLS and access options in both spellings, and the combinations refused at parse time.
@Suite struct AccessPlanTests {
    func plan(_ configure: (inout AccessOptions) -> Void) throws(UsageError) -> AccessPlan {
        var options = AccessOptions()
        configure(&options)
        return try SwiftNBDKit.plan(options)
    }

    @Test func qemuObjectsSplitOnSingleCommasOnly() throws {
        let object = try QemuObject(parsing: "authz-simple,id=auth0,identity=CN=laptop,,O=Example Org,,C=GB")
        #expect(object.type == "authz-simple")
        #expect(object.properties == ["id": "auth0", "identity": "CN=laptop,O=Example Org,C=GB"])
        #expect(throws: QemuObject.ParseError.self) { try QemuObject(parsing: "tls-creds-x509,dir=/x") }
        #expect(throws: QemuObject.ParseError.self) { try QemuObject(parsing: "tls-creds-x509,id=a,novalue") }
    }

    @Test func qemuSpellingRequiresTLSAndVerifiesPeersByDefault() throws {
        let p = try plan {
            $0.objects = ["tls-creds-x509,id=tls0,dir=/etc/pki/nbd,endpoint=server"]
            $0.tlsCreds = "tls0"
        }
        #expect(p.mode == .require)
        #expect(p.credentials == .x509(directory: "/etc/pki/nbd", verifyPeer: true))
        let off = try plan {
            $0.objects = ["tls-creds-x509,id=tls0,dir=/d,endpoint=server,verify-peer=off"]
            $0.tlsCreds = "tls0"
        }
        #expect(off.credentials == .x509(directory: "/d", verifyPeer: false))
        let psk = try plan {
            $0.objects = ["tls-creds-psk,id=p,dir=/k,endpoint=server"]
            $0.tlsCreds = "p"
        }
        #expect(psk.credentials == .psk(file: "/k/keys.psk"))
    }

    @Test func authzSimpleBecomesTheIdentityAllowList() throws {
        let p = try plan {
            $0.objects = ["tls-creds-x509,id=tls0,dir=/d,endpoint=server,verify-peer=on",
                          "authz-simple,id=auth0,identity=CN=a,,O=b"]
            $0.tlsCreds = "tls0"
            $0.tlsAuthz = "auth0"
        }
        #expect(p.allowedIdentities == ["CN=a,O=b"])
    }

    @Test func shortSpellingDefaultsToRequireAndTakesModes() throws {
        #expect(try plan { $0.tlsPSK = "/k.psk" }.mode == .require)
        #expect(try plan { $0.tlsPSK = "/k.psk"; $0.tls = .on }.mode == .on)
        let off = try plan { $0.tlsCertificates = "/d"; $0.tls = .off }
        #expect(off.mode == .off && off.credentials == nil)
        #expect(try plan { $0.tlsCertificates = "/d" }.credentials == .x509(directory: "/d", verifyPeer: false))
        #expect(try plan { $0.tlsCertificates = "/d"; $0.tlsVerifyPeer = true }.credentials
            == .x509(directory: "/d", verifyPeer: true))
    }

    @Test func addressesParseCommaSeparatedAndRepeated() throws {
        let p = try plan { $0.allowedAddresses = ["127.0.0.0/8,::1", "192.0.2.0/24"] }
        #expect(p.allowedAddresses?.networks.map(\.description) == ["127.0.0.0/8", "::1/128", "192.0.2.0/24"])
        #expect(p.mode == .off, "the address allow-list works without TLS")
    }

    @Test(arguments: [
        "--tls=require without credentials",
        "--tls-authz without --tls-creds",
        "--tls-creds naming no object",
        "client endpoint",
        "two credentials",
        "identities with unverified certificates",
        "identities without TLS",
        "identities with TLS optional",
        "unknown object type",
        "bad address",
    ])
    func refusesOptionsThatDontFit(situation: String) {
        #expect(throws: UsageError.self, "\(situation)") {
            try plan { o in
                switch situation {
                case "--tls=require without credentials": o.tls = .require
                case "--tls-authz without --tls-creds":
                    o.objects = ["authz-simple,id=a,identity=CN=x"]
                    o.tlsAuthz = "a"
                    o.tlsCertificates = "/d"
                case "--tls-creds naming no object": o.tlsCreds = "nope"
                case "client endpoint":
                    o.objects = ["tls-creds-x509,id=t,dir=/d,endpoint=client"]
                    o.tlsCreds = "t"
                case "two credentials":
                    o.tlsCertificates = "/d"
                    o.tlsPSK = "/k"
                case "identities with unverified certificates":
                    o.tlsCertificates = "/d"
                    o.allowedIdentities = ["CN=x"]
                case "identities without TLS": o.allowedIdentities = ["alice"]
                case "identities with TLS optional":
                    o.tlsPSK = "/k"
                    o.tls = .on
                    o.allowedIdentities = ["alice"]
                case "unknown object type": o.objects = ["secret,id=s,data=x"]
                default: o.allowedAddresses = ["10.0.0.0/40"]
                }
            }
        }
    }

    @Test func pskFilesParseAsPsktoolWritesThem() throws {
        let keys = try PSKKeys(parsing: Array("alice:00ff10\nbob:ABCD\r\n\n".utf8), name: "k")
        #expect(keys.keys == ["alice": [0x00, 0xff, 0x10], "bob": [0xab, 0xcd]])
        for bad in ["alice", "alice:0g", "alice:abc", ":00", ""] {
            #expect(throws: TLSError.self, "\(bad)") { try PSKKeys(parsing: Array(bad.utf8), name: "k") }
        }
    }
}
