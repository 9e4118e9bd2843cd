//! `direct` settlement: the ledger is its own facilitator. It sends each payment's
//! `transferWithAuthorization` to the token with its settler key (which pays the gas and can
//! move nobody's tokens), over the chain's JSON-RPC, and reads the receipt's `Transfer`.

use alloy::eips::eip2718::Encodable2718;
use alloy::network::{Ethereum, EthereumWallet, TransactionBuilder};
use alloy::primitives::{Address, B256, Bytes, U256, keccak256};
use alloy::providers::{Provider, RootProvider};
use alloy::rpc::types::TransactionRequest;
use alloy::signers::local::PrivateKeySigner;
use alloy::transports::TransportError;
use paystile_protocol::x402::{Offer, Payment};

use super::Trouble;
use crate::settings::Secret;

pub struct Direct {
    provider: RootProvider<Ethereum>,
    /// Held from signing a transaction (its nonce: the settler's count of pending ones)
    /// until it is sent: two signed at once would take one nonce, and one of them could
    /// never be mined. Ledgers sharing a database need a settler key each.
    nonce: tokio::sync::Mutex<()>,
    wallet: EthereumWallet,
    settler: Address,
    chain_id: u64,
    asset: Address,
}

/// A transaction signed for a payment, kept before it is sent: sending it again (never
/// another) is how a settlement is retried.
pub struct Signed {
    pub hash: B256,
    pub raw: Vec<u8>,
}

/// What the chain says of a sent transaction.
pub enum Mined {
    /// Mined, and it moved the payment's value from the payer to the payee.
    Transferred,
    /// Mined without the transfer (reverted): the reason.
    Reverted(String),
    NotYet,
}

impl Direct {
    pub fn new(rpc_url: &str, settler_key: &Secret, offer: &Offer) -> anyhow::Result<Direct> {
        let signer: PrivateKeySigner = settler_key
            .expose()
            .parse()
            .map_err(|_| anyhow::anyhow!("x402_settler_key is not a private key"))?;
        let settler = signer.address();
        let url = rpc_url.parse().map_err(|_| anyhow::anyhow!("x402_rpc_url is not a URL"))?;
        Ok(Direct {
            provider: RootProvider::new_http(url),
            nonce: tokio::sync::Mutex::new(()),
            wallet: EthereumWallet::from(signer),
            settler,
            chain_id: offer.chain_id,
            asset: offer.asset,
        })
    }

    pub fn settler(&self) -> Address {
        self.settler
    }

    /// The settler's nonce, taken from [`Direct::sign`] until the transaction is sent.
    pub async fn exclusive(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.nonce.lock().await
    }

    /// The chain the RPC URL serves: it must be the offer's.
    pub async fn chain_id(&self) -> Result<u64, Trouble> {
        self.provider.get_chain_id().await.map_err(trouble)
    }

    /// Signs the transaction that settles `payment`, once the chain says it would succeed
    /// (`eth_estimateGas` runs it: a used nonce, a balance gone or an expired window revert
    /// there, and are final).
    pub async fn sign(&self, payment: &Payment) -> Result<Signed, Trouble> {
        let request = TransactionRequest::default()
            .with_from(self.settler)
            .with_to(self.asset)
            .with_input(Bytes::from(payment.transfer_calldata()))
            .with_chain_id(self.chain_id);
        let gas = self.provider.estimate_gas(request.clone()).await.map_err(trouble)?;
        let nonce =
            self.provider.get_transaction_count(self.settler).pending().await.map_err(trouble)?;
        let fees = self.provider.estimate_eip1559_fees().await.map_err(trouble)?;
        let request = request
            .with_nonce(nonce)
            // A margin over the estimate: the state may change a little before it is mined.
            .with_gas_limit(gas.saturating_add(gas / 5))
            .with_max_fee_per_gas(fees.max_fee_per_gas)
            .with_max_priority_fee_per_gas(fees.max_priority_fee_per_gas);
        let envelope = request
            .build(&self.wallet)
            .await
            .map_err(|e| Trouble::Retry(format!("cannot sign the settlement: {e}")))?;
        Ok(Signed { hash: *envelope.tx_hash(), raw: envelope.encoded_2718() })
    }

    /// Sends `raw`. A node that has it already, or mined it, answers an error: the receipt
    /// tells.
    pub async fn send(&self, raw: &[u8]) -> Result<(), Trouble> {
        self.provider.send_raw_transaction(raw).await.map(drop).map_err(trouble)
    }

    /// Whether `hash` was mined, and moved `payment`'s value to the payee.
    pub async fn mined(&self, hash: B256, payment: &Payment) -> Result<Mined, Trouble> {
        let Some(receipt) = self.provider.get_transaction_receipt(hash).await.map_err(trouble)?
        else {
            return Ok(Mined::NotYet);
        };
        if !receipt.status() {
            return Ok(Mined::Reverted(format!("the transaction {hash} reverted")));
        }
        let auth = &payment.authorization;
        let transfer = keccak256("Transfer(address,address,uint256)");
        let moved = receipt.inner.logs().iter().any(|log| {
            let topics = log.topics();
            log.address() == self.asset
                && topics.len() == 3
                && topics[0] == transfer
                && topics[1] == auth.from.into_word()
                && topics[2] == auth.to.into_word()
                && U256::try_from_be_slice(&log.data().data) == Some(auth.value)
        });
        Ok(if moved {
            Mined::Transferred
        } else {
            Mined::Reverted(format!("the transaction {hash} moved no such transfer"))
        })
    }
}

/// An RPC error, judged: a node that reverted the transfer has said it will never settle;
/// anything else (no answer, an overloaded node, a settler short of gas money) may pass.
///
/// A window not open yet reverts too, and will pass. The reasons kept never carry the RPC
/// URL (it may hold an API key): a node that does not answer is logged, not quoted.
fn trouble(error: TransportError) -> Trouble {
    match error.as_error_resp() {
        Some(payload) if payload.message.contains("not yet valid") => {
            Trouble::Retry(payload.message.to_string())
        }
        Some(payload) if payload.message.contains("revert") => {
            Trouble::Final(payload.message.to_string())
        }
        Some(payload) => Trouble::Retry(format!("the node answered: {}", payload.message)),
        None => {
            tracing::debug!(%error, "the chain's node did not answer");
            Trouble::Retry("the node did not answer".into())
        }
    }
}
