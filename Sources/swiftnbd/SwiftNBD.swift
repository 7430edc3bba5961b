import ArgumentParser
import Glibc
import Logging
import BlockDevice
import NBDMetrics
import NBDServer
import SwiftNBDKit
import SystemIO

@main
struct SwiftNBD: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "swiftnbd",
        abstract: "Export a raw or qcow2 disk image over NBD (qemu-nbd compatible options).",
        discussion: """
            Clients see the image as a raw disk: nbdinfo nbd://HOST, qemu-img info nbd://HOST, \
            virt-df --format=raw -a nbd://HOST. Exit status: 0 after a clean stop, 1 when the image \
            or the socket can't be opened, 64 for a usage error.
            """,
        version: SwiftNBDKit.version)

    @Flag(name: [.customShort("t"), .long], help: "Keep serving after the last client disconnects.")
    var persistent = false

    @Option(name: [.customShort("p"), .long], help: "TCP port to listen on (0: any free port).")
    var port: Int = 10809

    @Option(name: [.customShort("b"), .long],
            help: "Address to listen on (default: every IPv6 and IPv4 address; IPv6 literals as ::1 or [::1]).")
    var bind: String?

    @Option(name: [.customShort("k"), .long], help: "Listen on this Unix socket instead of TCP.")
    var socket: String?

    @Option(name: [.customShort("f"), .long], help: "Image format (default: probe the file).")
    var format: ImageFormat?

    @Flag(name: [.customShort("r"), .customLong("read-only")], help: "Export read-only.")
    var readOnly = false

    @Option(name: [.customShort("x"), .customLong("export-name")], help: "Export name.")
    var exportName: String = ""

    @Option(name: [.customShort("D"), .long], help: "Export description, shown by nbdinfo.")
    var description: String = ""

    @Option(name: [.customShort("e"), .long], help: "Most clients served at once (0: no limit).")
    var shared: Int = 1

    @Option(name: [.customShort("l"), .customLong("load-snapshot")],
            help: "Export this internal snapshot (name or ID), read-only.")
    var loadSnapshot: String?

    @Flag(name: [.customShort("s"), .customLong("snapshot")],
          help: "Send writes to a temporary overlay; the image is never modified.")
    var snapshot = false

    @Option(name: .customLong("discard"), help: "What trims do: ignore (default) or unmap.")
    var discard: DiscardPolicy = .ignore

    @Option(name: .customLong("detect-zeroes"), help: "Turn all-zero writes into zeroing: off (default), on or unmap.")
    var detectZeroes: ZeroDetection = .off

    @Option(name: .customLong("backing-dir"),
            help: "Serve backing and data files only from under this directory (repeatable; default: anywhere).")
    var backingDirectories: [String] = []

    @Option(name: .customLong("cache-size"),
            help: ArgumentHelp("Memory for qcow2 L2 tables and refcount blocks per export, backing files included "
                               + "(K, M, G suffixes; default 32M).", valueName: "SIZE"),
            transform: { text in
                guard let bytes = ByteSize.parse(text) else { throw ValidationError("bad --cache-size '\(text)'") }
                return bytes
            })
    var cacheSize: Int?

    @Flag(name: [.customShort("A"), .customLong("allocation-depth")],
          help: "Offer the qemu:allocation-depth metadata context.")
    var allocationDepth = false

    @Option(name: [.customShort("B"), .customLong("bitmap")],
            help: ArgumentHelp("Offer this persistent qcow2 bitmap as the qemu:dirty-bitmap:NAME context (repeatable).",
                               valueName: "NAME"))
    var bitmaps: [String] = []

    @Flag(name: .customLong("fork"), help: "Go to the background once the socket is listening.")
    var fork = false

    @Option(name: .customLong("pid-file"), help: "Write the server's process ID to this file.")
    var pidFile: String?

    @Option(name: [.customLong("handshake-timeout"), .customLong("handshake-limit")],
            help: "Drop clients that haven't finished negotiating after this many seconds (0: never).")
    var handshakeTimeout: Double = 10

    @Option(name: .customLong("cache"), help: "Accepted for qemu-nbd compatibility; the page cache is used.")
    var cache: String?

    @Flag(name: [.customShort("n"), .customLong("nocache")], help: "Same as --cache=none (qemu-nbd's spelling).")
    var noCache = false

    @Option(name: .customLong("aio"), help: "Accepted for qemu-nbd compatibility.")
    var aio: String?

    @Option(name: .customLong("object"),
            help: ArgumentHelp("A qemu object: tls-creds-x509 or tls-creds-psk (id=,dir=,endpoint=server), or authz-simple (id=,identity=).",
                               valueName: "TYPE,id=ID,..."))
    var objects: [String] = []

    @Option(name: .customLong("tls-creds"), help: ArgumentHelp("Require TLS with the credentials object ID.", valueName: "ID"))
    var tlsCreds: String?

    @Option(name: .customLong("tls-authz"),
            help: ArgumentHelp("Let in only the client identity of the authz-simple object ID.", valueName: "ID"))
    var tlsAuthz: String?

    @Option(name: .customLong("tls"),
            help: "off, on (TLS offered) or require (default when credentials are given).")
    var tls: TLSMode?

    @Option(name: .customLong("tls-certificates"),
            help: ArgumentHelp("X.509 credentials: DIR holds server-cert.pem, server-key.pem and ca-cert.pem.",
                               valueName: "DIR"))
    var tlsCertificates: String?

    @Option(name: .customLong("tls-psk"), help: ArgumentHelp("Pre-shared keys: username:hexkey lines (psktool).",
                                                             valueName: "FILE"))
    var tlsPSK: String?

    @Flag(name: .customLong("tls-verify-peer"), help: "Require a client certificate signed by ca-cert.pem.")
    var tlsVerifyPeer = false

    @Option(name: .customLong("tls-allow-identity"),
            help: ArgumentHelp("Let in only this certificate DN or PSK username (repeatable).", valueName: "NAME"))
    var tlsAllowIdentity: [String] = []

    @Option(name: .customLong("allow-address"),
            help: ArgumentHelp("Let in only TCP clients from these addresses (repeatable, comma-separated).",
                               valueName: "ADDR[/PREFIX]"))
    var allowAddress: [String] = []

    @Flag(name: [.customShort("v"), .long], help: "Log connections (info level).")
    var verbose = false

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: Logger.Level?

    @Option(name: .customLong("log-file"), help: "Log to this file instead of stderr; SIGHUP reopens it.")
    var logFile: String?

    @Option(name: .customLong("export"),
            help: ArgumentHelp("Serve another export (repeatable).",
                               valueName: "name=NAME,file=PATH[,format=raw|qcow2][,readonly=on][,description=TEXT]"
                                   + "[,bitmap=NAME][,cache-size=SIZE]"))
    var exportSpecs: [String] = []

    @Argument(help: "The image file (optional when --export is given).")
    var file: String?

    /// The positional image; an empty one (IMAGE= in a unit's config) means none, for --export-only services.
    private var image: String? { file.flatMap { $0.isEmpty ? nil : $0 } }
    @Option(name: .customLong("metrics-file"),
            help: "Keep Prometheus metrics in this file (node_exporter textfile format), rewritten every few seconds.")
    var metricsFile: String?

    @Option(name: .customLong("metrics-interval"), help: "Seconds between rewrites of --metrics-file.")
    var metricsInterval: Double = 5


    func validate() throws {
        guard (0...65535).contains(port) else { throw ValidationError("port \(port) is out of range") }
        guard shared >= 0 else { throw ValidationError("--shared can't be negative") }
        guard image != nil || !exportSpecs.isEmpty else { throw ValidationError("no image: give FILE or --export") }
        guard image != nil || bitmaps.isEmpty else {
            throw ValidationError("-B applies to the image argument; give --export ...,bitmap=NAME instead")
        }
        guard metricsInterval > 0 else { throw ValidationError("--metrics-interval must be positive") }
        guard handshakeTimeout >= 0 else { throw ValidationError("--handshake-timeout can't be negative") }
        guard exportName.utf8.count <= 4096, description.utf8.count <= 4096 else {
            throw ValidationError("export names and descriptions are limited to 4096 bytes")
        }
        do {
            _ = try SwiftNBDKit.plan(accessOptions)
        } catch {
            throw ValidationError(error.description)
        }
    }

    private var accessOptions: AccessOptions {
        var options = AccessOptions()
        options.objects = objects
        options.tlsCreds = tlsCreds
        options.tlsAuthz = tlsAuthz
        options.tls = tls
        options.tlsCertificates = tlsCertificates
        options.tlsPSK = tlsPSK
        options.tlsVerifyPeer = tlsVerifyPeer
        options.allowedIdentities = tlsAllowIdentity
        options.allowedAddresses = allowAddress
        return options
    }

    func run() throws {
        SignalHandling.blockEarly()
        let level = logLevel ?? (verbose ? .info : .warning)
        let output: LogOutput
        do {
            output = try LogOutput(path: logFile)
        } catch {
            printToStandardError("swiftnbd: \(error)")
            throw ExitCode(1)
        }
        LoggingSystem.bootstrap { label in LineLogHandler(label: label, output: output, logLevel: level) }
        let logger = Logger(label: "swiftnbd")
        do {
            try serve(logger: logger, logOutput: output)
        } catch let error as StartupError {
            printToStandardError("swiftnbd: \(error.description)")
            throw ExitCode(1)
        }
    }

    private func serve(logger: Logger, logOutput: LogOutput) throws {
        let daemon = Daemon.current
        if fork && daemon == nil {
            // The parent only waits for the child to say it is listening.
            SignalHandling.unblock()
            throw ExitCode(try Daemon.spawnAndWait())
        }
        // Checked in validate(); credentials are read before the image is opened or a port bound.
        let access = try SwiftNBDKit.plan(accessOptions)
        let tlsConfiguration = try SwiftNBDKit.tlsConfiguration(access)
        // Settings every export shares; the positional image adds its own.
        var common = ExportOptions(path: "")
        common.allocationDepth = allocationDepth
        common.maxConnections = shared
        common.discard = discard
        common.detectZeroes = detectZeroes
        common.backingDirectories = backingDirectories.isEmpty ? nil : backingDirectories
        common.cacheBytes = cacheSize
        common.logger = logger
        var all: [ExportOptions] = []
        if let image {
            var options = common
            options.path = image
            options.format = format
            options.readOnly = readOnly
            options.loadSnapshot = loadSnapshot
            options.exportName = exportName
            options.description = description
            options.temporarySnapshot = snapshot
            options.bitmaps = bitmaps
            all.append(options)
        }
        for spec in exportSpecs { all.append(try ExportOptions.parse(export: spec, shared: common)) }
        let opened = try SwiftNBDKit.openExports(all)
        let exports = opened.map(\.export)
        // The metrics are labelled with the first export; with several, they count them all together.
        let metrics = metricsFile.map { _ in
            ExportMetrics(export: opened[0].export.name, statistics: opened[0].statistics)
        }
        let metricsWriter = try metricsFile.map { path throws(StartupError) in
            do throws(Errno) {
                return try MetricsFile(path: path, interval: metricsInterval, logger: logger,
                                       render: { metrics!.render() })
            } catch {
                throw StartupError("cannot write metrics file '\(path)': \(error)")
            }
        }

        let listeners: [Socket]
        let listening: String
        if let activated = try SwiftNBDKit.activatedSockets() {
            listeners = activated
            listening = "\(activated.count) socket(s) from systemd"
        } else if let path = socket {
            listeners = try SwiftNBDKit.listen(on: .unix(path: path))
            listening = path
        } else {
            listeners = try SwiftNBDKit.listen(on: .tcp(host: bind ?? "", port: port))
            listening = "\(bind ?? "*") port=\(listeners.first?.localPort() ?? port)"
        }

        var configuration = ServerConfiguration(maxConnections: shared, persistent: persistent,
                                                handshakeTimeout: handshakeTimeout > 0 ? handshakeTimeout : nil)
        configuration.tls = tlsConfiguration
        configuration.allowedAddresses = access.allowedAddresses
        let server = Server(exports: exports, configuration: configuration, logger: logger, observer: metrics)
        SignalHandling.install(stop: { signal in
            logger.info("Stopping on signal \(signal)")
            server.stop()
        }, reopenLog: {
            do { try logOutput.reopen() } catch { logger.error("\(error)") }
        })
        server.start(listeners: listeners)
        if let pidFile {
            do throws(Errno) {
                try FileHandle.replace(pidFile, contents: Array("\(getpid())\n".utf8), permissions: 0o644)
            } catch {
                throw StartupError("cannot write pid file '\(pidFile)': \(error)")
            }
        }
        // Said only once signals are handled and clients are accepted, so it doubles as a readiness mark.
        logger.info("Server listening on \(listening)")
        daemon?.reportReady(keepStderr: verbose || logLevel != nil)
        server.wait()
        metricsWriter?.stop()
        if let path = socket { unlink(path) }
        if let pidFile { unlink(pidFile) }
    }
}

private func printToStandardError(_ line: String) {
    var line = line + "\n"
    line.withUTF8 { _ = write(STDERR_FILENO, $0.baseAddress, $0.count) }
}

extension ImageFormat: ExpressibleByArgument {}
extension DiscardPolicy: ExpressibleByArgument {}
extension ZeroDetection: ExpressibleByArgument {}
extension TLSMode: ExpressibleByArgument {}
extension Logger.Level: @retroactive ExpressibleByArgument {}
