//! x402 settlement: each payment whose call was charged is transferred on chain, by a
//! durable job in the books (`x402_payments`). A job is taken by one worker at a time (a
//! lease, so that ledgers sharing a database never run one twice), retried with backoff
//! while the chain or the facilitator cannot be reached, and ends `settled` or `failed`
//! with the reason, which the journal shows on the charge.
//!
//! `direct` signs one transaction per payment and keeps it before sending it: a retry sends
//! the same transaction again, never a second one.

mod direct;
mod facilitator;

use std::time::Duration;

use paystile_protocol::credential::{self, Credential};
use paystile_protocol::x402::{B256, Offer, Payment};

use crate::ledger::now_millis;
use crate::settings::{SettlementSettings, X402Settings};
use crate::store::{SettlementJob, SettlementStatus, SettlementUpdate, Store, StoreError};
use direct::{Direct, Mined};
use facilitator::{Facilitator, Settled};

/// How often payments nobody was charged for are looked for, to void them.
const VOID_EVERY: Duration = Duration::from_secs(60);
/// How soon a sent transaction's receipt is looked for again.
const RECEIPT_POLL: Duration = Duration::from_millis(250);
/// How often a settlement the ledger waits for is looked at again.
const SETTLE_NOW_POLL: Duration = Duration::from_millis(100);
/// Settlements taken per round.
const PER_ROUND: usize = 16;
/// How long a worker holds a job it took: longer than any attempt takes.
const LEASE: Duration = Duration::from_secs(120);
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long after its authorization expired a sent transaction is still waited for: a
/// transaction mined later would have reverted.
const MINING_GRACE_SECONDS: u64 = 600;

/// Why a payment was not settled now.
#[derive(Debug)]
pub enum Unsettled {
    /// It never will be: the reason.
    Refused(String),
    /// It could not be within the time given (a node or facilitator that does not answer,
    /// a transaction not mined yet): the reason.
    Unavailable(String),
}

/// Why an attempt did not settle.
#[derive(Debug)]
pub enum Trouble {
    /// It may succeed later (no answer, a node or facilitator in trouble).
    Retry(String),
    /// It never will (the transfer reverts, the facilitator refuses): the reason.
    Final(String),
}

enum Backend {
    Direct(Direct),
    Facilitator(Facilitator),
}

pub struct Settlements {
    store: Store,
    backend: Backend,
}

impl Settlements {
    pub async fn new(store: Store, x402: &X402Settings) -> anyhow::Result<Settlements> {
        let backend = match &x402.settlement {
            SettlementSettings::Direct { rpc_url, settler_key } => {
                let direct = Direct::new(rpc_url, settler_key, &x402.offer)?;
                check_chain(&direct, &x402.offer).await?;
                tracing::info!(settler = %direct.settler(), "x402 settlement: direct");
                Backend::Direct(direct)
            }
            SettlementSettings::Facilitator { url } => {
                tracing::info!("x402 settlement: facilitator");
                Backend::Facilitator(Facilitator::new(url, &x402.offer)?)
            }
        };
        Ok(Settlements { store, backend })
    }

    /// Runs rounds every `every`, for as long as the ledger runs, and voids the payments
    /// nobody was charged for every [`VOID_EVERY`].
    pub async fn run(self: std::sync::Arc<Self>, every: Duration) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut voided_at = tokio::time::Instant::now();
        loop {
            ticks.tick().await;
            if voided_at.elapsed() >= VOID_EVERY {
                voided_at = tokio::time::Instant::now();
                let now = now_millis();
                let valid_until = u64::try_from(now / 1000).unwrap_or(0);
                match self.store.void_unused_payments(valid_until, now).await {
                    Ok(0) => {}
                    Ok(voided) => {
                        tracing::debug!(voided, "x402 payments nobody was charged for are void")
                    }
                    Err(e) => tracing::error!(error = %e, "cannot void unused x402 payments"),
                }
            }
            if let Err(e) = self.round().await {
                tracing::error!(error = %e, "x402 settlement round failed");
            }
        }
    }

    /// Attempts the settlements that are due; answers how many were attempted.
    pub async fn round(&self) -> Result<usize, StoreError> {
        let now = now_millis();
        let mut jobs = self.store.due_settlements(now, PER_ROUND).await?;
        tracing::trace!(due = jobs.len(), "x402 settlements due");
        // Sent transactions first: one signed now must not take the nonce of one sent before.
        jobs.sort_by_key(|job| job.status != SettlementStatus::Submitted);
        let mut attempted = 0;
        for job in jobs {
            // Leased from now: the attempts before it in this round took their time.
            let claimed_at = now_millis();
            let lease = claimed_at.saturating_add(millis(LEASE));
            if !self.store.claim_settlement(&job, claimed_at, lease).await? {
                continue;
            }
            attempted += 1;
            let update = self.attempt(&job).await?;
            match update.status {
                SettlementStatus::Settled => tracing::info!(
                    token_id = %job.token_id, transaction = ?update.tx_hash, "x402 payment settled"
                ),
                SettlementStatus::Failed => tracing::warn!(
                    token_id = %job.token_id, reason = ?update.reason, "x402 payment will not settle"
                ),
                _ => tracing::debug!(
                    token_id = %job.token_id, reason = ?update.reason, "x402 settlement retried later"
                ),
            }
            self.store.update_settlement(job.token_id.clone(), update, now_millis()).await?;
        }
        Ok(attempted)
    }

    /// Settles the payment `token_id` now (`settle: before`, top-ups): attempts until it is
    /// settled (its transaction) or failed, or `within` has passed. A payment whose
    /// settlement is final already (settled for another use, failed, void) is not settled
    /// again. Past `within`, a transaction already sent is followed by the rounds.
    pub async fn settle_now(&self, token_id: &str, within: Duration) -> Result<String, Unsettled> {
        let deadline = tokio::time::Instant::now() + within;
        let books = |e: StoreError| Unsettled::Unavailable(format!("the books failed: {e}"));
        let mut first_look = true;
        loop {
            let job = self.store.settlement_job(token_id.to_owned()).await.map_err(books)?;
            let Some(job) = job else {
                return Err(Unsettled::Refused("the payment was not recorded".into()));
            };
            // Final at the first look: settled (or not) for another use. Final later: this
            // call's attempt, or a round (rounds follow every sent transaction), finished it.
            let first = std::mem::replace(&mut first_look, false);
            match job.status {
                SettlementStatus::Pending | SettlementStatus::Submitted => {}
                SettlementStatus::Settled if !first => return Ok(job.tx_hash.unwrap_or_default()),
                SettlementStatus::Settled => {
                    return Err(Unsettled::Refused("it was settled before".into()));
                }
                SettlementStatus::Failed | SettlementStatus::Void if !first => {
                    return Err(Unsettled::Refused(job.reason.unwrap_or_else(|| "failed".into())));
                }
                SettlementStatus::Failed | SettlementStatus::Void => {
                    return Err(Unsettled::Refused("it did not settle before".into()));
                }
            }
            let now = now_millis();
            let lease = now.saturating_add(millis(LEASE));
            if self.store.claim_settlement(&job, now, lease).await.map_err(books)? {
                let update = self.attempt(&job).await.map_err(books)?;
                let done =
                    matches!(update.status, SettlementStatus::Settled | SettlementStatus::Failed);
                let written =
                    self.store.update_settlement(token_id.to_owned(), update, now_millis());
                written.await.map_err(books)?;
                // Its final state is answered by the next look, as a round's would be.
                if done {
                    continue;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Unsettled::Unavailable("not confirmed in time".into()));
            }
            tokio::time::sleep(SETTLE_NOW_POLL).await;
        }
    }

    /// One attempt at `job`: its new state.
    async fn attempt(&self, job: &SettlementJob) -> Result<SettlementUpdate, StoreError> {
        let Some((header, payment)) = read_payment(&job.payment) else {
            return Ok(failed(job, "the recorded payment cannot be read".into(), None));
        };
        let now_seconds = u64::try_from(now_millis() / 1000).unwrap_or(0);
        let expired = now_seconds >= job.valid_before;
        match (&self.backend, job.status) {
            (_, SettlementStatus::Pending) if expired => Ok(failed(
                job,
                "the authorization expired (validBefore) before its charge was settled".into(),
                None,
            )),
            (Backend::Direct(direct), SettlementStatus::Pending) => {
                let nonce = direct.exclusive().await;
                let signed = match direct.sign(&payment).await {
                    Ok(signed) => signed,
                    Err(trouble) => return Ok(after(job, trouble, None, None)),
                };
                let tx_hash = Some(signed.hash.to_string());
                let raw_tx = Some(hex::encode(&signed.raw));
                // Kept before it is sent: whatever happens next, it is this one that is sent.
                let submitted = later(job, tx_hash, raw_tx, LEASE, None);
                self.store.update_settlement(job.token_id.clone(), submitted, now_millis()).await?;
                if let Err(trouble) = direct.send(&signed.raw).await {
                    tracing::debug!(?trouble, "sending the settlement");
                }
                drop(nonce);
                Ok(mined(direct, job, &payment, signed.hash, &signed.raw).await)
            }
            (Backend::Direct(direct), _) => {
                let hash = job.tx_hash.as_deref().and_then(|h| h.parse::<B256>().ok());
                let raw = job.raw_tx.as_deref().and_then(|r| hex::decode(r).ok());
                let (Some(hash), Some(raw)) = (hash, raw) else {
                    return Ok(failed(job, "the recorded transaction cannot be read".into(), None));
                };
                Ok(mined(direct, job, &payment, hash, &raw).await)
            }
            (Backend::Facilitator(facilitator), _) => {
                match facilitator.settle(header.as_bytes(), &payment).await {
                    Ok(Settled::Confirmed(tx)) => Ok(settled(job, tx)),
                    Ok(Settled::Pending(tx)) => {
                        let wait = backoff(job.attempts.saturating_add(1));
                        Ok(later(job, Some(tx), None, wait, Some("settlement_pending".into())))
                    }
                    Err(trouble) => Ok(after(job, trouble, job.tx_hash.clone(), None)),
                }
            }
        }
    }
}

/// A sent transaction's fate: settled, failed, or sent again and looked at later.
async fn mined(
    direct: &Direct,
    job: &SettlementJob,
    payment: &Payment,
    hash: B256,
    raw: &[u8],
) -> SettlementUpdate {
    let tx_hash = Some(hash.to_string());
    match direct.mined(hash, payment).await {
        Ok(Mined::Transferred) => settled(job, hash.to_string()),
        Ok(Mined::Reverted(reason)) => failed(job, reason, tx_hash),
        Ok(Mined::NotYet) => {
            let now_seconds = u64::try_from(now_millis() / 1000).unwrap_or(0);
            if now_seconds > job.valid_before.saturating_add(MINING_GRACE_SECONDS) {
                let reason = "the transaction was not mined before the authorization expired";
                return failed(job, reason.into(), tx_hash);
            }
            // Sent again: the node may have lost it. The same bytes, the same hash.
            if let Err(trouble) = direct.send(raw).await {
                tracing::debug!(?trouble, "sending the settlement again");
            }
            let reason = Some("waiting for the transaction to be mined".into());
            later(job, tx_hash, Some(hex::encode(raw)), RECEIPT_POLL, reason)
        }
        Err(trouble) => after(job, trouble, tx_hash, Some(hex::encode(raw))),
    }
}

/// The state after an attempt at `job` that did not settle: retried after the backoff (in
/// the state it was in, with its transaction if one was sent), or failed.
fn after(
    job: &SettlementJob,
    trouble: Trouble,
    tx_hash: Option<String>,
    raw_tx: Option<String>,
) -> SettlementUpdate {
    match trouble {
        Trouble::Final(reason) => failed(job, reason, tx_hash),
        Trouble::Retry(reason) => {
            let wait = backoff(job.attempts.saturating_add(1));
            later(job, tx_hash, raw_tx, wait, Some(reason))
        }
    }
}

/// `job` settled by the transaction `tx_hash`.
fn settled(job: &SettlementJob, tx_hash: String) -> SettlementUpdate {
    final_state(job, SettlementStatus::Settled, Some(tx_hash), None)
}

/// `job` will never settle: `reason`.
fn failed(job: &SettlementJob, reason: String, tx_hash: Option<String>) -> SettlementUpdate {
    final_state(job, SettlementStatus::Failed, tx_hash, Some(reason))
}

fn final_state(
    job: &SettlementJob,
    status: SettlementStatus,
    tx_hash: Option<String>,
    reason: Option<String>,
) -> SettlementUpdate {
    SettlementUpdate {
        status,
        tx_hash,
        raw_tx: None,
        attempts: job.attempts.saturating_add(1),
        next_attempt_at: now_millis(),
        reason,
    }
}

/// `job` attempted again after `wait`: submitted when a transaction was sent (`tx_hash`,
/// and the signed bytes a direct settlement sends again), else still pending.
fn later(
    job: &SettlementJob,
    tx_hash: Option<String>,
    raw_tx: Option<String>,
    wait: Duration,
    reason: Option<String>,
) -> SettlementUpdate {
    let status =
        if tx_hash.is_some() { SettlementStatus::Submitted } else { SettlementStatus::Pending };
    SettlementUpdate {
        status,
        tx_hash,
        raw_tx,
        attempts: job.attempts.saturating_add(1),
        next_attempt_at: now_millis().saturating_add(millis(wait)),
        reason,
    }
}

/// The payment a job settles, from the credential its gateway presented: the header's
/// value, and the payment it reads as.
fn read_payment(presented: &str) -> Option<(String, Payment)> {
    match credential::parse_authorization(presented.as_bytes()) {
        Ok(Some(Credential::X402 { version, payment })) => {
            let decoded = Payment::decode(payment, version).ok()?;
            Some((String::from_utf8_lossy(payment).into_owned(), decoded))
        }
        _ => None,
    }
}

/// Half a second, doubled with each attempt, at most [`MAX_BACKOFF`].
fn backoff(attempts: u32) -> Duration {
    Duration::from_millis(500).saturating_mul(1 << attempts.min(16)).min(MAX_BACKOFF)
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Refuses an RPC URL that serves another chain than the offer's: every settlement would
/// fail (or, worse, go to a token of the same address elsewhere). One that cannot be
/// reached yet is waited for.
async fn check_chain(direct: &Direct, offer: &Offer) -> anyhow::Result<()> {
    match direct.chain_id().await {
        Ok(id) if id == offer.chain_id => Ok(()),
        Ok(id) => anyhow::bail!(
            "x402_rpc_url serves chain {id}, and x402_network is chain {}",
            offer.chain_id
        ),
        Err(trouble) => {
            tracing::warn!(?trouble, "cannot reach x402_rpc_url yet; settlements wait for it");
            Ok(())
        }
    }
}
