import Dispatch
import Glibc

/// SIGTERM and SIGINT stop the server cleanly, SIGHUP reopens the log
/// file, and SIGPIPE is ignored so a vanished client is an error return,
/// not a dead server.
enum SignalHandling {
    static func install(stop: @escaping @Sendable (Int32) -> Void,
                        reopenLog: @escaping @Sendable () -> Void) -> [any DispatchSourceSignal] {
        signal(SIGPIPE, SIG_IGN)
        let handlers: [(Int32, @Sendable () -> Void)] = [
            (SIGTERM, { stop(SIGTERM) }), (SIGINT, { stop(SIGINT) }), (SIGHUP, reopenLog),
        ]
        return handlers.map { number, handler in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler(handler: handler)
            source.resume()
            return source
        }
    }
}
