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
    public var l2CacheBytes: Int?
    /// Most clients at once (`-e`); multi-conn is advertised only above 1.
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
        let format = options.format ?? probeFormat(path: options.path)
        var device: any BlockDevice
        let readOnly = options.readOnly || options.loadSnapshot != nil
        // With -s the image itself is opened read-only; the overlay takes the writes.
        let imageReadOnly = readOnly || options.temporarySnapshot
        switch format {
        case .raw:
            guard options.loadSnapshot == nil else {
                throw StartupError("'\(options.path)': raw images have no internal snapshots (-l needs qcow2)")
            }
            do {
                device = try RawFileDevice(path: options.path, readOnly: imageReadOnly)
            } catch {
                throw StartupError("\(error.reason)")
            }
        case .qcow2:
            var qcowOptions = QCOW2Options(snapshot: options.loadSnapshot,
                                           allowedDirectories: options.backingDirectories, logger: options.logger)
            if let bytes = options.l2CacheBytes { qcowOptions.l2CacheBytes = bytes }
            do {
                device = try QCOW2Device(path: options.path, readOnly: imageReadOnly, options: qcowOptions)
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
        return Export(name: options.exportName, description: options.description, device: device,
                      readOnly: readOnly, exposeAllocationDepth: options.allocationDepth,
                      allowMultiConn: options.maxConnections > 1)
    }
}
