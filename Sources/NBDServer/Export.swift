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
    /// Advertise NBD_FLAG_CAN_MULTI_CONN. Only worth it when the server takes
    /// more than one client at a time: with `-e 1` a client opening several
    /// connections (nbdcopy) would wait forever for the second (qemu-nbd does the same).
    public var allowMultiConn: Bool

    public init(name: String, description: String = "", device: any BlockDevice, readOnly: Bool,
                exposeAllocationDepth: Bool = false, allowMultiConn: Bool = true) {
        self.name = name
        self.description = description
        self.device = device
        self.readOnly = readOnly || !device.capabilities.canWrite
        self.exposeAllocationDepth = exposeAllocationDepth
        self.allowMultiConn = allowMultiConn
    }

    /// The metadata contexts this export offers.
    var metaContexts: [MetaContext] { exposeAllocationDepth ? [.baseAllocation, .allocationDepth] : [.baseAllocation] }
}

/// A metadata context for NBD_CMD_BLOCK_STATUS. The raw value is its ID.
public enum MetaContext: UInt32, Sendable, CaseIterable {
    case baseAllocation = 1
    case allocationDepth = 2

    public var name: String {
        switch self {
        case .baseAllocation: "base:allocation"
        case .allocationDepth: "qemu:allocation-depth"
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
