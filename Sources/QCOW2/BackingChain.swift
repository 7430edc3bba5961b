import BlockDevice
import SystemIO

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
        canonicalPath(path)
    }

    static func exists(_ path: String) -> Bool { (try? FileKind.of(path: path)) != nil }

    /// Refuses, with `refusal(reason)`, a backing or data file that is not a
    /// regular file (a device, FIFO, socket or /proc file could serve anything
    /// or block forever), or that lies outside `options.allowedDirectories`.
    static func requireAllowed(_ path: String, options: QCOW2Options,
                               refusal: (String) -> QCOW2Error) throws(QCOW2Error) {
        let identity = canonical(path)
        if let kind = try? FileKind.of(path: identity), kind != .regular {
            throw refusal("is not a regular file (\(kind))")
        }
        if identity.hasPrefix("/proc/") || identity.hasPrefix("/sys/") { throw refusal("is in /proc or /sys") }
        if let allowed = options.allowedDirectories {
            let inside = allowed.contains { dir in
                let root = canonical(dir)
                return identity.hasPrefix(root == "/" ? "/" : root + "/")
            }
            guard inside else {
                throw refusal("is outside the allowed directories (\(allowed.joined(separator: ", ")))")
            }
        }
    }

    /// Opens the backing file `name` of the image at `imagePath`, whose chain
    /// so far (top first, canonical paths) is `chain`. Returns the device and its path.
    static func open(name: String, format: String?, imagePath: String, chain: [String],
                     options: QCOW2Options) throws(QCOW2Error) -> (any BlockDevice, String) {
        let path = resolve(name, relativeTo: imagePath)
        let identity = canonical(path)
        if chain.contains(identity) { throw .backingChainLoop(path: path) }
        try requireAllowed(path, options: options) { .backingFileUnavailable(path: path, reason: "refused: it \($0)") }
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
                return (try QCOW2Device(path: path, readOnly: true, options: backingOptions, chain: chain + [identity]), path)
            } catch {
                switch error {
                case .backingChainLoop, .backingChainTooDeep, .backingFileUnavailable: throw error
                default: throw .backingFileUnavailable(path: path, reason: error.description)
                }
            }
        }
        do throws(DeviceError) {
            return (try RawFileDevice(path: path, readOnly: true, opener: options.opener), path)
        } catch {
            throw .backingFileUnavailable(path: path, reason: error.reason)
        }
    }
}
