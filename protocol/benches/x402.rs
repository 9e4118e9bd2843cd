//! What checking an x402 payment costs, natively: reading the header (base64, JSON, fields)
//! and checking it against the offer (the cheap terms, then the EIP-712 digest and the
//! secp256k1 recovery). `cargo bench -p paystile-protocol --bench x402` prints nanoseconds
//! per payment for each (the median of 15 runs of 2,000). Each authorization is seen once,
//! so wherever the check runs it runs for every x402 call; in the filter it would run as
//! wasm in V8, at a few times these figures.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::time::Instant;

use paystile_protocol::x402::{Offer, Payment, Version};

/// Signed by the x402 Python package for the offer below (see the module's tests), valid
/// at [`NOW`].
const HEADER: &str = include_str!("../testdata/x402-v2-payment.b64");
const NOW: u64 = 1_796_671_525;
const RUNS: usize = 15;
const PAYMENTS: u32 = 2_000;

fn median_nanos(mut each: impl FnMut()) -> u128 {
    let mut runs: Vec<u128> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..PAYMENTS {
                each();
            }
            start.elapsed().as_nanos() / u128::from(PAYMENTS)
        })
        .collect();
    runs.sort_unstable();
    runs[RUNS / 2]
}

fn main() {
    let offer = Offer {
        chain_id: 31337,
        asset: "0x5FbDB2315678afecb367f032d93F642f64180aa3".parse().unwrap(),
        name: "USD Coin".into(),
        version: "2".into(),
        pay_to: "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC".parse().unwrap(),
        max_timeout_seconds: 60,
    };
    let offers = [offer];
    let payment = Payment::decode(HEADER.as_bytes(), Version::V2).unwrap();
    payment.check(&offers, 1000, NOW).expect("the vector checks");
    let decode = median_nanos(|| {
        black_box(Payment::decode(black_box(HEADER.as_bytes()), Version::V2).unwrap());
    });
    let check = median_nanos(|| {
        black_box(payment.check(black_box(&offers), 1000, NOW).unwrap());
    });
    println!("| step | ns per payment |\n|---|--:|");
    println!("| decode (PAYMENT-SIGNATURE) | {decode} |");
    println!("| check (terms, EIP-712, recovery) | {check} |");
}
