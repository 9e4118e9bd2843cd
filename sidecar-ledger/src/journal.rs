//! The journal: every charge, listed with filters and keyset paging, exported as CSV, and
//! summed up per service.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use paystile_protocol::ledger_api::{
    BuyerSpend, ChargeOrder, ChargePage, ChargeQuery, ChargeStatus, ChargeView, SeriesBucket,
    SeriesQuery, ServiceList, ServiceSeries, ServiceSummary, SummaryQuery, TokenSpend, TopSpenders,
    TopSpendersQuery,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::domain::UnixMillis;
use crate::ledger::{Ledger, LedgerError, charge_view, check_id, rfc3339_millis};
use crate::store::{ChargeFilter, ServiceTotals, ServiceWindow, SettlementStatus, SpendWindow};

/// A page's size when the query names none.
pub const DEFAULT_LIMIT: u32 = 100;
/// The largest page.
pub const MAX_LIMIT: u32 = 1000;
/// The CSV export's header naming the next page's cursor (JSON pages carry `nextCursor`).
pub const NEXT_CURSOR_HEADER: &str = "x-next-cursor";

impl Ledger {
    /// One page of the charges `query` selects, oldest first. Holds past their TTL are
    /// released first, as reading one charge does: the journal never shows one as held.
    pub async fn charges(&self, query: ChargeQuery) -> Result<ChargePage, LedgerError> {
        for (field, id) in [
            ("tokenId", &query.token_id),
            ("buyerId", &query.buyer_id),
            ("serviceId", &query.service_id),
        ] {
            if let Some(id) = id {
                check_id(field, id)?;
            }
        }
        let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(LedgerError::Invalid(format!("limit must be 1 to {MAX_LIMIT}")));
        }
        let (from, to) = window(query.from.as_deref(), query.to.as_deref())?;
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let filter = ChargeFilter {
            token_id: query.token_id,
            buyer_id: query.buyer_id,
            service_id: query.service_id,
            status: query.status,
            settlement: query.settlement.as_deref().map(settlement_status).transpose()?,
            sandbox: query.sandbox,
            from,
            to,
            after: query.cursor.as_deref().map(decode_cursor).transpose()?,
            newest_first: query.order == Some(ChargeOrder::Desc),
            limit,
        };
        self.release_expired_holds().await?;
        let mut charges = self.store().charges(filter).await?;
        let next_cursor = if charges.len() > limit {
            charges.truncate(limit);
            charges.last().map(|last| encode_cursor(last.created_at, &last.charge_id))
        } else {
            None
        };
        Ok(ChargePage { charges: charges.into_iter().map(charge_view).collect(), next_cursor })
    }

    /// A service's calls, revenue, refusals and upstream error rate in `[from, to)`, in one
    /// book: the live one, or the sandbox one when `query.sandbox`.
    pub async fn service_summary(
        &self,
        service_id: String,
        query: SummaryQuery,
    ) -> Result<ServiceSummary, LedgerError> {
        check_id("serviceId", &service_id)?;
        let (from, to) = window(query.from.as_deref(), query.to.as_deref())?;
        self.release_expired_holds().await?;
        let totals = self
            .store()
            .service_totals(ServiceWindow {
                service_id: service_id.clone(),
                sandbox: query.sandbox,
                from: from.unwrap_or(UnixMillis::MIN),
                to: to.unwrap_or(UnixMillis::MAX),
            })
            .await?;
        let error_rate = if totals.upstream_answered == 0 {
            0.0
        } else {
            totals.upstream_errors as f64 / totals.upstream_answered as f64
        };
        Ok(ServiceSummary {
            service_id,
            from: query.from,
            to: query.to,
            sandbox: query.sandbox,
            calls: totals.calls,
            committed: totals.committed,
            released: totals.released,
            held: totals.held,
            revenue_usdc: totals.revenue,
            refusals: totals.refusals.into_iter().collect(),
            upstream_answered: totals.upstream_answered,
            upstream_errors: totals.upstream_errors,
            error_rate,
        })
    }
}

/// How far back `GET /v1/services` looks for services with charges or refusals.
const SERVICES_SEEN_WITHIN_MS: UnixMillis = 31 * 86_400_000;
/// How long `GET /v1/services` answers from the services it last looked up.
const SERVICES_SEEN_FOR_MS: UnixMillis = 60_000;
/// The top spenders' default and largest count.
const TOP_DEFAULT: u32 = 10;
const TOP_MAX: u32 = 100;

impl Ledger {
    /// The services the ledger sells, and every service with a charge or a refusal in the
    /// last month (the longest series), each once, in byte order. The month's services are
    /// looked up at most once every [`SERVICES_SEEN_FOR_MS`]: a console asks on every poll,
    /// and the lookup reads a month of charges.
    pub async fn service_list(&self) -> Result<ServiceList, LedgerError> {
        let now = self.now();
        let cached = self
            .seen_services
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
            .filter(|(at, _)| now.saturating_sub(*at) < SERVICES_SEEN_FOR_MS);
        let mut services = match cached {
            Some((_, services)) => services,
            None => {
                let since = now.saturating_sub(SERVICES_SEEN_WITHIN_MS);
                let seen = self.store().service_ids(since).await?;
                *self.seen_services.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) =
                    Some((now, seen.clone()));
                seen
            }
        };
        services.extend(self.services().iter().cloned());
        services.sort();
        services.dedup();
        Ok(ServiceList { services })
    }

    /// A service's calls, revenue, refusals and upstream errors per bucket of `query`'s
    /// window, which ends with the bucket that holds now (buckets are aligned to UTC).
    pub async fn service_series(
        &self,
        service_id: String,
        query: SeriesQuery,
    ) -> Result<ServiceSeries, LedgerError> {
        check_id("serviceId", &service_id)?;
        let (seconds, count) = query.window.buckets();
        let width = i64::try_from(seconds).unwrap_or(i64::MAX).saturating_mul(1000);
        let to = (self.now().div_euclid(width) + 1).saturating_mul(width);
        let from = to.saturating_sub(width.saturating_mul(i64::from(count)));
        self.release_expired_holds().await?;
        let window =
            ServiceWindow { service_id: service_id.clone(), sandbox: query.sandbox, from, to };
        let mut found = self.store().service_series(window, width).await?.into_iter().peekable();
        let buckets = (0..i64::from(count))
            .map(|bucket| {
                let totals = found
                    .next_if(|(number, _)| *number == bucket)
                    .map(|(_, totals)| totals)
                    .unwrap_or_default();
                series_bucket(from.saturating_add(bucket.saturating_mul(width)), totals)
            })
            .collect();
        Ok(ServiceSeries {
            service_id,
            window: query.window,
            sandbox: query.sandbox,
            bucket_seconds: seconds,
            from: rfc3339_millis(from),
            to: rfc3339_millis(to),
            buckets,
        })
    }

    /// The tokens and the buyers whose committed charges in the window add up to the most.
    pub async fn top_spenders(&self, query: TopSpendersQuery) -> Result<TopSpenders, LedgerError> {
        let limit = query.limit.unwrap_or(TOP_DEFAULT);
        if !(1..=TOP_MAX).contains(&limit) {
            return Err(LedgerError::Invalid(format!("limit must be 1 to {TOP_MAX}")));
        }
        let (from, to) = window(query.from.as_deref(), query.to.as_deref())?;
        let (tokens, buyers) = self
            .store()
            .top_spenders(SpendWindow {
                from: from.unwrap_or(UnixMillis::MIN),
                to: to.unwrap_or(UnixMillis::MAX),
                sandbox: query.sandbox,
                limit: usize::try_from(limit).unwrap_or(usize::MAX),
            })
            .await?;
        Ok(TopSpenders {
            tokens: tokens
                .into_iter()
                .map(|token| TokenSpend {
                    token_id: token.token_id,
                    buyer_id: token.buyer_id,
                    buyer_tag: token.buyer_tag,
                    service_id: token.service_id,
                    spent_usdc: token.spent,
                    calls: token.calls,
                    revoked: token.revoked,
                })
                .collect(),
            buyers: buyers
                .into_iter()
                .map(|(buyer_id, spent_usdc, calls)| BuyerSpend { buyer_id, spent_usdc, calls })
                .collect(),
        })
    }
}

fn series_bucket(start: UnixMillis, totals: ServiceTotals) -> SeriesBucket {
    SeriesBucket {
        start: rfc3339_millis(start),
        calls: totals.calls,
        committed: totals.committed,
        released: totals.released,
        revenue_usdc: totals.revenue,
        refusals: totals.refusals.into_iter().collect(),
        upstream_answered: totals.upstream_answered,
        upstream_errors: totals.upstream_errors,
    }
}

/// A settlement status as the journal's `settlement` filter names it.
fn settlement_status(name: &str) -> Result<SettlementStatus, LedgerError> {
    SettlementStatus::ALL.into_iter().find(|status| status.name() == name).ok_or_else(|| {
        LedgerError::Invalid(
            "settlement must be pending, submitted, settled, failed or void".into(),
        )
    })
}

/// `from` (inclusive) and `to` (exclusive) as Unix ms; `from` must come before `to`. Charges
/// are stamped in whole milliseconds, so each bound becomes the first millisecond at or after
/// it: a charge is at or after the instant exactly when it is at or after that millisecond.
fn window(
    from: Option<&str>,
    to: Option<&str>,
) -> Result<(Option<UnixMillis>, Option<UnixMillis>), LedgerError> {
    let from = from.map(|at| parse_nanos("from", at)).transpose()?;
    let to = to.map(|at| parse_nanos("to", at)).transpose()?;
    if let (Some(from), Some(to)) = (from, to)
        && from >= to
    {
        return Err(LedgerError::Invalid("from must be before to".into()));
    }
    Ok((from.map(ceil_millis), to.map(ceil_millis)))
}

/// An RFC 3339 time as Unix nanoseconds.
fn parse_nanos(field: &str, value: &str) -> Result<i128, LedgerError> {
    let at = OffsetDateTime::parse(value, &Rfc3339).map_err(|_| {
        LedgerError::Invalid(format!(
            "{field} must be an RFC 3339 time such as 2026-01-31T00:00:00Z"
        ))
    })?;
    Ok(at.unix_timestamp_nanos())
}

fn ceil_millis(nanos: i128) -> UnixMillis {
    let millis = nanos.div_euclid(1_000_000) + i128::from(nanos.rem_euclid(1_000_000) != 0);
    // RFC 3339 stops at the year 9999, well inside i64 milliseconds.
    UnixMillis::try_from(millis).unwrap_or(UnixMillis::MAX)
}

/// The cursor after a charge: its keyset, `<created ms>.<charge id>`, in URL-safe base64.
/// Opaque to clients; only its position matters, so a cursor stays valid under any filters.
fn encode_cursor(created_at: UnixMillis, charge_id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{created_at}.{charge_id}"))
}

fn decode_cursor(cursor: &str) -> Result<(UnixMillis, String), LedgerError> {
    let invalid = || LedgerError::Invalid("cursor is not a nextCursor this ledger gave".into());
    let text = URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(invalid)?;
    let (at, id) = text.split_once('.').ok_or_else(invalid)?;
    let at = at.parse().map_err(|_| invalid())?;
    check_id("cursor", id).map_err(|_| invalid())?;
    Ok((at, id.to_owned()))
}

/// The CSV export's columns: `ChargeView`'s fields (`sandbox` as `true` or `false`).
const CSV_HEADER: [&str; 15] = [
    "chargeId",
    "tokenId",
    "buyerId",
    "serviceId",
    "amountUsdc",
    "heldUsdc",
    "status",
    "upstreamStatus",
    "idempotencyKey",
    "createdAt",
    "settledAt",
    "sandbox",
    "settlement",
    "transaction",
    "settlementReason",
];

/// Charges as RFC 4180 CSV: a header line, then a record per charge, CRLF line ends; a field
/// holding a comma, quote, CR or LF is quoted, its quotes doubled. Amounts have 6 decimals.
/// A field a spreadsheet would run as a formula gets a leading `'` (see [`FORMULA_STARTS`]).
pub fn csv(charges: &[ChargeView], header: bool) -> String {
    let mut out = String::new();
    if header {
        push_record(&mut out, CSV_HEADER.iter().copied());
    }
    for charge in charges {
        let status = match charge.status {
            ChargeStatus::Held => "held",
            ChargeStatus::Committed => "committed",
            ChargeStatus::Released => "released",
        };
        let amount = charge.amount_usdc.to_string();
        let held = charge.held_usdc.to_string();
        let upstream = charge.upstream_status.map(|s| s.to_string()).unwrap_or_default();
        let settlement = charge.settlement.as_ref();
        push_record(
            &mut out,
            [
                charge.charge_id.as_str(),
                &charge.token_id,
                &charge.buyer_id,
                &charge.service_id,
                &amount,
                &held,
                status,
                &upstream,
                charge.idempotency_key.as_deref().unwrap_or_default(),
                &charge.created_at,
                charge.settled_at.as_deref().unwrap_or_default(),
                if charge.sandbox { "true" } else { "false" },
                settlement.map(|s| s.status.as_str()).unwrap_or_default(),
                settlement.and_then(|s| s.transaction.as_deref()).unwrap_or_default(),
                settlement.and_then(|s| s.reason.as_deref()).unwrap_or_default(),
            ]
            .into_iter(),
        );
    }
    out
}

/// What a spreadsheet reads as the start of a formula (OWASP's CSV injection list). Ids and
/// Idempotency-Keys are client-chosen text, so an export opened in a spreadsheet must not run
/// them; amounts and times never start with one.
const FORMULA_STARTS: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

fn push_record<'a>(out: &mut String, fields: impl Iterator<Item = &'a str>) {
    for (i, field) in fields.enumerate() {
        if i > 0 {
            out.push(',');
        }
        let defused;
        let field = if field.starts_with(FORMULA_STARTS) {
            defused = format!("'{field}");
            defused.as_str()
        } else {
            field
        };
        if field.contains([',', '"', '\r', '\n']) {
            out.push('"');
            out.push_str(&field.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(field);
        }
    }
    out.push_str("\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let cursor = encode_cursor(1_700_000_000_123, "ch_00ff");
        assert_eq!(decode_cursor(&cursor).unwrap(), (1_700_000_000_123, "ch_00ff".to_owned()));
        for bad in ["", "!!!", &URL_SAFE_NO_PAD.encode("123"), &URL_SAFE_NO_PAD.encode("x.ch_1")] {
            assert!(decode_cursor(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bounds_round_up_to_the_first_whole_millisecond() {
        assert_eq!(ceil_millis(1_000_000), 1);
        assert_eq!(ceil_millis(1_000_001), 2);
        assert_eq!(ceil_millis(0), 0);
        assert_eq!(ceil_millis(-1), 0);
        assert_eq!(ceil_millis(-1_000_001), -1);
    }

    #[test]
    fn csv_quotes_what_rfc_4180_requires() {
        let mut out = String::new();
        push_record(&mut out, ["plain", "a,b", "say \"hi\"", "two\nlines", ""].into_iter());
        assert_eq!(out, "plain,\"a,b\",\"say \"\"hi\"\"\",\"two\nlines\",\r\n");
    }

    #[test]
    fn csv_defuses_what_a_spreadsheet_would_run() {
        let mut out = String::new();
        let fields = ["=1+2", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "a=b", "=x,y"];
        push_record(&mut out, fields.into_iter());
        assert_eq!(out, "'=1+2,'+1,'-1,'@SUM(A1),'\tx,\"'\rx\",a=b,\"'=x,y\"\r\n");
    }
}
