//! The journal's queries, shared by both stores: the charge list's SQL is built here once so
//! that SQLite and PostgreSQL filter and order alike.

use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::ChargeStatus;

use super::sql::{self, Columns, charge_columns, charges_joined};
use super::{SettlementStatus, StoreError, UnixMillis, status_name};

/// Which charges to list: every filter given must match. Oldest (or newest) first, by
/// `created_at`, then `charge_id` in byte order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargeFilter {
    pub token_id: Option<String>,
    pub buyer_id: Option<String>,
    pub service_id: Option<String>,
    pub status: Option<ChargeStatus>,
    /// Only charges paid with x402 whose settlement is in this state.
    pub settlement: Option<SettlementStatus>,
    /// Only the sandbox book (`Some(true)`) or only the live one (`Some(false)`).
    pub sandbox: Option<bool>,
    /// Inclusive.
    pub from: Option<UnixMillis>,
    /// Exclusive.
    pub to: Option<UnixMillis>,
    /// Only charges after this one (its creation time and id) in `newest_first`'s order:
    /// the keyset of the last page.
    pub after: Option<(UnixMillis, String)>,
    /// Newest first instead of oldest first.
    pub newest_first: bool,
    pub limit: usize,
}

/// A service's charges and refusals created in `[from, to)`, in one book (live or sandbox).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceWindow {
    pub service_id: String,
    pub sandbox: bool,
    pub from: UnixMillis,
    pub to: UnixMillis,
}

/// What a store counts for a [`ServiceWindow`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceTotals {
    pub calls: u64,
    pub committed: u64,
    pub released: u64,
    pub held: u64,
    pub revenue: Usdc,
    pub upstream_answered: u64,
    pub upstream_errors: u64,
    /// Refusal counts by error code, in code order.
    pub refusals: Vec<(String, u64)>,
}

/// A bound parameter of a built statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Param {
    Text(String),
    Int(i64),
    Bool(bool),
}

/// The SQL dialect's differences that matter here.
pub(super) struct Dialect {
    /// The placeholder of the n-th parameter (from 1).
    pub placeholder: fn(usize) -> String,
    /// Appended to `charge_id` where it is compared or ordered: byte order.
    pub byte_order: &'static str,
}

/// The columns of a charge both stores read, in this order, and where they come from.
const CHARGE_COLUMNS: &str = charge_columns!();
const CHARGES_JOINED: &str = charges_joined!();

/// The statement listing `filter`'s charges (at most `limit + 1` rows: the extra one says
/// whether another page follows), and its parameters.
pub(super) fn charges_query(filter: &ChargeFilter, dialect: &Dialect) -> (String, Vec<Param>) {
    let mut conditions = Vec::new();
    let mut params = Vec::new();
    let bind = |param: Param, params: &mut Vec<Param>| {
        params.push(param);
        (dialect.placeholder)(params.len())
    };
    let text_filters = [
        ("c.token_id", &filter.token_id),
        ("t.buyer_id", &filter.buyer_id),
        ("c.service_id", &filter.service_id),
    ];
    for (column, value) in text_filters {
        if let Some(value) = value {
            let p = bind(Param::Text(value.clone()), &mut params);
            conditions.push(format!("{column} = {p}"));
        }
    }
    if let Some(status) = filter.status {
        let p = bind(Param::Text(status_name(status).to_owned()), &mut params);
        conditions.push(format!("c.status = {p}"));
    }
    if let Some(settlement) = filter.settlement {
        let p = bind(Param::Text(settlement.name().to_owned()), &mut params);
        conditions.push(format!("p.status = {p}"));
    }
    if let Some(sandbox) = filter.sandbox {
        let p = bind(Param::Bool(sandbox), &mut params);
        conditions.push(format!("t.sandbox = {p}"));
    }
    if let Some(from) = filter.from {
        let p = bind(Param::Int(from), &mut params);
        conditions.push(format!("c.created_at >= {p}"));
    }
    if let Some(to) = filter.to {
        let p = bind(Param::Int(to), &mut params);
        conditions.push(format!("c.created_at < {p}"));
    }
    let order = dialect.byte_order;
    let (past, direction) = if filter.newest_first { ("<", " DESC") } else { (">", "") };
    if let Some((at, id)) = &filter.after {
        let at = bind(Param::Int(*at), &mut params);
        let id = bind(Param::Text(id.clone()), &mut params);
        conditions.push(format!("(c.created_at, c.charge_id{order}) {past} ({at}, {id})"));
    }
    let limit = bind(
        Param::Int(i64::try_from(filter.limit).unwrap_or(i64::MAX).saturating_add(1)),
        &mut params,
    );
    let conditions = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    let sql = format!(
        "SELECT {CHARGE_COLUMNS} FROM {CHARGES_JOINED} \
         {conditions} ORDER BY c.created_at{direction}, c.charge_id{order}{direction} LIMIT {limit}"
    );
    (sql, params)
}

/// What [`totals`] reads of a service's charges, from `charges c JOIN tokens t`: `calls,
/// committed, released, held, revenue (micro-USDC: what the commits charged, not what they
/// held), upstream answered, upstream 5xx`.
// CAST: PostgreSQL sums BIGINTs as NUMERIC.
const TOTALS_COLUMNS: &str = "count(*),
    count(*) FILTER (WHERE c.status = 'committed'),
    count(*) FILTER (WHERE c.status = 'released'),
    count(*) FILTER (WHERE c.status = 'held'),
    CAST(coalesce(sum(c.committed_micros) FILTER (WHERE c.status = 'committed'), 0) AS BIGINT),
    count(c.upstream_status),
    count(*) FILTER (WHERE c.upstream_status BETWEEN 500 AND 599)";

/// A service's charge counts in a window and book ([`TOTALS_COLUMNS`]). Parameters: service
/// id, from, to, sandbox.
pub(super) fn totals_query(dialect: &Dialect) -> String {
    let p = dialect.placeholder;
    format!(
        "SELECT {TOTALS_COLUMNS}
         FROM charges c JOIN tokens t ON t.token_id = c.token_id
         WHERE c.service_id = {} AND c.created_at >= {} AND c.created_at < {} AND t.sandbox = {}",
        p(1),
        p(2),
        p(3),
        p(4)
    )
}

/// A service's charge counts per bucket: the bucket's number (from 0 at `from`), then
/// [`TOTALS_COLUMNS`]; buckets without charges are left out. Parameters: from, the bucket's
/// width (ms), service id, to, sandbox.
pub(super) fn series_query(dialect: &Dialect) -> String {
    let p = dialect.placeholder;
    format!(
        "SELECT (c.created_at - {from}) / {width}, {TOTALS_COLUMNS}
         FROM charges c JOIN tokens t ON t.token_id = c.token_id
         WHERE c.service_id = {service} AND c.created_at >= {from} AND c.created_at < {to}
           AND t.sandbox = {sandbox}
         GROUP BY 1 ORDER BY 1",
        from = p(1),
        width = p(2),
        service = p(3),
        to = p(4),
        sandbox = p(5),
    )
}

/// A service's refusals per bucket and code: bucket, code, count. Parameters as
/// [`series_query`]'s.
pub(super) fn series_refusals_query(dialect: &Dialect) -> String {
    let p = dialect.placeholder;
    format!(
        "SELECT (created_at - {from}) / {width}, code, count(*) FROM refusals
         WHERE service_id = {service} AND created_at >= {from} AND created_at < {to}
           AND sandbox = {sandbox}
         GROUP BY 1, 2 ORDER BY 1, 2",
        from = p(1),
        width = p(2),
        service = p(3),
        to = p(4),
        sandbox = p(5),
    )
}

/// One bucket's row of [`series_query`]: its number and totals (refusals apart).
pub(super) fn bucket_totals(row: &impl Columns) -> Result<(i64, ServiceTotals), StoreError> {
    let counts = |i| sql::count(row, i);
    Ok((
        row.int(0)?,
        ServiceTotals {
            calls: counts(1)?,
            committed: counts(2)?,
            released: counts(3)?,
            held: counts(4)?,
            revenue: sql::usdc(row, 5)?,
            upstream_answered: counts(6)?,
            upstream_errors: counts(7)?,
            refusals: Vec::new(),
        },
    ))
}

/// The services with a charge or a refusal since `$1`.
pub(super) const SERVICE_IDS: &str = "SELECT service_id FROM charges WHERE created_at >= $1
    UNION SELECT service_id FROM refusals WHERE created_at >= $1";

/// Committed charges in `[from, to)` of one book, the most spent first: the top spenders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpendWindow {
    pub from: UnixMillis,
    pub to: UnixMillis,
    pub sandbox: bool,
    pub limit: usize,
}

/// A token's committed spend in a [`SpendWindow`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSpendRecord {
    pub token_id: String,
    pub buyer_id: String,
    pub buyer_tag: Option<String>,
    pub service_id: Option<String>,
    pub spent: Usdc,
    pub calls: u64,
    pub revoked: bool,
}

/// The spenders that spent most in a window: `columns` of `tokens t`, grouped by `key`, then
/// what their committed charges add up to and how many there are; most spent first, ties by
/// `key` in byte order. Parameters: from, to, sandbox, limit.
fn top_spenders_query(dialect: &Dialect, columns: &str, key: &str) -> String {
    let (p, order) = (dialect.placeholder, dialect.byte_order);
    let spent = columns.split(',').count() + 1;
    format!(
        "SELECT {columns}, CAST(sum(c.committed_micros) AS BIGINT), count(*)
         FROM charges c JOIN tokens t ON t.token_id = c.token_id
         WHERE c.status = 'committed' AND c.created_at >= {} AND c.created_at < {}
           AND t.sandbox = {}
         GROUP BY {key}
         ORDER BY {spent} DESC, {key}{order} LIMIT {}",
        p(1),
        p(2),
        p(3),
        p(4)
    )
}

/// The tokens that spent most: token, buyer, tag, service, revoked, spent, calls.
pub(super) fn top_tokens_query(dialect: &Dialect) -> String {
    let columns = "t.token_id, t.buyer_id, t.buyer_tag, t.service_id, t.revoked_at IS NOT NULL";
    top_spenders_query(dialect, columns, "t.token_id")
}

pub(super) fn token_spend(row: &impl Columns) -> Result<TokenSpendRecord, StoreError> {
    Ok(TokenSpendRecord {
        token_id: row.text(0)?,
        buyer_id: row.text(1)?,
        buyer_tag: row.opt_text(2)?,
        service_id: row.opt_text(3)?,
        revoked: row.flag(4)?,
        spent: sql::usdc(row, 5)?,
        calls: sql::count(row, 6)?,
    })
}

/// The buyers that spent most: buyer, spent, calls.
pub(super) fn top_buyers_query(dialect: &Dialect) -> String {
    top_spenders_query(dialect, "t.buyer_id", "t.buyer_id")
}

pub(super) fn buyer_spend(row: &impl Columns) -> Result<(String, Usdc, u64), StoreError> {
    Ok((row.text(0)?, sql::usdc(row, 1)?, sql::count(row, 2)?))
}

/// The totals as [`totals_query`] selects them, with the `refusals` read apart.
pub(super) fn totals(
    row: &impl Columns,
    refusals: Vec<(String, u64)>,
) -> Result<ServiceTotals, StoreError> {
    Ok(ServiceTotals {
        calls: sql::count(row, 0)?,
        committed: sql::count(row, 1)?,
        released: sql::count(row, 2)?,
        held: sql::count(row, 3)?,
        revenue: sql::usdc(row, 4)?,
        upstream_answered: sql::count(row, 5)?,
        upstream_errors: sql::count(row, 6)?,
        refusals,
    })
}

/// A service's refusals by code in a window and book. Parameters: service id, from, to,
/// sandbox.
pub(super) fn refusals_query(dialect: &Dialect) -> String {
    let p = dialect.placeholder;
    format!(
        "SELECT code, count(*) FROM refusals
         WHERE service_id = {} AND created_at >= {} AND created_at < {} AND sandbox = {}
         GROUP BY code ORDER BY code",
        p(1),
        p(2),
        p(3),
        p(4)
    )
}
