//! The sandbox invoice backend: a regtest "node" inside the ledger, for demos and tests.
//!
//! It signs real, checksummed BOLT11 invoices (`lnbcrt…`) with a node key, and "pays" one of
//! them on request by handing out its preimage. Nothing is stored: the preimage is an HMAC of
//! the invoice's payment secret under a key derived from the L402 secret, so the node can pay
//! its invoices after a restart and refuses every invoice it did not sign.

use std::str::FromStr;
use std::time::SystemTime;

use bitcoin::hashes::{Hash, sha256};
use bitcoin::secp256k1::{PublicKey, Secp256k1, SecretKey, SignOnly};
use hmac::{Hmac, KeyInit, Mac};
use lightning_invoice::{Bolt11Invoice, Currency, InvoiceBuilder, PaymentSecret};
use sha2::{Digest, Sha256};

use super::{Invoice, InvoiceError, InvoiceRequest};

/// Blocks the payee needs for the final hop; the BOLT11 default is 18.
const MIN_FINAL_CLTV_EXPIRY_DELTA: u64 = 18;

pub struct SandboxNode {
    /// Made once: a new context costs as much as the signature it is made for.
    secp: Secp256k1<SignOnly>,
    node_key: SecretKey,
    node_id: PublicKey,
    preimage_key: [u8; 32],
}

/// Why the sandbox will not pay an invoice.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SandboxPayError {
    #[error("not a BOLT11 invoice: {0}")]
    NotAnInvoice(String),
    #[error("not an invoice of this sandbox ledger")]
    NotOurs,
    #[error("invoice expired")]
    Expired,
}

impl SandboxNode {
    pub fn new(l402_secret: &[u8]) -> Result<SandboxNode, InvoiceError> {
        // A 32-byte HMAC is a valid secp256k1 key except with probability ~2^-128; the
        // counter tries the next one in that case.
        let node_key = (0..=u8::MAX)
            .find_map(|n| SecretKey::from_slice(&derive(l402_secret, b"sandbox node key", n)).ok())
            .ok_or_else(|| InvoiceError::BadAnswer("no usable sandbox node key".into()))?;
        let secp = Secp256k1::signing_only();
        Ok(SandboxNode {
            node_id: PublicKey::from_secret_key(&secp, &node_key),
            secp,
            node_key,
            preimage_key: derive(l402_secret, b"sandbox preimages", 0),
        })
    }

    /// The node's public key: the payee every sandbox invoice names.
    pub fn node_id(&self) -> PublicKey {
        self.node_id
    }

    pub fn create(&self, request: &InvoiceRequest) -> Result<Invoice, InvoiceError> {
        let payment_secret: [u8; 32] = rand::random();
        let preimage = self.preimage(&payment_secret);
        let payment_hash: [u8; 32] = Sha256::digest(preimage).into();
        let invoice = InvoiceBuilder::new(Currency::Regtest)
            .description(request.memo.clone())
            .payment_hash(sha256::Hash::from_byte_array(payment_hash))
            .payment_secret(PaymentSecret(payment_secret))
            .timestamp(SystemTime::now())
            .min_final_cltv_expiry_delta(MIN_FINAL_CLTV_EXPIRY_DELTA)
            .amount_milli_satoshis(request.amount_msat)
            .expiry_time(request.expiry)
            .build_signed(|message| self.secp.sign_ecdsa_recoverable(message, &self.node_key))
            .map_err(|e| InvoiceError::BadAnswer(format!("cannot build the invoice: {e}")))?;
        Ok(Invoice { payment_hash, bolt11: invoice.to_string() })
    }

    /// "Pays" `bolt11`: the preimage, if this node issued the invoice and it has not expired.
    pub fn pay(&self, bolt11: &str) -> Result<[u8; 32], SandboxPayError> {
        let invoice = Bolt11Invoice::from_str(bolt11.trim())
            .map_err(|e| SandboxPayError::NotAnInvoice(e.to_string()))?;
        if invoice.currency() != Currency::Regtest
            || invoice.recover_payee_pub_key() != self.node_id
        {
            return Err(SandboxPayError::NotOurs);
        }
        let preimage = self.preimage(&invoice.payment_secret().0);
        if Sha256::digest(preimage).as_slice() != invoice.payment_hash().as_byte_array() {
            return Err(SandboxPayError::NotOurs);
        }
        if invoice.is_expired() {
            return Err(SandboxPayError::Expired);
        }
        Ok(preimage)
    }

    fn preimage(&self, payment_secret: &[u8; 32]) -> [u8; 32] {
        hmac(&self.preimage_key, payment_secret)
    }
}

/// A key for one purpose, derived from the L402 secret (domain-separated from root keys,
/// which are HMACs of 32-byte token ids).
fn derive(secret: &[u8], purpose: &[u8], counter: u8) -> [u8; 32] {
    hmac(secret, &[b"paystile ", purpose, &[counter]].concat())
}

fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(key).unwrap_or_else(|_| Hmac::new(&Default::default()));
    mac.update(message);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn request() -> InvoiceRequest {
        InvoiceRequest {
            amount_msat: 1_500_000,
            memo: "paystile sandbox".into(),
            expiry: Duration::from_secs(600),
        }
    }

    #[test]
    fn invoices_are_regtest_signed_and_carry_the_amount() {
        let node = SandboxNode::new(b"secret secret secret secret secret").unwrap();
        let invoice = node.create(&request()).unwrap();
        assert!(invoice.bolt11.starts_with("lnbcrt15u1"), "{}", invoice.bolt11);
        let parsed = Bolt11Invoice::from_str(&invoice.bolt11).unwrap();
        parsed.check_signature().unwrap();
        assert_eq!(parsed.amount_milli_satoshis(), Some(1_500_000));
        assert_eq!(parsed.recover_payee_pub_key(), node.node_id());
        assert_eq!(parsed.payment_hash().as_byte_array(), &invoice.payment_hash);
        assert_eq!(parsed.expiry_time(), Duration::from_secs(600));
    }

    #[test]
    fn pays_its_own_invoices_after_a_restart_and_no_others() {
        let node = SandboxNode::new(b"secret secret secret secret secret").unwrap();
        let invoice = node.create(&request()).unwrap();
        let restarted = SandboxNode::new(b"secret secret secret secret secret").unwrap();
        let preimage = restarted.pay(&invoice.bolt11).unwrap();
        assert_eq!(<[u8; 32]>::from(Sha256::digest(preimage)), invoice.payment_hash);

        let stranger = SandboxNode::new(b"another secret another secret!!!").unwrap();
        assert_eq!(stranger.pay(&invoice.bolt11), Err(SandboxPayError::NotOurs));
        assert!(matches!(node.pay("lnbcrt1garbage"), Err(SandboxPayError::NotAnInvoice(_))));
        let mut flipped = invoice.bolt11.clone();
        flipped.replace_range(20..21, if &flipped[20..21] == "q" { "p" } else { "q" });
        assert!(node.pay(&flipped).is_err(), "a changed character breaks the checksum");
    }

    #[test]
    fn expired_invoices_are_not_paid() {
        let node = SandboxNode::new(b"secret secret secret secret secret").unwrap();
        let invoice =
            node.create(&InvoiceRequest { expiry: Duration::from_secs(0), ..request() }).unwrap();
        // BOLT11 timestamps are whole seconds, so a zero expiry has passed at once.
        assert_eq!(node.pay(&invoice.bolt11), Err(SandboxPayError::Expired));
    }
}
