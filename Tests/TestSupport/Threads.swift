import Foundation
import SystemIO

/// Runs `body(0..<count)` on threads of their own that all start together.
/// `DispatchQueue.concurrentPerform` runs only as many iterations at once as
/// there are cores, in order, so on two cores a race test's readers could
/// start after its writers had finished; here every role waits until all are
/// running.
public func runTogether(_ count: Int, _ body: @escaping @Sendable (Int) -> Void) {
    final class Gate: @unchecked Sendable {
        let lock = ConditionLock()
        var arrived = 0  // guarded by lock
    }
    let gate = Gate()
    let group = DispatchGroup()
    for role in 0..<count {
        group.enter()
        Thread {
            defer { group.leave() }
            gate.lock.withLock {
                gate.arrived += 1
                if gate.arrived == count { gate.lock.broadcast() }
                while gate.arrived < count { gate.lock.wait() }
            }
            body(role)
        }.start()
    }
    group.wait()
}
