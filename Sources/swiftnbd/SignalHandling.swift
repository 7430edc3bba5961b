import Dispatch
import Foundation

/// SIGTERM and SIGINT stop the server cleanly; SIGPIPE is ignored so a
/// vanished client is an error return, not a dead server.
enum SignalHandling {
    static func install(_ handler: @escaping @Sendable (Int32) -> Void) -> [any DispatchSourceSignal] {
        signal(SIGPIPE, SIG_IGN)
        return [SIGTERM, SIGINT].map { number in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler { handler(number) }
            source.resume()
            return source
        }
    }
}
