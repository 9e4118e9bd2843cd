//! x402: a call paid by a signed USDC transfer. The `exact` scheme on EVM chains: an EIP-3009
//! `TransferWithAuthorization` for the call's price, signed with EIP-712 under the token's
//! domain, in the wire formats of x402 v2 (`PAYMENT-REQUIRED`, `PAYMENT-SIGNATURE`,
//! `PAYMENT-RESPONSE`: base64 JSON headers) and v1 (the 402 body, `X-PAYMENT`,
//! `X-PAYMENT-RESPONSE`); the header names are in [`crate::headers`]. Facts checked against
//! the x402 spec and the `x402` 2.25 Python package: DESIGN.md, "x402".
//!
//! What a gateway can check alone is checked here: the shape, the offer it answers, the
//! amount, the validity window and the signature. What only the chain knows (the payer's
//! balance, whether the nonce is still unused there) is the settlement's to find out.

use alloy_primitives::keccak256;
pub use alloy_primitives::{Address, B256, U256};
use alloy_sol_types::{Eip712Domain, SolCall, SolStruct, SolValue, sol};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
/// A payer's key, as [`sign`] takes it.
pub use k256::ecdsa::SigningKey;
use k256::ecdsa::{RecoveryId, Signature as EcdsaSignature, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

sol! {
    /// EIP-3009's signed message (USDC's `transferWithAuthorization`).
    struct TransferWithAuthorization {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
    }

    /// The token's function that spends it, with a 65-byte signature split (USDC's and the
    /// reference facilitator's form for plain accounts).
    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    );
}

/// The only scheme: the exact price, transferred by an EIP-3009 authorization.
pub const SCHEME_EXACT: &str = "exact";
/// The longest payment header read: a 65-byte signature and an authorization take about
/// 1.5 KB in base64, an echoed v2 offer about as much again.
/// Kept under the ledger's limit on a presented credential with the scheme it is sent under.
pub const MAX_PAYMENT_HEADER_LEN: usize = 8176;
/// Validity an authorization must have left, as the reference facilitator requires: time to
/// settle it.
pub const MIN_VALIDITY_SECONDS: u64 = 6;
/// How far ahead of ours a client's clock may be: it sets `validBefore` to its now plus
/// `maxTimeoutSeconds`, which may be no further ahead than ours plus this.
pub const CLIENT_CLOCK_AHEAD_SECONDS: u64 = 30;

/// What a seller accepts: an EIP-3009 token (USDC, or a sandbox's) on one chain, paid to
/// `pay_to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    pub chain_id: u64,
    /// The token contract: the EIP-712 domain's `verifyingContract`.
    pub asset: Address,
    /// The token's EIP-712 domain name and version ("USD Coin" and "2" for USDC on Base).
    pub name: String,
    pub version: String,
    pub pay_to: Address,
    /// How long an authorization for this offer may stay valid: the `maxTimeoutSeconds`
    /// offered, and the bound on how far ahead `validBefore` may be.
    pub max_timeout_seconds: u64,
}

impl Offer {
    /// CAIP-2, as v2 names networks.
    pub fn network(&self) -> String {
        format!("eip155:{}", self.chain_id)
    }

    /// The v2 requirements for a call of `amount` atomic units (micro-USDC).
    pub fn requirements(&self, amount: u64) -> PaymentRequirements {
        PaymentRequirements {
            scheme: SCHEME_EXACT.into(),
            network: self.network(),
            amount: amount.to_string(),
            asset: self.asset.to_checksum(None),
            pay_to: self.pay_to.to_checksum(None),
            max_timeout_seconds: self.max_timeout_seconds,
            extra: Some(serde_json::json!({"name": self.name, "version": self.version})),
        }
    }

    /// The network as v1 names it: its v1 name where it has one, else CAIP-2.
    pub fn network_v1(&self) -> String {
        v1_network_name(self.chain_id).map_or_else(|| self.network(), str::to_owned)
    }

    /// The v1 form, for clients that read the 402 body: the network by its v1 name where it
    /// has one, else as CAIP-2.
    pub fn requirements_v1(&self, amount: u64, resource: &Resource) -> RequirementsV1 {
        let v2 = self.requirements(amount);
        RequirementsV1 {
            scheme: v2.scheme,
            network: self.network_v1(),
            max_amount_required: v2.amount,
            resource: resource.url.clone(),
            description: resource.description.clone().unwrap_or_default(),
            mime_type: resource.mime_type.clone().unwrap_or_default(),
            pay_to: v2.pay_to,
            max_timeout_seconds: v2.max_timeout_seconds,
            asset: v2.asset,
            extra: v2.extra,
        }
    }

    fn domain(&self) -> Eip712Domain {
        Eip712Domain::new(
            Some(self.name.clone().into()),
            Some(self.version.clone().into()),
            Some(U256::from(self.chain_id)),
            Some(self.asset),
            None,
        )
    }
}

/// `maxTimeoutSeconds` offered unless configured: what the reference servers offer.
pub const DEFAULT_MAX_TIMEOUT_SECONDS: u64 = 60;
/// The longest `maxTimeoutSeconds` a seller may offer: an authorization valid for longer
/// would keep its payment's id (and the chance to settle it) that long.
pub const MAX_MAX_TIMEOUT_SECONDS: u64 = 3600;

/// USDC where x402 clients know it: chain, contract, EIP-712 name and version.
const KNOWN_USDC: [(u64, Address, &str, &str); 2] = [
    (
        8453,
        alloy_primitives::address!("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"),
        "USD Coin",
        "2",
    ),
    (84532, alloy_primitives::address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e"), "USDC", "2"),
];

/// Whether `asset` is USDC on `chain_id` as x402 clients know it (Base, Base Sepolia): a
/// 6-decimal token whose atomic units are micro-USDC.
pub fn is_known_usdc(chain_id: u64, asset: Address) -> bool {
    KNOWN_USDC.iter().any(|(id, usdc, ..)| *id == chain_id && *usdc == asset)
}

/// A seller's offer as its settings state it; the token may be left out on chains where
/// USDC is known (Base, Base Sepolia).
#[derive(Clone, Copy, Debug)]
pub struct OfferSettings<'a> {
    /// CAIP-2 (`eip155:8453`) or a v1 name (`base`).
    pub network: &'a str,
    pub pay_to: &'a str,
    pub asset: Option<&'a str>,
    pub asset_name: Option<&'a str>,
    pub asset_version: Option<&'a str>,
    pub max_timeout_seconds: Option<u64>,
}

/// Settings that make no offer: the field at fault (as the settings name it, `pay_to`) and
/// why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OfferError {
    pub field: &'static str,
    pub message: String,
}

impl Offer {
    /// The offer `settings` describe, checked.
    pub fn from_settings(settings: &OfferSettings<'_>) -> Result<Offer, OfferError> {
        let error = |field, message: &str| OfferError { field, message: message.to_owned() };
        let chain_id = chain_id(settings.network).ok_or_else(|| {
            error(
                "network",
                "must be eip155:<chain id> (eip155:8453 is Base), base or base-sepolia",
            )
        })?;
        let pay_to = address(settings.pay_to, "pay_to")
            .map_err(|_| error("pay_to", "must be an address, 0x and 40 hex digits"))?;
        if pay_to == Address::ZERO {
            return Err(error("pay_to", "must not be the zero address"));
        }
        let known = KNOWN_USDC.iter().find(|(id, ..)| *id == chain_id);
        let asset = match (settings.asset, known) {
            (Some(asset), _) => address(asset, "asset")
                .map_err(|_| error("asset", "must be the token's address, 0x and 40 hex digits"))?,
            (None, Some((_, usdc, ..))) => *usdc,
            (None, None) => {
                return Err(error(
                    "asset",
                    "name the token's address: USDC is known on Base and Base Sepolia only",
                ));
            }
        };
        // USDC's domain where the asset is the known USDC; any other token states its own.
        let known = known.filter(|(_, usdc, ..)| *usdc == asset);
        let name = settings.asset_name.or(known.map(|k| k.2));
        let version = settings.asset_version.or(known.map(|k| k.3));
        let (Some(name), Some(version)) = (name, version) else {
            let field = if name.is_none() { "asset_name" } else { "asset_version" };
            return Err(error(field, "give the token's EIP-712 domain name and version"));
        };
        if name.is_empty() || version.is_empty() {
            return Err(error(
                "asset_name",
                "the EIP-712 domain's name and version are never empty",
            ));
        }
        let max_timeout_seconds =
            settings.max_timeout_seconds.unwrap_or(DEFAULT_MAX_TIMEOUT_SECONDS);
        if !(MIN_VALIDITY_SECONDS * 2..=MAX_MAX_TIMEOUT_SECONDS).contains(&max_timeout_seconds) {
            return Err(OfferError {
                field: "max_timeout_seconds",
                message: format!(
                    "must be between {} and {MAX_MAX_TIMEOUT_SECONDS}",
                    MIN_VALIDITY_SECONDS * 2
                ),
            });
        }
        Ok(Offer {
            chain_id,
            asset,
            name: name.to_owned(),
            version: version.to_owned(),
            pay_to,
            max_timeout_seconds,
        })
    }
}

/// The chains v1 names (the x402 package's v1 table, those of USDC's chains we know).
const V1_NETWORKS: [(&str, u64); 2] = [("base", 8453), ("base-sepolia", 84532)];

fn v1_network_name(chain_id: u64) -> Option<&'static str> {
    V1_NETWORKS.iter().find(|(_, id)| *id == chain_id).map(|(name, _)| *name)
}

/// A network as either version names it: CAIP-2 `eip155:<chain id>`, or a v1 name.
pub fn chain_id(network: &str) -> Option<u64> {
    match network.strip_prefix("eip155:") {
        // Digits only: `u64::from_str` would also take a leading `+`.
        Some(id) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => id.parse().ok(),
        Some(_) => None,
        None => V1_NETWORKS.iter().find(|(name, _)| *name == network).map(|(_, id)| *id),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resource {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
}

/// One way to pay (v2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequirements {
    pub scheme: String,
    pub network: String,
    /// Atomic units of `asset`, in decimal.
    pub amount: String,
    pub asset: String,
    pub pay_to: String,
    pub max_timeout_seconds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Value>,
}

/// One way to pay (v1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequirementsV1 {
    pub scheme: String,
    pub network: String,
    pub max_amount_required: String,
    pub resource: String,
    pub description: String,
    pub mime_type: String,
    pub pay_to: String,
    pub max_timeout_seconds: u64,
    pub asset: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Value>,
}

/// The v2 402: the `PAYMENT-REQUIRED` header's JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequired {
    pub x402_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub resource: Resource,
    pub accepts: Vec<PaymentRequirements>,
}

impl PaymentRequired {
    /// The `PAYMENT-REQUIRED` header's value: standard base64 (padded) of the JSON.
    pub fn header_value(&self) -> String {
        // Serializing strings and integers cannot fail.
        STANDARD.encode(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// The settlement's answer: the `PAYMENT-RESPONSE` (v2) and `X-PAYMENT-RESPONSE` (v1)
/// header's JSON, and a facilitator's `/settle` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettleResponse {
    pub success: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
    /// The transaction hash; empty when none was sent.
    pub transaction: String,
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
}

impl SettleResponse {
    pub fn header_value(&self) -> String {
        STANDARD.encode(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// Which header a payment came in, and so which version answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// `X-PAYMENT`.
    V1,
    /// `PAYMENT-SIGNATURE`.
    V2,
}

/// The `exact` EVM payload, as sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExactPayload {
    /// 65 bytes (r, s, v), `0x`-hex.
    pub signature: String,
    pub authorization: AuthorizationWire,
}

/// The authorization's fields as sent: addresses and `0x`-hex, integers in decimal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationWire {
    pub from: String,
    pub to: String,
    pub value: String,
    pub valid_after: String,
    pub valid_before: String,
    pub nonce: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PayloadV2 {
    x402_version: u32,
    accepted: PaymentRequirements,
    payload: ExactPayload,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PayloadV1 {
    x402_version: u32,
    scheme: String,
    network: String,
    payload: ExactPayload,
}

/// A payment header, read: what it pays with, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payment {
    pub version: Version,
    pub scheme: String,
    pub chain_id: u64,
    /// The offer the client says it accepted (v2 only): its asset and recipient must be
    /// what the gateway offers.
    pub accepted: Option<(Address, Address)>,
    pub authorization: Authorization,
    signature: [u8; 65],
}

/// The signed transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorization {
    pub from: Address,
    pub to: Address,
    pub value: U256,
    pub valid_after: U256,
    pub valid_before: U256,
    pub nonce: B256,
}

/// Why a payment is refused. [`X402Error::reason`] is the x402 name for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum X402Error {
    /// Not base64 JSON of a payment, or a field that does not parse.
    Malformed(&'static str),
    UnsupportedVersion,
    UnsupportedScheme,
    /// No offer on that network (or for that asset or recipient).
    NetworkNotOffered,
    RecipientMismatch,
    ValueMismatch,
    NotYetValid,
    /// Past `validBefore`, or too close to it to settle.
    Expired,
    /// Valid further ahead than the offer's `maxTimeoutSeconds`.
    ValidTooLong,
    /// Not `from`'s signature, or a high-s one.
    InvalidSignature,
}

impl X402Error {
    pub fn reason(&self) -> &'static str {
        match self {
            X402Error::Malformed(_) => "invalid_payload",
            X402Error::UnsupportedVersion => "invalid_x402_version",
            X402Error::UnsupportedScheme => "unsupported_scheme",
            X402Error::NetworkNotOffered => "network_mismatch",
            X402Error::RecipientMismatch => "invalid_exact_evm_payload_recipient_mismatch",
            X402Error::ValueMismatch => "invalid_exact_evm_payload_authorization_value_mismatch",
            X402Error::NotYetValid => "invalid_exact_evm_payload_authorization_valid_after",
            X402Error::Expired | X402Error::ValidTooLong => {
                "invalid_exact_evm_payload_authorization_valid_before"
            }
            X402Error::InvalidSignature => "invalid_exact_evm_payload_signature",
        }
    }
}

impl core::fmt::Display for X402Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            X402Error::Malformed(what) => write!(f, "malformed x402 payment: {what}"),
            X402Error::UnsupportedVersion => f.write_str("x402Version must be 1 or 2"),
            X402Error::UnsupportedScheme => f.write_str("only the exact scheme is accepted"),
            X402Error::NetworkNotOffered => {
                f.write_str("the payment's network, asset or recipient is not offered")
            }
            X402Error::RecipientMismatch => f.write_str("the transfer is not to the payee"),
            X402Error::ValueMismatch => f.write_str("the transfer is not of the price"),
            X402Error::NotYetValid => f.write_str("the authorization is not valid yet"),
            X402Error::Expired => f.write_str("the authorization expires too soon"),
            X402Error::ValidTooLong => {
                f.write_str("the authorization is valid for longer than maxTimeoutSeconds")
            }
            X402Error::InvalidSignature => f.write_str("the signature is not the payer's"),
        }
    }
}

/// Token ids of x402 payments start with this; the rest is the payment id in hex.
pub const TOKEN_ID_PREFIX: &str = "x402_";

/// The ledger's token for a payment: `x402_<payment id, 64 hex>`.
pub fn token_id(payment_id: &B256) -> String {
    format!("{TOKEN_ID_PREFIX}{}", hex::encode(payment_id))
}

/// The ledger's buyer for a payer: `x402_0x<address, lowercase hex>`. Such buyers have no
/// prepaid account: each payment is its own token.
pub fn buyer_id(payer: &Address) -> String {
    format!("{TOKEN_ID_PREFIX}0x{}", hex::encode(payer))
}

/// Whether `token_id` is an x402 payment's.
pub fn is_token_id(token_id: &str) -> bool {
    token_id.strip_prefix(TOKEN_ID_PREFIX).is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Whether [`Payment::check_with`] verifies the signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signature {
    Verify,
    /// The terms only: the shape, offer, amount and window.
    TermsOnly,
}

/// A payment checked against what is offered: who pays, with which offer, under which id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    pub payer: Address,
    /// The index of the offer paid with.
    pub offer: usize,
    /// One authorization's id wherever it is presented: the hash of (chain id, asset,
    /// payer, nonce). The token contract spends each (payer, nonce) once; the ledger keys the
    /// payment by this, so that it pays for one call on one gateway only.
    pub payment_id: B256,
}

impl Payment {
    /// Reads a payment header's value (`PAYMENT-SIGNATURE` for v2, `X-PAYMENT` for v1).
    /// Any bytes are answered: a payment, or why not.
    pub fn decode(value: &[u8], version: Version) -> Result<Payment, X402Error> {
        if value.len() > MAX_PAYMENT_HEADER_LEN {
            return Err(X402Error::Malformed("the header is too long"));
        }
        // The reference clients pad; some encoders do not.
        let json = STANDARD
            .decode(value)
            .or_else(|_| STANDARD_NO_PAD.decode(value))
            .map_err(|_| X402Error::Malformed("the header is not base64"))?;
        let (x402_version, scheme, network, accepted, payload) = match version {
            Version::V2 => {
                let p: PayloadV2 = serde_json::from_slice(&json)
                    .map_err(|_| X402Error::Malformed("not a v2 payment payload"))?;
                let accepted = (
                    address(&p.accepted.asset, "accepted.asset")?,
                    address(&p.accepted.pay_to, "accepted.payTo")?,
                );
                (p.x402_version, p.accepted.scheme, p.accepted.network, Some(accepted), p.payload)
            }
            Version::V1 => {
                let p: PayloadV1 = serde_json::from_slice(&json)
                    .map_err(|_| X402Error::Malformed("not a v1 payment payload"))?;
                (p.x402_version, p.scheme, p.network, None, p.payload)
            }
        };
        let expected = match version {
            Version::V1 => 1,
            Version::V2 => 2,
        };
        if x402_version != expected {
            return Err(X402Error::UnsupportedVersion);
        }
        let chain_id = chain_id(&network).ok_or(X402Error::NetworkNotOffered)?;
        let wire = &payload.authorization;
        let authorization = Authorization {
            from: address(&wire.from, "authorization.from")?,
            to: address(&wire.to, "authorization.to")?,
            value: uint(&wire.value, "authorization.value")?,
            valid_after: uint(&wire.valid_after, "authorization.validAfter")?,
            valid_before: uint(&wire.valid_before, "authorization.validBefore")?,
            nonce: hex_bytes::<32>(&wire.nonce)
                .map(B256::from)
                .ok_or(X402Error::Malformed("authorization.nonce must be 32 bytes of hex"))?,
        };
        let signature = hex_bytes::<65>(&payload.signature)
            .ok_or(X402Error::Malformed("signature must be 65 bytes of hex"))?;
        Ok(Payment { version, scheme, chain_id, accepted, authorization, signature })
    }

    /// Checks the payment for a call of `amount` atomic units against `offers` at `now` (Unix
    /// seconds): the scheme, an offer on its network (in v2, the one with the asset and
    /// recipient it says it accepted; v1 does not say, so each offer on the network is
    /// tried), the recipient, the exact amount, the validity window, and last, the costliest,
    /// the signature. A refusal is the first offer's reason.
    pub fn check(&self, offers: &[Offer], amount: u64, now: u64) -> Result<Checked, X402Error> {
        self.check_with(offers, amount, now, Signature::Verify)
    }

    /// [`Payment::check`] with the signature checked or not: a gateway whose ledger checks
    /// it anyway may leave it out (`from` is then the payer it claims to be).
    pub fn check_with(
        &self,
        offers: &[Offer],
        amount: u64,
        now: u64,
        signature: Signature,
    ) -> Result<Checked, X402Error> {
        if self.scheme != SCHEME_EXACT {
            return Err(X402Error::UnsupportedScheme);
        }
        let mut refusal = None;
        let candidates = offers.iter().enumerate().filter(|(_, offer)| {
            offer.chain_id == self.chain_id
                && self
                    .accepted
                    .is_none_or(|(asset, pay_to)| asset == offer.asset && pay_to == offer.pay_to)
        });
        for (index, offer) in candidates {
            match self.check_offer(offer, amount, now, signature) {
                Ok(payer) => {
                    let payment_id = self.payment_id(offer.asset);
                    return Ok(Checked { payer, offer: index, payment_id });
                }
                Err(error) => {
                    refusal.get_or_insert(error);
                }
            }
        }
        Err(refusal.unwrap_or(X402Error::NetworkNotOffered))
    }

    /// [`Payment::check`] against one offer; answers the payer.
    fn check_offer(
        &self,
        offer: &Offer,
        amount: u64,
        now: u64,
        signature: Signature,
    ) -> Result<Address, X402Error> {
        let auth = &self.authorization;
        if auth.to != offer.pay_to {
            return Err(X402Error::RecipientMismatch);
        }
        if auth.value != U256::from(amount) {
            return Err(X402Error::ValueMismatch);
        }
        // As the reference facilitator: `validAfter` may be now (the token itself wants a
        // block after it; clients send 0, or ten minutes ago).
        if auth.valid_after > U256::from(now) {
            return Err(X402Error::NotYetValid);
        }
        if auth.valid_before < U256::from(now.saturating_add(MIN_VALIDITY_SECONDS)) {
            return Err(X402Error::Expired);
        }
        // Clients count `maxTimeoutSeconds` from their own clock.
        let latest = now
            .saturating_add(offer.max_timeout_seconds)
            .saturating_add(CLIENT_CLOCK_AHEAD_SECONDS);
        if auth.valid_before > U256::from(latest) {
            return Err(X402Error::ValidTooLong);
        }
        if signature == Signature::TermsOnly {
            return Ok(auth.from);
        }
        let digest = self.signed_struct().eip712_signing_hash(&offer.domain());
        if recover(&digest, &self.signature)? != auth.from {
            return Err(X402Error::InvalidSignature);
        }
        Ok(auth.from)
    }

    /// The calldata of the token's `transferWithAuthorization` that settles this payment:
    /// what a settler sends to the asset's contract.
    pub fn transfer_calldata(&self) -> Vec<u8> {
        let auth = &self.authorization;
        let (r, s) = self.signature[..64].split_at(32);
        // v as the contract's ecrecover takes it: 27 or 28.
        let v = match self.signature[64] {
            0 | 1 => self.signature[64] + 27,
            v => v,
        };
        transferWithAuthorizationCall {
            from: auth.from,
            to: auth.to,
            value: auth.value,
            validAfter: auth.valid_after,
            validBefore: auth.valid_before,
            nonce: auth.nonce,
            v,
            r: B256::from_slice(r),
            s: B256::from_slice(s),
        }
        .abi_encode()
    }

    fn signed_struct(&self) -> TransferWithAuthorization {
        let auth = &self.authorization;
        TransferWithAuthorization {
            from: auth.from,
            to: auth.to,
            value: auth.value,
            validAfter: auth.valid_after,
            validBefore: auth.valid_before,
            nonce: auth.nonce,
        }
    }

    fn payment_id(&self, asset: Address) -> B256 {
        let auth = &self.authorization;
        keccak256((U256::from(self.chain_id), asset, auth.from, auth.nonce).abi_encode())
    }
}

/// What a client signs: an `exact` payment of `amount` atomic units under `offer`, valid
/// in `window` (Unix seconds: `validAfter`, `validBefore`), with a fresh random `nonce`.
#[derive(Clone, Copy, Debug)]
pub struct Terms<'a> {
    pub offer: &'a Offer,
    pub amount: u64,
    pub window: (u64, u64),
    pub nonce: B256,
}

/// Signs `terms` with `key`, as an x402 client does: the payment header's value for
/// `version` (`PAYMENT-SIGNATURE` for v2, `X-PAYMENT` for v1).
pub fn sign(key: &SigningKey, terms: &Terms<'_>, version: Version) -> String {
    let offer = terms.offer;
    let authorization = Authorization {
        from: address_of(key.verifying_key()),
        to: offer.pay_to,
        value: U256::from(terms.amount),
        valid_after: U256::from(terms.window.0),
        valid_before: U256::from(terms.window.1),
        nonce: terms.nonce,
    };
    let payment = Payment {
        version,
        scheme: SCHEME_EXACT.into(),
        chain_id: offer.chain_id,
        accepted: Some((offer.asset, offer.pay_to)),
        authorization,
        signature: [0; 65],
    };
    let digest = payment.signed_struct().eip712_signing_hash(&offer.domain());
    let (signature, recovery) = key.sign_prehash_recoverable(digest.as_slice());
    let mut bytes = [0u8; 65];
    bytes[..64].copy_from_slice(&signature.to_bytes());
    bytes[64] = 27 + u8::from(recovery.is_y_odd());
    let auth = &payment.authorization;
    let payload = ExactPayload {
        signature: format!("0x{}", hex::encode(bytes)),
        authorization: AuthorizationWire {
            from: auth.from.to_checksum(None),
            to: auth.to.to_checksum(None),
            value: auth.value.to_string(),
            valid_after: auth.valid_after.to_string(),
            valid_before: auth.valid_before.to_string(),
            nonce: format!("0x{}", hex::encode(auth.nonce)),
        },
    };
    let json = match version {
        Version::V2 => serde_json::json!({
            "x402Version": 2,
            "accepted": offer.requirements(terms.amount),
            "payload": payload,
        }),
        Version::V1 => serde_json::json!({
            "x402Version": 1,
            "scheme": SCHEME_EXACT,
            "network": offer.network_v1(),
            "payload": payload,
        }),
    };
    STANDARD.encode(json.to_string())
}

/// The Ethereum address of `key`: the last 20 bytes of the Keccak of its uncompressed
/// point's x and y.
pub fn address_of(key: &VerifyingKey) -> Address {
    let point = key.to_sec1_point(false);
    Address::from_slice(&keccak256(&point.as_bytes()[1..])[12..])
}

/// The address whose key made `signature` (r, s, v; v 27/28 or 0/1) over `digest`. A high-s
/// signature is refused: its twin with low s is the same signature, and would be another
/// byte string for the same payment.
fn recover(digest: &B256, signature: &[u8; 65]) -> Result<Address, X402Error> {
    let (rs, v) = signature.split_at(64);
    let parity = match v[0] {
        0 | 27 => false,
        1 | 28 => true,
        _ => return Err(X402Error::InvalidSignature),
    };
    let signature = EcdsaSignature::from_slice(rs).map_err(|_| X402Error::InvalidSignature)?;
    if signature.normalize_s() != signature {
        return Err(X402Error::InvalidSignature);
    }
    let id = RecoveryId::new(parity, false);
    let key = VerifyingKey::recover_from_prehash(digest.as_slice(), &signature, id)
        .map_err(|_| X402Error::InvalidSignature)?;
    Ok(address_of(&key))
}

fn address(text: &str, field: &'static str) -> Result<Address, X402Error> {
    hex_bytes::<20>(text).map(Address::from).ok_or(X402Error::Malformed(field))
}

/// `0x` and exactly `N` bytes of hex, either case.
fn hex_bytes<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X"))?;
    let mut bytes = [0; N];
    hex::decode_to_slice(digits, &mut bytes).ok()?;
    Some(bytes)
}

/// A uint256 in decimal: digits only, no sign, at most 78 of them.
fn uint(text: &str, field: &'static str) -> Result<U256, X402Error> {
    if text.is_empty() || text.len() > 78 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(X402Error::Malformed(field));
    }
    U256::from_str_radix(text, 10).map_err(|_| X402Error::Malformed(field))
}

#[cfg(test)]
mod tests {
    use alloy_primitives::address;
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    // Signed by the x402 Python package (2.25.0, `test-harness/interop/x402_pay.py`) with
    // anvil's second test key, 0x59c6…690d, paying 0x3C44…93BC.
    /// A v2 `PAYMENT-SIGNATURE`: 1000 units of a token at anvil's first contract address on
    /// chain 31337, domain "USD Coin" "2", signed at [`V2_NOW`] for 60 s.
    const V2_HEADER: &str = include_str!("../testdata/x402-v2-payment.b64");
    const V2_NOW: u64 = 1_796_671_525;
    /// A v1 `X-PAYMENT`: 2500 units of USDC on Base Sepolia, signed at [`V1_NOW`] for 300 s.
    const V1_HEADER: &str = include_str!("../testdata/x402-v1-payment.b64");
    const V1_NOW: u64 = 1_796_671_523;
    const PAYER: Address = address!("0x70997970C51812dc3A010C7d01b50e0d17dc79C8");
    const PAY_TO: Address = address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");

    fn anvil() -> Offer {
        Offer {
            chain_id: 31337,
            asset: address!("0x5FbDB2315678afecb367f032d93F642f64180aa3"),
            name: "USD Coin".into(),
            version: "2".into(),
            pay_to: PAY_TO,
            max_timeout_seconds: 60,
        }
    }

    fn base_sepolia() -> Offer {
        Offer {
            chain_id: 84532,
            asset: address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
            name: "USDC".into(),
            version: "2".into(),
            pay_to: PAY_TO,
            max_timeout_seconds: 300,
        }
    }

    fn v2() -> Payment {
        Payment::decode(V2_HEADER.as_bytes(), Version::V2).unwrap()
    }

    /// The header's JSON, changed by `change`, encoded again.
    fn altered(header: &str, change: impl FnOnce(&mut Value)) -> String {
        let mut json: Value = serde_json::from_slice(&STANDARD.decode(header).unwrap()).unwrap();
        change(&mut json);
        STANDARD.encode(json.to_string())
    }

    #[test]
    fn a_payment_the_x402_client_signed_is_the_payers_for_the_price() {
        let checked = v2().check(&[base_sepolia(), anvil()], 1000, V2_NOW).unwrap();
        assert_eq!((checked.payer, checked.offer), (PAYER, 1));
        let v1 = Payment::decode(V1_HEADER.as_bytes(), Version::V1).unwrap();
        assert_eq!(v1.chain_id, 84532);
        let checked_v1 = v1.check(&[anvil(), base_sepolia()], 2500, V1_NOW).unwrap();
        assert_eq!((checked_v1.payer, checked_v1.offer), (PAYER, 1));
        // One authorization, one id; another authorization, another.
        assert_eq!(
            v2().check(&[anvil()], 1000, V2_NOW + 10).unwrap().payment_id,
            checked.payment_id
        );
        assert_ne!(checked_v1.payment_id, checked.payment_id);
        let expected = keccak256(
            (U256::from(31337u64), anvil().asset, PAYER, v2().authorization.nonce).abi_encode(),
        );
        assert_eq!(checked.payment_id, expected);
    }

    #[test]
    fn what_we_sign_verifies_as_the_clients_do_and_terms_only_skips_the_signature() {
        // anvil's second test key, as the vector's payer.
        let key = SigningKey::from_slice(
            &hex::decode("59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d")
                .unwrap(),
        )
        .unwrap();
        assert_eq!(address_of(key.verifying_key()), PAYER);
        let terms = Terms {
            offer: &anvil(),
            amount: 1000,
            window: (0, V2_NOW + 60),
            nonce: B256::repeat_byte(9),
        };
        for version in [Version::V2, Version::V1] {
            let header = sign(&key, &terms, version);
            let payment = Payment::decode(header.as_bytes(), version).unwrap();
            let checked = payment.check(&[anvil()], 1000, V2_NOW).unwrap();
            assert_eq!(checked.payer, PAYER);
        }
        // Another signer's signature under the payer's name: refused unless terms only.
        let stranger = SigningKey::from_slice(&[7; 32]).unwrap();
        let forged = altered(&sign(&stranger, &terms, Version::V2), |json| {
            json["payload"]["authorization"]["from"] = json!(PAYER.to_checksum(None));
        });
        let forged = Payment::decode(forged.as_bytes(), Version::V2).unwrap();
        assert_eq!(forged.check(&[anvil()], 1000, V2_NOW), Err(X402Error::InvalidSignature));
        let terms_only = forged.check_with(&[anvil()], 1000, V2_NOW, Signature::TermsOnly);
        assert_eq!(terms_only.unwrap().payer, PAYER);
        assert_eq!(
            forged.check_with(&[anvil()], 999, V2_NOW, Signature::TermsOnly),
            Err(X402Error::ValueMismatch)
        );
    }

    #[test]
    fn settings_make_an_offer_with_usdc_known_on_base() {
        let settings = OfferSettings {
            network: "base",
            pay_to: "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
            asset: None,
            asset_name: None,
            asset_version: None,
            max_timeout_seconds: None,
        };
        let base = Offer::from_settings(&settings).unwrap();
        assert_eq!(
            (base.chain_id, base.name.as_str(), base.version.as_str()),
            (8453, "USD Coin", "2")
        );
        assert_eq!(base.asset, address!("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"));
        assert_eq!(base.max_timeout_seconds, DEFAULT_MAX_TIMEOUT_SECONDS);
        let sepolia =
            Offer::from_settings(&OfferSettings { network: "eip155:84532", ..settings }).unwrap();
        assert_eq!(sepolia.name, "USDC");
        assert!(is_known_usdc(8453, base.asset) && is_known_usdc(84532, sepolia.asset));
        // Each USDC on its own chain only, and no other token.
        assert!(!is_known_usdc(84532, base.asset) && !is_known_usdc(8453, sepolia.asset));
        assert!(!is_known_usdc(31337, address!("0x5FbDB2315678afecb367f032d93F642f64180aa3")));
        let sandbox = OfferSettings {
            network: "eip155:31337",
            asset: Some("0x5FbDB2315678afecb367f032d93F642f64180aa3"),
            asset_name: Some("USD Coin"),
            asset_version: Some("2"),
            ..settings
        };
        assert_eq!(Offer::from_settings(&sandbox).unwrap(), anvil());
        let field =
            |settings: OfferSettings<'_>| Offer::from_settings(&settings).unwrap_err().field;
        assert_eq!(field(OfferSettings { network: "eip155:x", ..settings }), "network");
        assert_eq!(field(OfferSettings { pay_to: "0x3C44", ..settings }), "pay_to");
        assert_eq!(field(OfferSettings { network: "eip155:1", ..settings }), "asset");
        assert_eq!(field(OfferSettings { asset_name: None, ..sandbox }), "asset_name");
        assert_eq!(
            field(OfferSettings { max_timeout_seconds: Some(7200), ..settings }),
            "max_timeout_seconds"
        );
    }

    #[test]
    fn each_term_of_the_offer_is_checked() {
        let payment = v2();
        let check = |offer: Offer, amount, now| payment.check(&[offer], amount, now);
        assert_eq!(check(anvil(), 999, V2_NOW), Err(X402Error::ValueMismatch));
        assert_eq!(check(anvil(), 1001, V2_NOW), Err(X402Error::ValueMismatch));
        // The client accepted an offer for another payee or asset than any we make.
        let elsewhere = Offer { pay_to: PAYER, ..anvil() };
        assert_eq!(check(elsewhere, 1000, V2_NOW), Err(X402Error::NetworkNotOffered));
        assert_eq!(check(base_sepolia(), 1000, V2_NOW), Err(X402Error::NetworkNotOffered));
        // Within 6 s of validBefore there is no time left to settle it.
        assert_eq!(check(anvil(), 1000, V2_NOW + 55), Err(X402Error::Expired));
        assert!(check(anvil(), 1000, V2_NOW + 54).is_ok());
        // Valid for longer than the offer allows, past a client clock 30 s ahead: signed for
        // 60 s, offered 29 (and 30 is taken).
        let short = Offer { max_timeout_seconds: 29, ..anvil() };
        assert_eq!(check(short, 1000, V2_NOW), Err(X402Error::ValidTooLong));
        assert!(check(Offer { max_timeout_seconds: 30, ..anvil() }, 1000, V2_NOW).is_ok());
        // Another domain: the signature does not recover the payer.
        let renamed = Offer { name: "USDC".into(), ..anvil() };
        assert_eq!(check(renamed, 1000, V2_NOW), Err(X402Error::InvalidSignature));
        // v1 names no asset: each offer on its network is tried, and the first reason told.
        let v1 = Payment::decode(V1_HEADER.as_bytes(), Version::V1).unwrap();
        let other = Offer { name: "Other".into(), asset: anvil().asset, ..base_sepolia() };
        let checked = v1.check(&[other.clone(), base_sepolia()], 2500, V1_NOW).unwrap();
        assert_eq!((checked.payer, checked.offer), (PAYER, 1));
        assert_eq!(v1.check(&[other], 2500, V1_NOW), Err(X402Error::InvalidSignature));
        // v1's window opens 600 s before its signing.
        assert_eq!(v1.check(&[base_sepolia()], 2500, V1_NOW - 601), Err(X402Error::NotYetValid));
    }

    #[test]
    fn a_changed_field_or_a_high_s_twin_fails_the_signature() {
        for (field, value) in [
            ("from", "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"),
            ("nonce", "0x0000000000000000000000000000000000000000000000000000000000000001"),
            ("validAfter", "1"),
        ] {
            let header =
                altered(V2_HEADER, |json| json["payload"]["authorization"][field] = json!(value));
            let payment = Payment::decode(header.as_bytes(), Version::V2).unwrap();
            assert_eq!(
                payment.check(&[anvil()], 1000, V2_NOW),
                Err(X402Error::InvalidSignature),
                "{field}"
            );
        }
        // (r, n - s, v ^ 1) is the same signature to ecrecover; only the low-s form is taken.
        let mut signature = v2().signature;
        let n = U256::from_str_radix(
            "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141",
            16,
        )
        .unwrap();
        let s = U256::from_be_slice(&signature[32..64]);
        signature[32..64].copy_from_slice(&(n - s).to_be_bytes::<32>());
        signature[64] ^= 1;
        let twin = altered(V2_HEADER, |json| {
            json["payload"]["signature"] = json!(format!("0x{}", hex::encode(signature)));
        });
        let payment = Payment::decode(twin.as_bytes(), Version::V2).unwrap();
        assert_eq!(payment.check(&[anvil()], 1000, V2_NOW), Err(X402Error::InvalidSignature));
    }

    #[test]
    fn malformed_payments_are_refused_with_the_field_named() {
        let decode = |header: &str| Payment::decode(header.as_bytes(), Version::V2);
        assert_eq!(decode("not base64!"), Err(X402Error::Malformed("the header is not base64")));
        assert_eq!(
            Payment::decode(V1_HEADER.as_bytes(), Version::V2),
            Err(X402Error::Malformed("not a v2 payment payload"))
        );
        let cases: [(&str, &str, Value, X402Error); 6] = [
            ("authorization", "value", json!("-1"), X402Error::Malformed("authorization.value")),
            ("authorization", "value", json!("1e3"), X402Error::Malformed("authorization.value")),
            ("authorization", "to", json!("0x1234"), X402Error::Malformed("authorization.to")),
            (
                "authorization",
                "nonce",
                json!("0x00"),
                X402Error::Malformed("authorization.nonce must be 32 bytes of hex"),
            ),
            (
                "authorization",
                "validBefore",
                json!(""),
                X402Error::Malformed("authorization.validBefore"),
            ),
            (
                "authorization",
                "validAfter",
                json!("1".repeat(79)),
                X402Error::Malformed("authorization.validAfter"),
            ),
        ];
        for (outer, field, value, error) in cases {
            let header = altered(V2_HEADER, |json| json["payload"][outer][field] = value);
            assert_eq!(decode(&header), Err(error), "{field}");
        }
        let short = altered(V2_HEADER, |json| json["payload"]["signature"] = json!("0xabcd"));
        assert_eq!(decode(&short), Err(X402Error::Malformed("signature must be 65 bytes of hex")));
        let v3 = altered(V2_HEADER, |json| json["x402Version"] = json!(3));
        assert_eq!(decode(&v3), Err(X402Error::UnsupportedVersion));
        let upto = altered(V2_HEADER, |json| json["accepted"]["scheme"] = json!("upto"));
        assert_eq!(
            decode(&upto).unwrap().check(&[anvil()], 1000, V2_NOW),
            Err(X402Error::UnsupportedScheme)
        );
        let solana =
            altered(V2_HEADER, |json| json["accepted"]["network"] = json!("solana:5eykt4"));
        assert_eq!(decode(&solana), Err(X402Error::NetworkNotOffered));
        let long = "A".repeat(MAX_PAYMENT_HEADER_LEN + 1);
        assert_eq!(decode(&long), Err(X402Error::Malformed("the header is too long")));
    }

    #[test]
    fn networks_are_caip2_or_a_v1_name() {
        assert_eq!(chain_id("eip155:8453"), Some(8453));
        assert_eq!(chain_id("base-sepolia"), Some(84532));
        for bad in [
            "eip155:",
            "eip155:+1",
            "eip155:0x1",
            "eip155:99999999999999999999",
            "polygon",
            "solana:5eykt4",
        ] {
            assert_eq!(chain_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_402_offers_read_as_the_spec_names_them() {
        let resource = Resource {
            url: "http://127.0.0.1:10000/v1/forecast".into(),
            description: None,
            mime_type: Some("application/json".into()),
        };
        let required = PaymentRequired {
            x402_version: 2,
            error: Some("payment required".into()),
            resource: resource.clone(),
            accepts: vec![anvil().requirements(1000)],
        };
        let json: Value =
            serde_json::from_slice(&STANDARD.decode(required.header_value()).unwrap()).unwrap();
        assert_eq!(
            json["accepts"][0],
            json!({"scheme": "exact", "network": "eip155:31337", "amount": "1000",
                "asset": "0x5FbDB2315678afecb367f032d93F642f64180aa3",
                "payTo": "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC", "maxTimeoutSeconds": 60,
                "extra": {"name": "USD Coin", "version": "2"}})
        );
        assert_eq!(json["resource"], json!({"url": resource.url, "mimeType": "application/json"}));
        let v1 = serde_json::to_value(base_sepolia().requirements_v1(2500, &resource)).unwrap();
        assert_eq!(
            (&v1["network"], &v1["maxAmountRequired"]),
            (&json!("base-sepolia"), &json!("2500"))
        );
        assert_eq!(anvil().requirements_v1(1, &resource).network, "eip155:31337");
    }

    proptest! {
        #[test]
        fn any_header_is_answered_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            for version in [Version::V1, Version::V2] {
                let _ = Payment::decode(&bytes, version);
                let _ = Payment::decode(STANDARD.encode(&bytes).as_bytes(), version);
            }
        }

        #[test]
        fn a_changed_byte_never_pays(index in 0..V2_HEADER.len(), byte in any::<u8>()) {
            let mut header = V2_HEADER.as_bytes().to_vec();
            header[index] = byte;
            if let Ok(payment) = Payment::decode(&header, Version::V2)
                && payment.check(&[anvil()], 1000, V2_NOW).is_ok()
            {
                prop_assert_eq!(payment, v2());
            }
        }
    }
}
