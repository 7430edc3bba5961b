import NBDServer
import SystemIO
import TLS

/// Who may connect, as the command line says it: TLS in qemu-nbd's spelling
/// (`--object tls-creds-x509|tls-creds-psk|authz-simple`, `--tls-creds`,
/// `--tls-authz`) or nbdkit's (`--tls`, `--tls-certificates`, `--tls-psk`,
/// `--tls-verify-peer`), and the address allow-list.
public struct AccessOptions: Sendable {
    public var objects: [String] = []
    public var tlsCreds: String?
    public var tlsAuthz: String?
    public var tls: TLSMode?
    public var tlsCertificates: String?
    public var tlsPSK: String?
    public var tlsVerifyPeer = false
    public var allowedIdentities: [String] = []
    public var allowedAddresses: [String] = []

    public init() {}
}

/// What the access options ask for, checked against each other but with no file read yet.
public struct AccessPlan: Sendable, Equatable {
    public enum Credentials: Sendable, Equatable {
        case x509(directory: String, verifyPeer: Bool)
        case psk(file: String)
    }

    public var mode: TLSMode = .off
    public var credentials: Credentials?
    public var allowedIdentities: [String]?
    public var allowedAddresses: AddressAllowList?
}

/// Options that contradict each other or can't be parsed (exit 64).
public struct UsageError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

extension SwiftNBDKit {
    /// Where qemu looks for credentials when an object has no dir=.
    public static let qemuDefaultCredentialsDirectory = "/etc/pki/qemu"

    /// Checks the access options; throws a usage error if they don't fit together.
    public static func plan(_ options: AccessOptions) throws(UsageError) -> AccessPlan {
        var plan = AccessPlan()
        var objects: [String: QemuObject] = [:]
        for text in options.objects {
            let object: QemuObject
            do { object = try QemuObject(parsing: text) } catch { throw UsageError(error.description) }
            guard objects[object.id] == nil else { throw UsageError("--object id '\(object.id)' is used twice") }
            objects[object.id] = object
        }

        var credentials: [AccessPlan.Credentials] = []
        if let id = options.tlsCreds {
            guard let object = objects[id] else { throw UsageError("--tls-creds '\(id)': no --object with id=\(id)") }
            credentials.append(try Self.credentials(from: object, verifyPeer: options.tlsVerifyPeer))
        }
        if let dir = options.tlsCertificates {
            credentials.append(.x509(directory: dir, verifyPeer: options.tlsVerifyPeer))
        }
        if let file = options.tlsPSK { credentials.append(.psk(file: file)) }
        guard credentials.count <= 1 else {
            throw UsageError("give one of --tls-creds, --tls-certificates and --tls-psk")
        }
        plan.credentials = credentials.first

        // With credentials TLS is required unless said otherwise, as in qemu-nbd.
        plan.mode = options.tls ?? (plan.credentials == nil ? .off : .require)
        if plan.mode != .off && plan.credentials == nil {
            throw UsageError("--tls=\(plan.mode.rawValue) needs --tls-certificates, --tls-psk or --tls-creds")
        }
        if plan.mode == .off { plan.credentials = nil }

        var identities = options.allowedIdentities
        if let id = options.tlsAuthz {
            guard options.tlsCreds != nil else { throw UsageError("--tls-authz needs --tls-creds") }
            guard let object = objects[id] else { throw UsageError("--tls-authz '\(id)': no --object with id=\(id)") }
            guard object.type == "authz-simple", let identity = object.properties["identity"] else {
                throw UsageError("--tls-authz '\(id)': only authz-simple,id=ID,identity=NAME is supported")
            }
            identities.append(identity)
        }
        if !identities.isEmpty {
            // With --tls=on a plaintext client would walk past the list.
            guard plan.mode == .require else { throw UsageError("an identity allow-list needs TLS required") }
            // An unverified certificate's name proves nothing.
            if case .x509(_, let verifyPeer) = plan.credentials, !verifyPeer {
                throw UsageError("an identity allow-list with certificates needs verify-peer (--tls-verify-peer)")
            }
            plan.allowedIdentities = identities
        }

        if !options.allowedAddresses.isEmpty {
            var networks: [AddressAllowList.Network] = []
            for text in options.allowedAddresses.flatMap({ $0.split(separator: ",").map(String.init) }) {
                guard let network = AddressAllowList.Network(text) else {
                    throw UsageError("--allow-address '\(text)' is not ADDRESS or ADDRESS/PREFIX")
                }
                networks.append(network)
            }
            plan.allowedAddresses = AddressAllowList(networks)
        }
        for object in objects.values where !["tls-creds-x509", "tls-creds-psk", "authz-simple"].contains(object.type) {
            throw UsageError("--object \(object.type): not supported (tls-creds-x509, tls-creds-psk, authz-simple are)")
        }
        return plan
    }

    private static func credentials(from object: QemuObject, verifyPeer: Bool) throws(UsageError)
        -> AccessPlan.Credentials
    {
        let endpoint = object.properties["endpoint"] ?? "client"  // qemu's default
        guard endpoint == "server" else {
            throw UsageError("--tls-creds '\(object.id)': the credentials need endpoint=server")
        }
        let dir = object.properties["dir"] ?? qemuDefaultCredentialsDirectory
        let known: Set<String>
        let result: AccessPlan.Credentials
        switch object.type {
        case "tls-creds-x509":
            known = ["id", "dir", "endpoint", "verify-peer"]
            // qemu verifies clients' certificates unless told verify-peer=off.
            let verify: Bool
            do { verify = try object.flag("verify-peer", default: true) } catch { throw UsageError(error.description) }
            result = .x509(directory: dir, verifyPeer: verify || verifyPeer)
        case "tls-creds-psk":
            known = ["id", "dir", "endpoint", "verify-peer", "username"]
            result = .psk(file: dir + "/" + TLSCredentials.FileName.pskKeys)
        default:
            throw UsageError("--tls-creds '\(object.id)' is a \(object.type), not tls-creds-x509 or tls-creds-psk")
        }
        if let unknown = object.properties.keys.sorted().first(where: { !known.contains($0) }) {
            throw UsageError("--object \(object.type) '\(object.id)': \(unknown)= is not supported")
        }
        return result
    }

    /// Loads the planned credentials: a startup error (exit 1) naming the file when one
    /// is missing, unreadable or bad.
    public static func tlsConfiguration(_ plan: AccessPlan) throws(StartupError) -> TLSConfiguration {
        guard plan.mode != .off, let credentials = plan.credentials else { return .off }
        let loaded: TLSCredentials
        do {
            switch credentials {
            case .x509(let directory, let verifyPeer):
                loaded = try TLSCredentials.x509(directory: directory, verifyPeer: verifyPeer)
            case .psk(let file):
                loaded = try TLSCredentials.psk(file: file)
            }
        } catch {
            throw StartupError("TLS credentials: \(error)")
        }
        return TLSConfiguration(mode: plan.mode, credentials: loaded, allowedIdentities: plan.allowedIdentities)
    }
}
