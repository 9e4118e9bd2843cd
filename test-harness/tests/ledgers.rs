//! Several filter configurations in one Envoy VM, each with its own ledger: settlements and
//! prefetched holds go to the ledger of the configuration that made them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;

use paystile_harness::e2e::TestStack;
use paystile_protocol::Usdc;
use paystile_protocol::ledger_api::{ChargeQuery, ChargeStatus};
use serde_json::json;

const CALLS: usize = 40;

/// The charges of `token_id` in `stack`'s ledger: (id, status, amount).
async fn journal(stack: &TestStack, token_id: &str) -> Vec<(String, ChargeStatus, Usdc)> {
    let query =
        ChargeQuery { token_id: Some(token_id.into()), limit: Some(1000), ..Default::default() };
    let page = stack.stack.admin.charges(&query).await.unwrap();
    assert!(page.next_cursor.is_none());
    page.charges.into_iter().map(|c| (c.charge_id, c.status, c.amount_usdc)).collect()
}

/// Two services behind one Envoy, sharing its VM (the shipped `vm_id`), each metered by its
/// own ledger, with prefetched holds on: every charge either gateway answered is committed
/// in its own ledger, each token spent exactly, and nothing is left held.
#[tokio::test(flavor = "multi_thread")]
async fn two_services_with_two_ledgers_in_one_vm_settle_each_at_its_own() {
    let prefetch = json!({"ledger": {"prefetch_holds": 8, "prefetch_max_age_ms": 300}});
    let mut weather = TestStack::start_with(prefetch.clone(), &[]).await.unwrap();
    // The second service's ledger (its own keys and books); its Envoy is not used.
    let mut maps_config = prefetch;
    maps_config["service_id"] = json!("demo-maps");
    let maps = TestStack::start_with(maps_config, &[]).await.unwrap();
    let maps_ledger = maps.stack.ledger.address().port();
    let maps_gateway =
        weather.stack.add_gateway("maps", &maps.stack.filter_config, maps_ledger).await.unwrap();

    let (weather_token, maps_token) =
        (weather.issue("1").await.unwrap(), maps.issue("1").await.unwrap());
    let (mut weather_charges, mut maps_charges) = (HashSet::new(), HashSet::new());
    for i in 0..CALLS {
        let answer = weather.paid(&format!("/v1/forecast/{i}"), &weather_token.jwt).await.unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        weather_charges.insert(answer.header("x-charge-id").unwrap().to_owned());
        let url = format!("http://{maps_gateway}/v1/forecast/{i}");
        let answer = weather.http.get(url).bearer_auth(&maps_token.jwt).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        maps_charges.insert(answer.headers()["x-charge-id"].to_str().unwrap().to_owned());
    }

    let price = weather.forecast_price();
    let spent = price.checked_mul(CALLS as u64).unwrap();
    for (stack, token, answered) in
        [(&weather, &weather_token, &weather_charges), (&maps, &maps_token, &maps_charges)]
    {
        let view = stack.settled(&token.token_id).await.unwrap();
        assert_eq!((view.used_usdc, view.reserved_usdc), (spent, Usdc::ZERO), "{view:?}");
        let journal = journal(stack, &token.token_id).await;
        let committed: HashSet<String> = journal
            .iter()
            .filter(|(_, status, _)| *status == ChargeStatus::Committed)
            .map(|(id, _, amount)| {
                assert_eq!(*amount, price);
                id.clone()
            })
            .collect();
        assert_eq!(&committed, answered, "a ledger's committed charges are not its gateway's");
        // The prefetched holds no call took were released here, where they were made.
        assert!(journal.iter().all(|(_, status, _)| *status != ChargeStatus::Held));
    }
    weather.stack.envoy.kill().unwrap();
}
