import BlockDevice
import SystemIO

// MARK: - Mapping

extension QCOW2Device {
    /// The run of like clusters at virtual `offset`, at most `limit` bytes,
    /// never crossing an L2 table.
    func run(at offset: UInt64, limit: UInt64) throws(DeviceError) -> (Mapping, UInt64) {
        let g = geometry
        let within = offset % g.bytesPerL2
        let length = min(limit, g.bytesPerL2 - within)
        guard let table = try activeL2(l1Index: Int(offset / g.bytesPerL2))?.table else { return (.unallocated, length) }
        return table.run(at: within, limit: length, geometry: g)
    }

    func loadL2Table(at offset: UInt64, l1Index: UInt64) throws(DeviceError) -> L2Table {
        let clusterSize = geometry.clusterSize
        try requireInImage(offset, length: clusterSize, what: "L2 table for L1 entry \(l1Index)")
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(clusterSize), alignment: 8)
        defer { buffer.deallocate() }
        do throws(Errno) {
            try file.read(into: buffer, at: offset)
        } catch {
            throw .system(error, "reading qcow2 L2 table at \(offset)")
        }
        return L2Table(bytes: UnsafeRawBufferPointer(buffer))
    }

    /// Throws unless `length` bytes at `offset` start within the image file.
    /// The cached file size is refreshed before giving up, as writers may
    /// have grown the file.
    func requireInImage(_ offset: UInt64, length: UInt64, what: String) throws(DeviceError) {
        if offset < imageFileSize.load(ordering: .relaxed) { return }
        if let current = try? file.size() {
            imageFileSize.store(current, ordering: .relaxed)
            if offset < current { return }
        }
        throw .corruption("\(what) at offset \(offset) is beyond the end of the image file")
    }
}

// MARK: - Reading

extension QCOW2Device {
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DeviceError) {
        guard offset <= size, UInt64(buffer.count) <= size - offset else {
            throw DeviceError(.invalid, "read of \(buffer.count) bytes at \(offset) is past the end of the disk")
        }
        // A read whose clusters were moved by a concurrent write starts over (see `pin`).
        for _ in 0..<64 where try readOnce(into: buffer, at: offset) { return }
        throw DeviceError(.io, "qcow2: the clusters of a read at \(offset) kept moving under concurrent writes")
    }

    /// Reads once; returns false if a cluster was moved before it could be read.
    private func readOnce(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DeviceError) -> Bool {
        // Host-contiguous data runs are gathered and read with one pread.
        var pendingHost: UInt64 = 0, pendingStart = 0, pendingLength = 0
        var position = 0
        while position < buffer.count {
            let guest = offset + UInt64(position)
            let (mapping, length64) = try run(at: guest, limit: UInt64(buffer.count - position))
            let length = Int(length64)
            let target = UnsafeMutableRawBufferPointer(rebasing: buffer[position..<position + length])
            if case .data(let host) = mapping {
                if pendingLength > 0 && pendingStart + pendingLength == position
                    && host == pendingHost + UInt64(pendingLength) {
                    pendingLength += length
                } else {
                    guard try readData(into: buffer, from: pendingStart, count: pendingLength, host: pendingHost,
                                       guest: offset + UInt64(pendingStart)) else { return false }
                    (pendingHost, pendingStart, pendingLength) = (host, position, length)
                }
                position += length
                continue
            }
            switch mapping {
            case .unallocated:
                try readBacking(into: target, at: guest)
            case .zero:
                target.initializeMemory(as: UInt8.self, repeating: 0)
            case .compressed(let host, let compressedLength):
                guard try readCompressed(into: target, guestOffset: guest, host: host,
                                         compressedLength: compressedLength) else { return false }
            case .invalid(let reason):
                throw .corruption("at virtual offset \(guest): \(reason)")
            case .data:
                break
            }
            position += length
        }
        return try readData(into: buffer, from: pendingStart, count: pendingLength, host: pendingHost,
                            guest: offset + UInt64(pendingStart))
    }

    /// On a writable image, keeps `length` bytes at `host` from being freed and
    /// reused until `unpin`, then checks that `guest` still maps there (for
    /// compressed data, that its cluster still is that compressed cluster).
    /// Returns false, unpinned, if the mapping changed meanwhile: a write
    /// moved the data, and reading `host` could return another range's bytes.
    /// Writers update the L2 entry before freeing what it pointed to, and the
    /// allocator skips pinned ranges, so a mapping seen after pinning stays
    /// readable until unpinned.
    private func pin(host: UInt64, length: UInt64, guest: UInt64, compressed: Bool) throws(DeviceError) -> Bool {
        guard writable, dataFile == nil else { return true }
        hostRanges.pin(host..<host + length)
        var still = true
        if compressed {
            if case .compressed(let now, _) = try run(at: guest, limit: 1).0 { still = now == host } else { still = false }
        } else {
            var position: UInt64 = 0
            while still && position < length {
                let (mapping, n) = try run(at: guest + position, limit: length - position)
                if case .data(let now) = mapping, now == host + position { position += n } else { still = false }
            }
        }
        if !still { unpin(host: host, length: length) }
        return still
    }

    private func unpin(host: UInt64, length: UInt64) {
        guard writable else { return }
        hostRanges.unpin(host..<host + length)
    }

    private func readData(into buffer: UnsafeMutableRawBufferPointer, from start: Int, count: Int,
                          host: UInt64, guest: UInt64) throws(DeviceError) -> Bool {
        guard count > 0 else { return true }
        let target = UnsafeMutableRawBufferPointer(rebasing: buffer[start..<start + count])
        if let dataFile {
            // External data files may be sparse and shorter than the disk.
            do throws(Errno) { try dataFile.read(into: target, at: host, zeroFillPastEOF: true) } catch {
                throw .system(error, "reading qcow2 external data file at \(host)")
            }
            return true
        }
        try requireInImage(host, length: UInt64(count), what: "data cluster")
        guard try pin(host: host, length: UInt64(count), guest: guest, compressed: false) else { return false }
        defer { unpin(host: host, length: UInt64(count)) }
        do throws(Errno) { try file.read(into: target, at: host, zeroFillPastEOF: true) } catch {
            throw .system(error, "reading qcow2 data at \(host)")
        }
        return true
    }

    /// Reads from the backing file, with zeros past its end or when there is none.
    func readBacking(into target: UnsafeMutableRawBufferPointer, at guest: UInt64) throws(DeviceError) {
        guard let backing, guest < backing.size else {
            target.initializeMemory(as: UInt8.self, repeating: 0)
            return
        }
        let available = Int(min(UInt64(target.count), backing.size - guest))
        try backing.read(into: UnsafeMutableRawBufferPointer(rebasing: target[..<available]), at: guest)
        if available < target.count {
            UnsafeMutableRawBufferPointer(rebasing: target[available...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    /// Decompresses the cluster holding `guestOffset` and copies the part `target` wants.
    /// Buffers are allocated per compressed cluster only; a request covering the
    /// whole cluster is decompressed straight into the caller's buffer.
    private func readCompressed(into target: UnsafeMutableRawBufferPointer, guestOffset: UInt64, host: UInt64,
                                compressedLength: Int) throws(DeviceError) -> Bool {
        let clusterSize = Int(geometry.clusterSize)
        let intoCluster = Int(guestOffset & (geometry.clusterSize - 1))
        try requireInImage(host, length: UInt64(compressedLength), what: "compressed cluster")
        guard try pin(host: host, length: UInt64(compressedLength), guest: guestOffset, compressed: true) else {
            return false
        }
        defer { unpin(host: host, length: UInt64(compressedLength)) }
        let input = UnsafeMutableRawBufferPointer.allocate(byteCount: compressedLength, alignment: 8)
        defer { input.deallocate() }
        do throws(Errno) {
            // The last compressed cluster may end inside the file's final sector.
            try file.read(into: input, at: host, zeroFillPastEOF: true)
        } catch {
            throw .system(error, "reading qcow2 compressed cluster at \(host)")
        }
        let whole = intoCluster == 0 && target.count == clusterSize
        let output = whole ? target : UnsafeMutableRawBufferPointer.allocate(byteCount: clusterSize, alignment: 8)
        defer { if !whole { output.deallocate() } }
        guard Decompression.decompress(UnsafeRawBufferPointer(input), into: output, type: header.compressionType) else {
            throw DeviceError(.io, "qcow2: cannot decompress the \(header.compressionType) cluster at host offset \(host)")
        }
        if !whole {
            target.copyMemory(from: UnsafeRawBufferPointer(rebasing: output[intoCluster..<intoCluster + target.count]))
        }
        return true
    }
}

// MARK: - Allocation status

extension QCOW2Device {
    /// Most extents one call returns; the caller asks again from where it stopped.
    static let maximumExtents = 65536

    /// Allocation as qemu-nbd reports base:allocation (qemu's
    /// blockstatus_to_extents over the whole chain): `hole` means "not data"
    /// and `zero` means "reads as zeros". Data and compressed clusters are
    /// data (`[]`); zero clusters are `[.hole, .zero]`, as qemu reports them
    /// without BDRV_BLOCK_DATA; unallocated ranges take the backing file's
    /// extents, and are `[.hole, .zero]` past its end or with no backing.
    /// Like qemu, a data cluster whose host range is a hole in the image file
    /// (as after preallocation=metadata) is reported `[.zero]`: data that reads
    /// as zeros. Checked against qemu-nbd + nbdinfo --map in QemuNBDMapTests.
    public func extents(at offset: UInt64, length: UInt64) throws(DeviceError) -> [Extent] {
        let end = offset + min(length, size - min(offset, size))
        var result: [Extent] = []
        var position = offset
        while position < end && result.count < QCOW2Device.maximumExtents {
            let (mapping, runLength) = try run(at: position, limit: end - position)
            switch mapping {
            case .data(let host):
                try appendDataExtents(to: &result, host: host, length: runLength)
            case .compressed:
                result.appendMerging(Extent(length: runLength, flags: []))
            case .zero:
                result.appendMerging(Extent(length: runLength, flags: [.hole, .zero]))
            case .unallocated:
                try appendBackingExtents(to: &result, at: position, length: runLength)
            case .invalid(let reason):
                throw .corruption("at virtual offset \(position): \(reason)")
            }
            position += runLength
        }
        return result
    }

    /// Data at `host`: `[]`, or `[.zero]` where the image file has a hole.
    /// External data files are not probed: qemu-nbd reports their clusters as plain data.
    private func appendDataExtents(to result: inout [Extent], host: UInt64, length: UInt64) throws(DeviceError) {
        guard dataFile == nil else {
            result.appendMerging(Extent(length: length, flags: []))
            return
        }
        let handle = file
        var position = host
        let end = host + length
        while position < end {
            let next: UInt64?
            do throws(Errno) { next = try handle.nextData(from: position) } catch {
                // No SEEK_DATA here (or it failed): report plain data, which is never wrong.
                result.appendMerging(Extent(length: end - position, flags: []))
                return
            }
            guard let data = next else {  // only a hole remains
                result.appendMerging(Extent(length: end - position, flags: [.zero]))
                return
            }
            if data > position {
                let n = min(data, end) - position
                result.appendMerging(Extent(length: n, flags: [.zero]))
                position += n
                continue
            }
            let hole = (try? handle.nextHole(from: position)) ?? end
            let n = hole > position ? min(hole, end) - position : end - position
            result.appendMerging(Extent(length: n, flags: []))
            position += n
        }
    }

    private func appendBackingExtents(to result: inout [Extent], at offset: UInt64, length: UInt64) throws(DeviceError) {
        var position = offset
        let end = offset + length
        if let backing {
            let backingEnd = min(end, backing.size)
            while position < backingEnd {
                let extents = try backing.extents(at: position, length: backingEnd - position)
                guard !extents.isEmpty else { break }
                for extent in extents {
                    let n = min(extent.length, backingEnd - position)
                    result.appendMerging(Extent(length: n, flags: extent.flags))
                    position += n
                }
            }
        }
        if position < end {
            result.appendMerging(Extent(length: end - position, flags: [.hole, .zero]))
        }
    }

    /// Allocation depth as qemu-nbd -A reports qemu:allocation-depth: 1 where
    /// this image defines the data (data, compressed or zero clusters), the
    /// backing file's depth plus one where it does, 0 nowhere. A raw backing
    /// file counts as allocated everywhere, even past its end, as in qemu.
    public func allocationDepth(at offset: UInt64, length: UInt64) throws(DeviceError) -> [DepthExtent] {
        let end = offset + min(length, size - min(offset, size))
        var result: [DepthExtent] = []
        var position = offset
        func append(_ length: UInt64, _ depth: UInt32) {
            guard length > 0 else { return }
            if let last = result.last, last.depth == depth { result[result.count - 1].length += length }
            else { result.append(DepthExtent(length: length, depth: depth)) }
        }
        while position < end && result.count < QCOW2Device.maximumExtents {
            let (mapping, runLength) = try run(at: position, limit: end - position)
            switch mapping {
            case .data, .compressed, .zero:
                append(runLength, 1)
            case .invalid(let reason):
                throw .corruption("at virtual offset \(position): \(reason)")
            case .unallocated:
                if let backing = backing as? QCOW2Device {
                    var p = position
                    let backingEnd = min(position + runLength, backing.size)
                    while p < backingEnd {
                        let depths = try backing.allocationDepth(at: p, length: backingEnd - p)
                        guard !depths.isEmpty else { break }
                        for d in depths {
                            let n = min(d.length, backingEnd - p)
                            append(n, d.depth == 0 ? 0 : d.depth + 1)
                            p += n
                        }
                    }
                    append(position + runLength - p, 0)
                } else {
                    append(runLength, backing == nil ? 0 : 2)
                }
            }
            position += runLength
        }
        return result
    }

    /// Asks the kernel to read ahead the host ranges holding the range's data.
    public func cache(at offset: UInt64, length: UInt64) throws(DeviceError) {
        let end = offset + min(length, size - min(offset, size))
        var position = offset
        while position < end {
            let (mapping, n) = try run(at: position, limit: end - position)
            switch mapping {
            case .data(let host): (dataFile ?? file).prefetch(at: host, length: n)
            case .compressed(let host, let length): file.prefetch(at: host, length: UInt64(length))
            case .unallocated:
                if let backing, position < backing.size {
                    try backing.cache(at: position, length: min(n, backing.size - position))
                }
            case .zero, .invalid: break
            }
            position += n
        }
    }
}

extension DeviceError {
    /// A failed system call named `what`, mapped by BlockDevice's one errno table.
    static func system(_ errno: Errno, _ what: String) -> DeviceError { DeviceError(errno: errno, what) }
}
