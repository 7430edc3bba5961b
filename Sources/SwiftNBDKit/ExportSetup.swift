import BlockDevice
import Logging
import NBDServer
import QCOW2
import SystemIO

/// Image formats the server can export.
public enum ImageFormat: String, Sendable, CaseIterable {
    case raw, qcow2
}

/// Everything needed to open the image and describe the export.
public struct ExportOptions: Sendable {
    public var path: String
    /// nil: probe, as qemu-nbd does (qcow2 magic means qcow2, else raw).
    public var format: ImageFormat?
    public var readOnly = false
    /// An internal snapshot to export read-only (`-l`).
    public var loadSnapshot: String?
    public var exportName = ""
    public var description = ""
    public var allocationDepth = false
    /// Persistent bitmaps to export as `qemu:dirty-bitmap:NAME` contexts (`-B`); qcow2 only.
    public var bitmaps: [String] = []
    /// `--cache-size`: memory for a qcow2 image's L2 tables and refcount
    /// blocks, its backing chain included; nil for the default (32 MiB).
    public var cacheBytes: Int?
    /// Most clients at once (`-e`, 0: no limit); multi-conn is advertised unless it is 1.
    public var maxConnections = 1
    /// `-s`: writes go to a temporary overlay; the image is never modified.
    public var temporarySnapshot = false
    public var discard: DiscardPolicy = .ignore
    public var detectZeroes: ZeroDetection = .off
    /// `--backing-dir`: backing and external data files must lie under one of
    /// these directories; nil allows any path (qemu-nbd's behaviour).
    public var backingDirectories: [String]?
    /// Where the image's backing chain and refused writes are logged.
    public var logger = Logger(label: "swiftnbd.qcow2", factory: { _ in SwiftLogNoOpLogHandler() })

    public init(path: String) { self.path = path }
}

/// A reason the server can't start, printed as one line before exit 1.
public struct StartupError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

public enum SwiftNBDKit {
    public static let version = "0.1.0"

    /// The image's format, from its first bytes.
    public static func probeFormat(path: String) -> ImageFormat {
        QCOW2.hasMagic(path: path) ? .qcow2 : .raw
    }

    /// Opens the image as the export's device, or explains why not.
    public static func openExport(_ options: ExportOptions) throws(StartupError) -> Export {
        try open(options).export
    }

    /// Opens the export, and gives the image engine's own counters (qcow2) when it keeps any,
    /// as the wrappers (overlay, write policy) hide the engine from the export's device.
    public static func open(_ options: ExportOptions)
        throws(StartupError) -> (export: Export, statistics: (any DeviceStatisticsSource)?) {
        let format = options.format ?? probeFormat(path: options.path)
        if let twice = options.bitmaps.first(where: { name in options.bitmaps.filter { $0 == name }.count > 1 }) {
            throw StartupError("bitmap '\(twice)' is given twice")
        }
        // A block status payload chooses among at most 64 contexts, two of them not bitmaps.
        guard options.bitmaps.count <= 62 else { throw StartupError("at most 62 bitmaps can be exported at once") }
        var device: any BlockDevice
        var statistics: (any DeviceStatisticsSource)?
        let readOnly = options.readOnly || options.loadSnapshot != nil
        // With -s the image itself is opened read-only; the overlay takes the writes.
        let imageReadOnly = readOnly || options.temporarySnapshot
        switch format {
        case .raw:
            guard options.loadSnapshot == nil else {
                throw StartupError("'\(options.path)': raw images have no internal snapshots (-l needs qcow2)")
            }
            if let name = options.bitmaps.first {
                throw StartupError("'\(options.path)': cannot export bitmap '\(name)': raw images have no bitmaps")
            }
            do {
                device = try RawFileDevice(path: options.path, readOnly: imageReadOnly)
            } catch {
                throw StartupError("\(error.reason)")
            }
        case .qcow2:
            var qcowOptions = QCOW2Options(snapshot: options.loadSnapshot,
                                           allowedDirectories: options.backingDirectories, logger: options.logger)
            if let bytes = options.cacheBytes { qcowOptions.cacheBytes = bytes }
            do {
                let qcow2 = try QCOW2Device(path: options.path, readOnly: imageReadOnly, options: qcowOptions)
                do {
                    for name in options.bitmaps { try qcow2.requireExportableBitmap(named: name) }
                } catch {
                    qcow2.close()
                    throw error
                }
                device = qcow2
                statistics = qcow2
            } catch {
                throw StartupError("'\(options.path)': \(error)")
            }
        }
        if options.temporarySnapshot && !readOnly {
            do {
                device = try SnapshotOverlayDevice(base: device)
            } catch {
                throw StartupError("\(error.reason)")
            }
        }
        if !readOnly {
            device = WritePolicyDevice(device, discard: options.discard, detectZeroes: options.detectZeroes)
        }
        let export = Export(name: options.exportName, description: options.description, device: device,
                            readOnly: readOnly, exposeAllocationDepth: options.allocationDepth,
                            dirtyBitmaps: options.bitmaps, allowMultiConn: options.maxConnections != 1)
        return (export, statistics)
    }
}

extension ExportOptions {
    /// One `--export` value: `name=NAME,file=PATH[,format=raw|qcow2][,readonly=on|off][,description=TEXT]`
    /// `[,bitmap=NAME]...` (repeatable, as `-B`), in qemu's option syntax (a doubled comma is a literal one). What it does not set comes from `shared`.
    public static func parse(export spec: String, shared: ExportOptions) throws(StartupError) -> ExportOptions {
        var options = shared
        var name: String?
        var file: String?
        for field in splitFields(spec) {
            guard let equals = field.firstIndex(of: "=") else {
                throw StartupError("--export '\(spec)': '\(field)' is not KEY=VALUE")
            }
            let key = String(field[..<equals])
            let value = String(field[field.index(after: equals)...])
            switch key {
            case "name": name = value
            case "file": file = value
            case "format":
                guard let format = ImageFormat(rawValue: value) else {
                    throw StartupError("--export '\(spec)': format must be raw or qcow2, not '\(value)'")
                }
                options.format = format
            case "readonly":
                guard let on = ["on": true, "off": false, "true": true, "false": false][value] else {
                    throw StartupError("--export '\(spec)': readonly must be on or off, not '\(value)'")
                }
                options.readOnly = on
            case "description": options.description = value
            case "bitmap":
                guard !value.isEmpty else { throw StartupError("--export '\(spec)': bitmap= needs a name") }
                options.bitmaps.append(value)
            case "cache-size":
                guard let bytes = ByteSize.parse(value) else {
                    throw StartupError("--export '\(spec)': cache-size must be a size such as 64M, not '\(value)'")
                }
                options.cacheBytes = bytes
            default:
                throw StartupError("--export '\(spec)': unknown key '\(key)' "
                                   + "(name, file, format, readonly, description, bitmap, cache-size)")
            }
        }
        guard let name, let file, !file.isEmpty else {
            throw StartupError("--export '\(spec)': name= and file= are required")
        }
        guard name.utf8.count <= 4096, options.description.utf8.count <= 4096 else {
            throw StartupError("--export '\(spec)': names and descriptions are limited to 4096 bytes")
        }
        options.exportName = name
        options.path = file
        return options
    }

    /// Splits on single commas; ",," stands for a comma inside a value.
    private static func splitFields(_ spec: String) -> [String] {
        var fields: [String] = []
        var current = ""
        var characters = spec.makeIterator()
        var pending = characters.next()
        while let c = pending {
            pending = characters.next()
            if c == "," {
                if pending == "," {
                    current.append(",")
                    pending = characters.next()
                } else {
                    fields.append(current)
                    current = ""
                }
            } else {
                current.append(c)
            }
        }
        fields.append(current)
        return fields.filter { !$0.isEmpty }
    }
}

extension SwiftNBDKit {
    /// Opens every export (with its engine's counters, as `open` gives them), refusing two with the same name.
    public static func openExports(_ all: [ExportOptions])
        throws(StartupError) -> [(export: Export, statistics: (any DeviceStatisticsSource)?)] {
        var seen = Set<String>()
        for options in all where !seen.insert(options.exportName).inserted {
            throw StartupError("two exports are named '\(options.exportName)'")
        }
        var opened: [(export: Export, statistics: (any DeviceStatisticsSource)?)] = []
        for options in all {
            do {
                opened.append(try open(options))
            } catch {
                for (export, _) in opened { export.device.close() }
                throw error
            }
        }
        return opened
    }
}
