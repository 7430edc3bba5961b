import ArgumentParser
import Dispatch
import Foundation
import Logging
import BlockDevice
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

    @Option(name: [.customShort("b"), .long], help: "Address to listen on.")
    var bind: String = "0.0.0.0"

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

    @Option(name: [.customShort("e"), .long], help: "Most clients served at once.")
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

    @Flag(name: [.customShort("A"), .customLong("allocation-depth")],
          help: "Offer the qemu:allocation-depth metadata context.")
    var allocationDepth = false

    @Flag(name: .customLong("fork"), help: "Go to the background once the socket is listening.")
    var fork = false

    @Option(name: .customLong("pid-file"), help: "Write the server's process ID to this file.")
    var pidFile: String?

    @Option(name: .customLong("handshake-timeout"),
            help: "Drop clients that haven't finished negotiating after this many seconds (0: never).")
    var handshakeTimeout: Double = 10

    @Option(name: .customLong("cache"), help: "Accepted for qemu-nbd compatibility; the page cache is used.")
    var cache: String?

    @Option(name: .customLong("aio"), help: "Accepted for qemu-nbd compatibility.")
    var aio: String?

    @Flag(name: [.customShort("v"), .long], help: "Log connections (info level).")
    var verbose = false

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: Logger.Level?

    @Option(name: .customLong("log-file"), help: "Log to this file instead of stderr; SIGHUP reopens it.")
    var logFile: String?

    @Argument(help: "The image file.")
    var file: String

    func validate() throws {
        guard (0...65535).contains(port) else { throw ValidationError("port \(port) is out of range") }
        guard shared >= 1 else { throw ValidationError("--shared needs at least 1") }
        guard handshakeTimeout >= 0 else { throw ValidationError("--handshake-timeout can't be negative") }
        guard exportName.utf8.count <= 4096, description.utf8.count <= 4096 else {
            throw ValidationError("export names and descriptions are limited to 4096 bytes")
        }
    }

    func run() throws {
        let level = logLevel ?? (verbose ? .info : .warning)
        let output: LogOutput
        do {
            output = try LogOutput(path: logFile)
        } catch {
            FileHandle.standardError.write(Data("swiftnbd: \(error)\n".utf8))
            throw ExitCode(1)
        }
        LoggingSystem.bootstrap { label in LineLogHandler(label: label, output: output, logLevel: level) }
        let logger = Logger(label: "swiftnbd")
        do {
            try serve(logger: logger, logOutput: output)
        } catch let error as StartupError {
            FileHandle.standardError.write(Data("swiftnbd: \(error.description)\n".utf8))
            throw ExitCode(1)
        }
    }

    private func serve(logger: Logger, logOutput: LogOutput) throws {
        let daemon = Daemon.current
        if fork && daemon == nil {
            // The parent only waits for the child to say it is listening.
            throw ExitCode(try Daemon.spawnAndWait())
        }
        var options = ExportOptions(path: file)
        options.format = format
        options.readOnly = readOnly
        options.loadSnapshot = loadSnapshot
        options.exportName = exportName
        options.description = description
        options.allocationDepth = allocationDepth
        options.maxConnections = shared
        options.temporarySnapshot = snapshot
        options.discard = discard
        options.detectZeroes = detectZeroes
        options.backingDirectories = backingDirectories.isEmpty ? nil : backingDirectories
        options.logger = logger
        let export = try SwiftNBDKit.openExport(options)

        let listeners: [Socket]
        let listening: String
        if let activated = try SwiftNBDKit.activatedSockets() {
            listeners = activated
            listening = "\(activated.count) socket(s) from systemd"
        } else if let path = socket {
            listeners = try SwiftNBDKit.listen(on: .unix(path: path))
            listening = path
        } else {
            listeners = try SwiftNBDKit.listen(on: .tcp(host: bind, port: port))
            listening = "\(bind) port=\(listeners.first?.localPort() ?? port)"
        }

        let server = Server(export: export,
                            configuration: ServerConfiguration(maxConnections: shared, persistent: persistent,
                                                               handshakeTimeout: handshakeTimeout > 0 ? handshakeTimeout : nil),
                            logger: logger)
        let signals = SignalHandling.install(stop: { signal in
            logger.info("Stopping on signal \(signal)")
            server.stop()
        }, reopenLog: {
            do { try logOutput.reopen() } catch { logger.error("\(error)") }
        })
        server.start(listeners: listeners)
        if let pidFile {
            do {
                try "\(getpid())\n".write(toFile: pidFile, atomically: true, encoding: .utf8)
            } catch {
                throw StartupError("cannot write pid file '\(pidFile)': \(error.localizedDescription)")
            }
        }
        // Said only once signals are handled and clients are accepted, so it doubles as a readiness mark.
        logger.info("Server listening on \(listening)")
        daemon?.reportReady(keepStderr: verbose || logLevel != nil)
        server.wait()
        withExtendedLifetime(signals) {}
        if let path = socket { unlink(path) }
        if let pidFile { unlink(pidFile) }
    }
}

extension ImageFormat: ExpressibleByArgument {}
extension DiscardPolicy: ExpressibleByArgument {}
extension ZeroDetection: ExpressibleByArgument {}
extension Logger.Level: @retroactive ExpressibleByArgument {}
