import BlockDevice
import NBDProtocol

/// Checks a request against the export and the session before anything
/// touches the device, as nbdkit's validate_request does. Pure.
/// Returns nil when the request may run, else the error and why.
func validate(_ r: Request, size: UInt64, session: Session) -> (NBDError, String)? {
    let flags = session.flags
    let allowed: CommandFlags
    switch r.command {
    case .read:
        allowed = session.structuredReplies ? [.dontFragment] : []
    case .write:
        // With extended headers a WRITE must say its payload length (spec: NBD_CMD_FLAG_PAYLOAD_LEN).
        if session.extendedHeaders && !r.flags.contains(.payloadLength) {
            return (.invalid, "write without NBD_CMD_FLAG_PAYLOAD_LEN under extended headers")
        }
        var a: CommandFlags = flags.contains(.sendFUA) ? [.fua] : []
        if session.extendedHeaders { a.insert(.payloadLength) }
        allowed = a
    case .trim:
        guard flags.contains(.sendTrim) || flags.contains(.readOnly) else { return (.invalid, "trim not supported") }
        allowed = flags.contains(.sendFUA) ? [.fua] : []
    case .writeZeroes:
        guard flags.contains(.sendWriteZeroes) || flags.contains(.readOnly) else {
            return (.invalid, "write zeroes not supported")
        }
        var a: CommandFlags = [.noHole]
        if flags.contains(.sendFUA) { a.insert(.fua) }
        if flags.contains(.sendFastZero) { a.insert(.fastZero) }
        allowed = a
    case .flush:
        guard flags.contains(.sendFlush) else { return (.invalid, "flush not supported") }
        guard r.offset == 0, r.length == 0 else { return (.invalid, "flush with non-zero offset or length") }
        allowed = []
    case .cache:
        guard flags.contains(.sendCache) else { return (.invalid, "cache not supported") }
        allowed = []
    case .blockStatus:
        guard !session.metaContexts.isEmpty else { return (.invalid, "no metadata context was negotiated") }
        allowed = [.requestOne]
    case .disconnect:
        allowed = []
    default:
        return (.invalid, "unknown command \(r.command)")
    }
    guard allowed.isSuperset(of: r.flags) else {
        return (.invalid, "flags 0x\(String(r.flags.rawValue, radix: 16)) not valid for \(r.command)")
    }
    if r.command.modifiesData && flags.contains(.readOnly) { return (.permission, "export is read-only") }
    guard r.command != .flush, r.command != .disconnect else { return nil }
    if (r.command == .read || r.command == .write) && r.length > UInt64(Limits.maxPayload) {
        return (.invalid, "length \(r.length) exceeds the maximum payload \(Limits.maxPayload)")
    }
    guard r.length > 0 else { return (.invalid, "zero length") }
    // Written so that offset + length cannot overflow.
    guard r.offset <= size, r.length <= size - r.offset else {
        let error: NBDError = (r.command == .write || r.command == .writeZeroes) ? .noSpace : .invalid
        return (error, "range \(r.offset)+\(r.length) is beyond the end of the export (\(size))")
    }
    return nil
}

/// The only map from device failures to wire errors.
func nbdError(for error: DeviceError) -> NBDError {
    switch error.kind {
    case .io: .io
    case .readOnly: .permission
    case .noSpace: .noSpace
    case .invalid: .invalid
    case .notSupported: .notSupported
    case .noMemory: .noMemory
    }
}
