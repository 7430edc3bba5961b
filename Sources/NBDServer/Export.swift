import BlockDevice
import NBDProtocol

/// One exported device and what the server says about it.
public struct Export: Sendable {
    public var name: String
    public var description: String
    public var device: any BlockDevice
    public var readOnly: Bool
    /// Offer the `qemu:allocation-depth` context, as `qemu-nbd -A` does.
    public var exposeAllocationDepth: Bool
    /// Persistent dirty bitmaps offered as `qemu:dirty-bitmap:NAME` contexts, as `qemu-nbd -B NAME`.
    public var dirtyBitmaps: [String]
    /// Advertise NBD_FLAG_CAN_MULTI_CONN. Only worth it when the server takes
    /// more than one client at a time: with `-e 1` a client opening several
    /// connections (nbdcopy) would wait forever for the second (qemu-nbd does the same).
    public var allowMultiConn: Bool

    public init(name: String, description: String = "", device: any BlockDevice, readOnly: Bool,
                exposeAllocationDepth: Bool = false, dirtyBitmaps: [String] = [], allowMultiConn: Bool = true) {
        self.name = name
        self.description = description
        self.device = device
        self.readOnly = readOnly || !device.capabilities.canWrite
        self.exposeAllocationDepth = exposeAllocationDepth
        self.dirtyBitmaps = dirtyBitmaps
        self.allowMultiConn = allowMultiConn
    }

    /// The metadata contexts this export offers. IDs depend only on the
    /// export's configuration, so they stay the same for every client.
    var metaContexts: [MetaContext] {
        var contexts: [MetaContext] = [.baseAllocation]
        if exposeAllocationDepth { contexts.append(.allocationDepth) }
        for (index, name) in dirtyBitmaps.enumerated() {
            contexts.append(.dirtyBitmap(name, id: MetaContext.firstBitmapID + UInt32(index)))
        }
        return contexts
    }
}

/// A metadata context for NBD_CMD_BLOCK_STATUS, with the ID the server gives it.
public struct MetaContext: Sendable, Hashable {
    public enum Kind: Sendable, Hashable {
        case baseAllocation
        case allocationDepth
        /// A persistent dirty bitmap of the image, by its name there.
        case dirtyBitmap(String)
    }
    public let kind: Kind
    /// The context ID sent in NBD_REP_META_CONTEXT and block status chunks.
    public let rawValue: UInt32

    public static let baseAllocation = MetaContext(kind: .baseAllocation, rawValue: 1)
    public static let allocationDepth = MetaContext(kind: .allocationDepth, rawValue: 2)
    static let firstBitmapID: UInt32 = 3
    public static func dirtyBitmap(_ name: String, id: UInt32) -> MetaContext {
        MetaContext(kind: .dirtyBitmap(name), rawValue: id)
    }

    public var name: String {
        switch kind {
        case .baseAllocation: "base:allocation"
        case .allocationDepth: "qemu:allocation-depth"
        case .dirtyBitmap(let bitmap): "qemu:dirty-bitmap:" + bitmap
        }
    }
}

extension TransmissionFlags {
    /// The flags of an export, derived in one place from what its device can do.
    /// DF is announced only with structured replies, as the spec requires.
    public init(capabilities c: DeviceCapabilities, readOnly: Bool, multiConn: Bool = true, structuredReplies: Bool) {
        self = [.hasFlags, .sendFlush, .sendFUA, .sendCache]
        if readOnly {
            insert(.readOnly)
        } else {
            if c.canTrim { insert(.sendTrim) }
            if c.canZero { insert(.sendWriteZeroes) }
            if c.canZero && c.canFastZero { insert(.sendFastZero) }
        }
        if !c.canFlush { remove(.sendFlush) }
        if !c.canFUA || readOnly { remove(.sendFUA) }
        if !c.canCache { remove(.sendCache) }
        if c.canMultiConn && multiConn { insert(.canMultiConn) }
        if c.isRotational { insert(.rotational) }
        if structuredReplies { insert(.sendDF) }
    }
}
