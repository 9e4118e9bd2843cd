//! The filter's metrics, as the host's metrics calls report them: Envoy shows each as
//! `wasmcustom.<name>` in `/stats` (and `envoy_wasmcustom_<name>` in `/stats/prometheus`),
//! Kong 3.8+ through its metrics API. Counters are shared by every worker's VM and add up;
//! a gauge is set by each VM from its tick, so with several workers it shows the last VM's
//! value (`settle_queued − settle_answered − settle_dropped` is the whole gateway's queue).
//!
//! Only counters are incremented and only gauges recorded: ngx_wasm_module traps on an
//! increment of a gauge.

use paystile_protocol::ErrorCode;

/// A counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Calls answered billably and committed.
    Paid,
    /// Calls held and then released (not billable, or the client went away).
    Released,
    /// Calls the gateway answered itself, by the code of its answer.
    Refused(ErrorCode),
    /// Ledger calls that got no answer or a server error.
    LedgerErrors,
    /// Ledger calls that timed out.
    LedgerTimeouts,
    /// Settlements queued, answered by the ledger, and dropped (refused as invalid or
    /// malformed, or pushed out of a full queue).
    SettleQueued,
    SettleAnswered,
    SettleDropped,
    PrefetchAdded,
    PrefetchGone,
}

/// A gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gauge {
    /// Settlements waiting or in flight in this VM, for every ledger.
    SettleQueue,
    /// Holds prefetched in this VM and waiting for a call.
    PrefetchedHolds,
}

/// The codes of the answers the gateway makes itself.
pub const REFUSALS: [ErrorCode; 14] = [
    ErrorCode::PaymentRequired,
    ErrorCode::InvalidCredential,
    ErrorCode::TokenExpired,
    ErrorCode::WrongService,
    ErrorCode::TokenRevoked,
    ErrorCode::TokenLimitExceeded,
    ErrorCode::InsufficientBalance,
    ErrorCode::DailyLimitExceeded,
    ErrorCode::InvalidPreimage,
    ErrorCode::InvalidIdempotencyKey,
    ErrorCode::IdempotencyKeyMismatch,
    ErrorCode::IdempotencyKeyInUse,
    ErrorCode::IdempotencyKeyExhausted,
    ErrorCode::LedgerUnavailable,
];

impl Counter {
    /// Every counter, each defined once per VM.
    pub fn all() -> Vec<Counter> {
        let mut all = vec![
            Counter::Paid,
            Counter::Released,
            Counter::LedgerErrors,
            Counter::LedgerTimeouts,
            Counter::SettleQueued,
            Counter::SettleAnswered,
            Counter::SettleDropped,
            Counter::PrefetchAdded,
            Counter::PrefetchGone,
        ];
        all.extend(REFUSALS.map(Counter::Refused));
        all
    }

    pub fn name(self) -> String {
        let name = match self {
            Counter::Paid => "paid",
            Counter::Released => "released",
            Counter::Refused(code) => return format!("paystile_refused_{}", code_name(code)),
            Counter::LedgerErrors => "ledger_errors",
            Counter::LedgerTimeouts => "ledger_timeouts",
            Counter::SettleQueued => "settle_queued",
            Counter::SettleAnswered => "settle_answered",
            Counter::SettleDropped => "settle_dropped",
            Counter::PrefetchAdded => "prefetch_added",
            Counter::PrefetchGone => "prefetch_gone",
        };
        format!("paystile_{name}")
    }
}

impl Gauge {
    pub const ALL: [Gauge; 2] = [Gauge::SettleQueue, Gauge::PrefetchedHolds];

    pub fn name(self) -> &'static str {
        match self {
            Gauge::SettleQueue => "paystile_settle_queue",
            Gauge::PrefetchedHolds => "paystile_prefetched_holds",
        }
    }
}

/// `token_limit_exceeded` for [`ErrorCode::TokenLimitExceeded`]: the code as the wire has it.
fn code_name(code: ErrorCode) -> String {
    match serde_json::to_value(code) {
        Ok(serde_json::Value::String(name)) => name,
        _ => format!("{code:?}"),
    }
}

/// What a ledger call's answer says of the ledger: a status of `None` is no answer at all.
/// Envoy answers a dispatch that timed out with 504; Kong with no answer.
pub fn ledger_trouble(status: Option<u16>) -> Option<Counter> {
    match status {
        Some(504) => Some(Counter::LedgerTimeouts),
        None | Some(500..) => Some(Counter::LedgerErrors),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_carry_the_wire_codes() {
        let mut names: Vec<String> = Counter::all().into_iter().map(Counter::name).collect();
        names.extend(Gauge::ALL.map(|g| g.name().to_owned()));
        assert!(names.contains(&"paystile_refused_token_limit_exceeded".to_owned()));
        assert!(names.contains(&"paystile_paid".to_owned()));
        let count = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), count, "two metrics share a name");
        assert!(names.iter().all(|n| n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
    }

    #[test]
    fn timeouts_and_errors_are_told_apart() {
        assert_eq!(ledger_trouble(Some(504)), Some(Counter::LedgerTimeouts));
        assert_eq!(ledger_trouble(None), Some(Counter::LedgerErrors));
        assert_eq!(ledger_trouble(Some(503)), Some(Counter::LedgerErrors));
        assert_eq!(ledger_trouble(Some(402)), None);
        assert_eq!(ledger_trouble(Some(200)), None);
    }
}
