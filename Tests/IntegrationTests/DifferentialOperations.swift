import CLibNBD
import Foundation
import TestSupport

/// One step of a differential run. Steps are drawn from the seed before anything runs, so the
/// sequence never depends on what a server answered and a seed always replays the same run.
indirect enum DifferentialOperation: CustomStringConvertible, Sendable {
    /// Data to write: random bytes from a seed, or one repeated byte (0 is a write of zeroes).
    enum Fill: Sendable {
        case random(UInt64)
        case byte(UInt8)
    }

    case write(connection: Int, offset: Int, length: Int, fill: Fill, fua: Bool)
    /// WRITE_ZEROES with any of NO_HOLE, FAST_ZERO and FUA.
    case zero(connection: Int, offset: Int, length: Int, flags: UInt32)
    case trim(connection: Int, offset: Int, length: Int, fua: Bool)
    case flush(connection: Int)
    /// Reads the range from both servers, through possibly different connections, and compares.
    case compare(swiftConnection: Int, qemuConnection: Int, offset: Int, length: Int)
    case compareAll
    /// Writes, zeroes and trims on byte-disjoint ranges of a few clusters, each on its own
    /// connection, issued at once: disjoint, so the outcome is the same in any order.
    case concurrent([DifferentialOperation])

    var description: String {
        switch self {
        case .write(let c, let offset, let length, let fill, let fua):
            let what = switch fill { case .random(let s): "random(\(s))"; case .byte(let b): "byte \(b)" }
            return "write\(fua ? "+FUA" : "") \(length)@\(offset) \(what) on #\(c)"
        case .zero(let c, let offset, let length, let flags):
            let names = [(LIBNBD_CMD_FLAG_NO_HOLE, "NO_HOLE"), (LIBNBD_CMD_FLAG_FAST_ZERO, "FAST_ZERO"),
                         (LIBNBD_CMD_FLAG_FUA, "FUA")].filter { flags & $0.0 != 0 }.map(\.1)
            return "zero[\(names.joined(separator: "|"))] \(length)@\(offset) on #\(c)"
        case .trim(let c, let offset, let length, let fua): return "trim\(fua ? "+FUA" : "") \(length)@\(offset) on #\(c)"
        case .flush(let c): return "flush on #\(c)"
        case .compare(let s, let q, let offset, let length): return "compare \(length)@\(offset) (#\(s) vs #\(q))"
        case .compareAll: return "compare all"
        case .concurrent(let ops): return "concurrently {" + ops.map(\.description).joined(separator: "; ") + "}"
        }
    }

    /// The bytes a write sends; the same on both servers.
    static func payload(_ fill: Fill, length: Int) -> [UInt8] {
        switch fill {
        case .byte(let byte):
            return [UInt8](repeating: byte, count: length)
        case .random(let seed):
            var rng = SplitMix(seed: seed)
            var bytes = [UInt8](repeating: 0, count: length)
            bytes.withUnsafeMutableBytes { raw in
                var i = 0
                while i < length {
                    var word = rng.next()
                    withUnsafeBytes(of: &word) { w in
                        let n = min(8, length - i)
                        raw.baseAddress!.advanced(by: i).copyMemory(from: w.baseAddress!, byteCount: n)
                        i += n
                    }
                }
            }
            return bytes
        }
    }

    // MARK: - Drawing a sequence

    /// `count` steps for `image`, from `seed`. Offsets favour cluster boundaries and one hot
    /// region, so steps overwrite, split and free each other's clusters rather than scatter.
    static func sequence(seed: UInt64, count: Int, image: DifferentialImage) -> [DifferentialOperation] {
        var rng = SplitMix(seed: seed ^ 0x0b5e_55ed_d1ff)
        let size = image.size, cluster = image.clusterSize
        let hot = Int.random(in: 0..<size, using: &rng)

        func range(maxLength: Int) -> (offset: Int, length: Int) {
            var length: Int
            switch Int.random(in: 0..<20, using: &rng) {
            case 0..<7: length = Int.random(in: 1...4096, using: &rng)
            case 7..<14: length = Int.random(in: 1...(3 * cluster), using: &rng)
            case 14..<18: length = cluster * Int.random(in: 1...4, using: &rng)
            default: length = Int.random(in: 1...maxLength, using: &rng)
            }
            length = max(1, min(length, maxLength, size))
            var offset: Int
            switch Int.random(in: 0..<10, using: &rng) {
            case 0..<4: offset = Int.random(in: 0...(size - length), using: &rng)
            case 4..<6: offset = Int.random(in: 0...(size / cluster), using: &rng) * cluster   // aligned
            case 6..<8:  // straddles a cluster boundary
                let boundary = Int.random(in: 0...(size / cluster), using: &rng) * cluster
                offset = boundary - Int.random(in: 1...min(length, 4096), using: &rng)
            default: offset = hot + Int.random(in: -2 * cluster...2 * cluster, using: &rng)
            }
            return (max(0, min(offset, size - length)), length)
        }

        func single(connection: Int, maxLength: Int? = nil) -> DifferentialOperation {
            let kind = Int.random(in: 0..<20, using: &rng)
            switch kind {
            case 0..<9:
                let r = range(maxLength: maxLength ?? 1 << 20)
                let fill: Fill = switch Int.random(in: 0..<8, using: &rng) {
                case 0: .byte(0)
                case 1: .byte(UInt8.random(in: 1...255, using: &rng))
                default: .random(rng.next())
                }
                return .write(connection: connection, offset: r.offset, length: r.length, fill: fill,
                              fua: Int.random(in: 0..<5, using: &rng) == 0)
            case 9..<15:
                let r = range(maxLength: maxLength ?? 4 << 20)
                let flags = [LIBNBD_CMD_FLAG_NO_HOLE, LIBNBD_CMD_FLAG_FAST_ZERO, LIBNBD_CMD_FLAG_FUA]
                    .filter { _ in Bool.random(using: &rng) }.reduce(0, |)
                return .zero(connection: connection, offset: r.offset, length: r.length, flags: flags)
            default:
                let r = range(maxLength: maxLength ?? 4 << 20)
                return .trim(connection: connection, offset: r.offset, length: r.length,
                             fua: Int.random(in: 0..<6, using: &rng) == 0)
            }
        }

        func concurrent() -> DifferentialOperation {
            // A window of a few clusters cut into one disjoint piece per connection (some with gaps).
            let window = min(size, cluster * Int.random(in: 1...4, using: &rng) + Int.random(in: 0...20_000, using: &rng))
            let start = Int.random(in: 0...(size - window), using: &rng)
            let pieces = image.connections
            var cuts = (0..<(pieces - 1)).map { _ in Int.random(in: 0...window, using: &rng) }.sorted()
            cuts = [0] + cuts + [window]
            var ops: [DifferentialOperation] = []
            for i in 0..<pieces {
                let gap = Bool.random(using: &rng) ? Int.random(in: 0...min(512, cuts[i + 1] - cuts[i]), using: &rng) : 0
                let length = cuts[i + 1] - cuts[i] - gap
                guard length > 0 else { continue }
                let shaped = single(connection: i, maxLength: length)
                // Keep the drawn kind and flags; place it exactly on this piece.
                ops.append(shaped.placed(at: start + cuts[i] + gap, length: length))
            }
            return .concurrent(ops)
        }

        var ops: [DifferentialOperation] = []
        let fullCompareEvery = max(25, count / 4)
        for i in 0..<count {
            let connection = Int.random(in: 0..<image.connections, using: &rng)
            switch Int.random(in: 0..<100, using: &rng) {
            case 0..<6: ops.append(.flush(connection: connection))
            case 6..<18:
                // Half the reads look at what the last change touched, and a cluster either side.
                var r = range(maxLength: 1 << 20)
                if let touched = ops.last?.touched, Bool.random(using: &rng) {
                    let start = max(0, touched.lowerBound - cluster)
                    r = (start, min(size, touched.upperBound + cluster, start + (4 << 20)) - start)
                }
                ops.append(.compare(swiftConnection: connection,
                                    qemuConnection: Int.random(in: 0..<image.connections, using: &rng),
                                    offset: r.offset, length: r.length))
            case 18..<30 where image.connections > 1: ops.append(concurrent())
            default: ops.append(single(connection: connection))
            }
            if i % fullCompareEvery == fullCompareEvery - 1 { ops.append(.compareAll) }
        }
        return ops
    }

    /// The bytes a write, zero or trim (or a batch of them) may change.
    var touched: Range<Int>? {
        switch self {
        case .write(_, let offset, let length, _, _), .zero(_, let offset, let length, _),
             .trim(_, let offset, let length, _):
            return offset..<(offset + length)
        case .concurrent(let ops):
            let ranges = ops.compactMap(\.touched)
            guard let low = ranges.map(\.lowerBound).min(), let high = ranges.map(\.upperBound).max() else { return nil }
            return low..<high
        default:
            return nil
        }
    }

    /// The same operation moved to [offset, offset+length).
    private func placed(at offset: Int, length: Int) -> DifferentialOperation {
        switch self {
        case .write(let c, _, _, let fill, let fua): .write(connection: c, offset: offset, length: length, fill: fill, fua: fua)
        case .zero(let c, _, _, let flags): .zero(connection: c, offset: offset, length: length, flags: flags)
        case .trim(let c, _, _, let fua): .trim(connection: c, offset: offset, length: length, fua: fua)
        default: self
        }
    }
}
