//! The records the rules judge and the stores keep: shared by both, owned by neither, so
//! that the store depends on the rules and never the reverse.

use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::TokenGrant;

/// Milliseconds since the Unix epoch: every timestamp the stores keep.
pub type UnixMillis = i64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    pub grant: TokenGrant,
    pub used: Usdc,
    pub reserved: Usdc,
    pub revoked: bool,
    /// The token it was minted under, for a child token.
    pub parent_id: Option<String>,
}

impl TokenRecord {
    /// A token as first registered: nothing spent.
    pub fn new(grant: TokenGrant) -> TokenRecord {
        TokenRecord {
            grant,
            used: Usdc::ZERO,
            reserved: Usdc::ZERO,
            revoked: false,
            parent_id: None,
        }
    }

    /// What is left for new calls: the limit minus everything spent or on hold.
    pub fn remaining(&self) -> Usdc {
        self.grant.limit_usdc.saturating_sub(self.used).saturating_sub(self.reserved)
    }
}
