import Foundation
import TestSupport

/// One randomly configured qcow2 image and how both servers export it, drawn from a seed so a
/// failing differential run can be rebuilt exactly. Only combinations qemu-img accepts are drawn.
struct DifferentialImage: Sendable, CustomStringConvertible {
    enum Backing: String, Sendable { case raw, qcow2 }

    var size: Int
    var v3: Bool
    var clusterSize: Int
    var refcountBits: Int
    var lazyRefcounts: Bool
    var extendedL2: Bool
    /// nil, "zlib" or "zstd": the compression type, and some clusters are pre-written compressed.
    var compression: String?
    var backing: Backing?
    var backingSize: Int
    /// nil, or whether the external data file is raw (`data_file_raw`).
    var dataFileRaw: Bool?
    var preallocation: String
    /// An internal snapshot taken halfway through pre-population, so later writes meet shared clusters.
    var snapshot: Bool
    // How the image is exported; both servers get the same.
    var connections: Int
    var discard: String
    var detectZeroes: String

    init(seed: UInt64) {
        var rng = SplitMix(seed: seed)
        func chance(_ p: Double) -> Bool { Double.random(in: 0..<1, using: &rng) < p }
        v3 = chance(0.75)
        clusterSize = 1 << [9, 10, 12, 13, 14, 16, 16, 16, 17, 18, 21].randomElement(using: &rng)!
        size = Int.random(in: 1...16, using: &rng) << 20 + Int.random(in: 0..<64, using: &rng) * 512
        refcountBits = v3 ? [1, 2, 4, 8, 16, 16, 32, 64].randomElement(using: &rng)! : 16
        lazyRefcounts = v3 && chance(0.3)
        extendedL2 = v3 && clusterSize >= 16 << 10 && chance(0.35)   // qemu: extended L2 needs >= 16 KiB clusters
        dataFileRaw = v3 && chance(0.15) ? chance(0.5) : nil
        // qemu-img: a backing file excludes data_file_raw, and allows preallocation only with extended L2.
        backing = dataFileRaw != true && chance(0.35) ? (chance(0.5) ? .raw : .qcow2) : nil
        backingSize = Int.random(in: (size / 4)...size, using: &rng) / 512 * 512 + (backing == .raw ? 12345 : 0)
        preallocation = backing != nil && !extendedL2
            ? "off" : ["off", "off", "off", "off", "metadata", "falloc", "full"].randomElement(using: &rng)!
        // Compressed writes need unallocated clusters and no data file.
        compression = dataFileRaw == nil && preallocation == "off" && chance(0.45)
            ? (v3 && chance(0.5) ? "zstd" : "zlib") : nil
        // qemu: no internal snapshots with a data file; a snapshot doubles refcounts, and up to six
        // compressed clusters may share a host cluster.
        snapshot = dataFileRaw == nil && refcountBits >= 4 && chance(0.25)
        connections = Int.random(in: 1...4, using: &rng)
        discard = chance(0.6) ? "unmap" : "ignore"
        detectZeroes = chance(0.7) ? "off" : (discard == "unmap" && chance(0.5) ? "unmap" : "on")
    }

    var description: String {
        var parts = ["size=\(size)", v3 ? "compat=1.1" : "compat=0.10", "cluster_size=\(clusterSize)",
                     "refcount_bits=\(refcountBits)"]
        if lazyRefcounts { parts.append("lazy_refcounts") }
        if extendedL2 { parts.append("extended_l2") }
        if let compression { parts.append("compressed(\(compression))") }
        if let backing { parts.append("backing=\(backing)(\(backingSize))") }
        if let dataFileRaw { parts.append(dataFileRaw ? "data_file_raw" : "data_file") }
        if preallocation != "off" { parts.append("preallocation=\(preallocation)") }
        if snapshot { parts.append("snapshot") }
        parts += ["connections=\(connections)", "discard=\(discard)", "detect-zeroes=\(detectZeroes)"]
        return parts.joined(separator: " ")
    }

    // MARK: - Building

    /// Makes the image (and its backing or data file) in `directory` with qemu-img, and
    /// pre-populates it with qemu-io from `seed`. Returns the image's path.
    func build(in directory: String, seed: UInt64) throws -> String {
        var rng = SplitMix(seed: seed ^ 0x5eed_0001_ca5e)
        let image = directory + "/disk.qcow2"
        var options = ["compat=\(v3 ? "1.1" : "0.10")", "cluster_size=\(clusterSize)", "preallocation=\(preallocation)"]
        if v3 {
            options += ["refcount_bits=\(refcountBits)", "lazy_refcounts=\(lazyRefcounts ? "on" : "off")",
                        "extended_l2=\(extendedL2 ? "on" : "off")"]
        }
        if let compression { options.append("compression_type=\(compression)") }
        if let dataFileRaw {
            options += ["data_file=\(directory)/disk.data", "data_file_raw=\(dataFileRaw ? "on" : "off")"]
        }
        if let backing {
            // Relative, so each copy of the directory uses its own base.
            let base = directory + "/base.\(backing)"
            let raw = directory + "/base-source.raw"
            try ImageFactory.patternedRaw(raw, size: backingSize, seed: seed)
            if backing == .qcow2 {
                try Tools.check("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, base])
                try FileManager.default.removeItem(atPath: raw)
            } else {
                try FileManager.default.moveItem(atPath: raw, toPath: base)
            }
            options += ["backing_file=base.\(backing)", "backing_fmt=\(backing)"]
        }
        try ImageFactory.create(image, format: "qcow2", size: "\(size)", options: options)

        var commands: [String] = []
        if compression != nil {
            // Distinct whole clusters: qemu compresses only into unallocated ones.
            let clusters = Array(0..<(size / clusterSize)).shuffled(using: &rng).prefix(Int.random(in: 1...6, using: &rng))
            for cluster in clusters {
                commands.append("write -c -P \(Int.random(in: 1...255, using: &rng)) \(cluster * clusterSize) \(clusterSize)")
            }
        }
        commands += randomQemuIO(count: Int.random(in: 4...12, using: &rng), rng: &rng)
        try ImageFactory.io(image, format: "qcow2", commands)
        if snapshot {
            try Tools.check("qemu-img", ["snapshot", "-c", "s1", image])
            try ImageFactory.io(image, format: "qcow2", randomQemuIO(count: Int.random(in: 2...6, using: &rng), rng: &rng))
        }
        return image
    }

    /// Unaligned pattern writes, zeroing with and without unmap, and discards.
    private func randomQemuIO(count: Int, rng: inout SplitMix) -> [String] {
        (0..<count).map { _ in
            let length = Int.random(in: 1...min(size, 3 * clusterSize + 70_000), using: &rng)
            let offset = Int.random(in: 0...(size - length), using: &rng)
            switch Int.random(in: 0..<10, using: &rng) {
            case 0: return "write -z \(offset) \(length)"
            case 1: return "write -z -u \(offset) \(length)"
            case 2: return "discard \(offset) \(length)"
            default: return "write -P \(Int.random(in: 1...255, using: &rng)) \(offset) \(length)"
            }
        }
    }

    /// Copies the built directory to `destination` (holes kept) and points the copy at its own
    /// data file; the backing file is relative, so it needs nothing.
    func copy(_ directory: String, to destination: String) throws -> String {
        try Tools.check("cp", ["-a", "--sparse=always", directory, destination])
        let image = destination + "/disk.qcow2"
        if dataFileRaw != nil {
            try Tools.check("qemu-img", ["amend", "-f", "qcow2", "-o", "data_file=\(destination)/disk.data", image])
        }
        return image
    }
}
