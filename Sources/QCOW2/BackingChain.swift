#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import BlockDevice

/// Finding and opening the image below this one in a backing chain.
enum BackingChain {
    /// Where a backing or data file named `name` in the image at `imagePath`
    /// lives: absolute names as they are, relative ones from the image's
    /// directory (as qemu resolves them).
    static func resolve(_ name: String, relativeTo imagePath: String) -> String {
        if name.hasPrefix("/") { return name }
        guard let slash = imagePath.lastIndex(of: "/") else { return name }
        return String(imagePath[...slash]) + name
    }

    /// A stable identity for loop detection: the absolute path with symlinks resolved.
    static func canonical(_ path: String) -> String {
        URL(fileURLWithPath: path).standardizedFileURL.resolvingSymlinksInPath().path
    }

    /// Opens the backing file `name` of the image at `imagePath`, whose chain
    /// so far (top first, canonical paths) is `chain`.
    static func open(name: String, format: String?, imagePath: String, chain: [String],
                     options: QCOW2Options) throws(QCOW2Error) -> any BlockDevice {
        let path = resolve(name, relativeTo: imagePath)
        let identity = canonical(path)
        if chain.contains(identity) { throw .backingChainLoop(path: path) }
        // `chain` holds the top image too, so its count minus one backing images are open.
        guard chain.count <= options.maxBackingDepth else { throw .backingChainTooDeep(limit: options.maxBackingDepth) }
        let isQCOW2: Bool
        switch format {
        case "qcow2": isQCOW2 = true
        case "raw": isQCOW2 = false
        case nil: isQCOW2 = QCOW2.hasMagic(path: path)  // no format extension: probe
        case let other?: throw .unsupportedBackingFormat(other)
        }
        if isQCOW2 {
            var backingOptions = options
            backingOptions.snapshot = nil
            do throws(QCOW2Error) {
                return try QCOW2Device(path: path, readOnly: true, options: backingOptions, chain: chain + [identity])
            } catch {
                switch error {
                case .backingChainLoop, .backingChainTooDeep, .backingFileUnavailable: throw error
                default: throw .backingFileUnavailable(path: path, reason: error.description)
                }
            }
        }
        do throws(DeviceError) {
            return try RawFileDevice(path: path, readOnly: true)
        } catch {
            throw .backingFileUnavailable(path: path, reason: error.reason)
        }
    }
}
