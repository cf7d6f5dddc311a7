//! Transactions under `kill -9`: a bank over eight ranges whose transfers commit by two-phase
//! commit while random nodes and range leaders are killed and restarted. Each transfer also
//! writes a marker naming itself beside its source account, in the same transaction, so the
//! end state says exactly which transfers applied: every acknowledged one must have, the
//! balances must be the initial ones moved by exactly the transfers applied, and no lock or
//! prepared transaction may be left behind.
//!
//! And transactions under clock skew within ε: commits that follow one another in real time,
//! at leaders whose clocks differ, get increasing timestamps, and a strong read-only
//! transaction sees every commit acknowledged before it began; a cluster that skips
//! commit-wait (a test-only switch) is caught by the same checks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use meridian_client::{ReadFrom, ReadTimestamp, TxnError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

const ACCOUNTS: usize = 16;
const INITIAL_BALANCE: i64 = 100;
const TELLERS: usize = 3;
/// How long transfers run while nodes are killed.
const CHAOS: Duration = Duration::from_secs(20);

fn account(index: usize) -> Vec<u8> {
    format!("bank/{index:02}").into_bytes()
}

/// The marker of transfer `id` out of account `from`: in `from`'s range, after its key.
fn marker(from: usize, id: u64) -> Vec<u8> {
    format!("bank/{from:02}/t/{id:08}").into_bytes()
}

fn number(value: &[u8]) -> i64 {
    String::from_utf8_lossy(value).parse().expect("a number")
}

/// What the tellers know of their transfers.
#[derive(Default)]
struct Ledger {
    /// Acknowledged: they must have applied.
    committed: BTreeSet<u64>,
    /// Of unknown outcome: they may have applied.
    unknown: BTreeSet<u64>,
}

/// One transfer with its marker, retried while refused (each refusal had no effect);
/// records its outcome in `ledger`. Gives up after 30 s of refusals.
async fn transfer(client: &Client, ledger: &Mutex<Ledger>, id: u64, from: usize, to: usize) {
    let amount = i64::try_from(id % 20 + 1).unwrap();
    let started = Instant::now();
    let mut txn = client.begin();
    while started.elapsed() < Duration::from_secs(30) {
        let attempt = async {
            let from_balance = number(&txn.get(&account(from)).await?.expect("an account"));
            let to_balance = number(&txn.get(&account(to)).await?.expect("an account"));
            if from_balance < amount {
                txn.rollback().await?;
                return Ok(None);
            }
            txn.put(&account(from), (from_balance - amount).to_string().as_bytes())?;
            txn.put(&account(to), (to_balance + amount).to_string().as_bytes())?;
            txn.put(&marker(from, id), format!("{from} {to} {amount}").as_bytes())?;
            txn.commit().await
        }
        .await;
        match attempt {
            Ok(None) => return,
            Ok(Some(_)) => {
                ledger.lock().unwrap().committed.insert(id);
                return;
            }
            Err(TxnError::Client(error)) if error.is_ambiguous() => {
                ledger.lock().unwrap().unknown.insert(id);
                return;
            }
            // Aborted or refused (a node down, no leader yet): it had no effect.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                txn = txn.retry().await;
            }
        }
    }
}

/// The accounts' balances and the markers found, read in one locked scan.
async fn read_bank(client: &Client) -> Option<(Vec<i64>, BTreeMap<u64, (usize, usize, i64)>)> {
    let mut txn = client.begin();
    let rows = match txn.scan(b"bank/", Some(b"bank0"), 100_000).await {
        Ok(rows) => rows,
        Err(_) => {
            let _ = txn.rollback().await;
            return None;
        }
    };
    txn.commit().await.ok()?;
    let (mut balances, mut markers) = (Vec::new(), BTreeMap::new());
    for (key, value) in rows {
        let key = String::from_utf8(key).unwrap();
        match key.split('/').collect::<Vec<_>>()[..] {
            ["bank", _] => balances.push(number(&value)),
            ["bank", _, "t", id] => {
                let value = String::from_utf8(value).unwrap();
                let parts: Vec<i64> = value.split(' ').map(|part| part.parse().unwrap()).collect();
                let (from, to) = (usize::try_from(parts[0]).unwrap(), parts[1] as usize);
                markers.insert(id.parse().unwrap(), (from, to, parts[2]));
            }
            _ => panic!("an unexpected key {key}"),
        }
    }
    Some((balances, markers))
}

/// The leader of a random data range, as node 1 (or any live node) sees it.
async fn some_leader(cluster: &Cluster, rng: &mut StdRng) -> Option<usize> {
    for (index, address) in cluster.addresses.iter().enumerate() {
        if cluster.processes[index].is_none() {
            continue;
        }
        let view = status(address).await?;
        let leaders: Vec<u64> = view
            .ranges
            .iter()
            .filter(|range| range.range_id != META_RANGE.0 && range.leader != 0)
            .map(|range| range.leader)
            .collect();
        if !leaders.is_empty() {
            return Some(leaders[rng.random_range(0..leaders.len())] as usize - 1);
        }
    }
    None
}

#[tokio::test]
async fn a_bank_over_eight_ranges_keeps_every_acknowledged_transfer_through_kill_9() {
    let seed: u64 = std::env::var("MERIDIAN_TEST_SEED")
        .map_or_else(|_| rand::random(), |seed| seed.parse().expect("a numeric seed"));
    println!("seed {seed} (replay the fault schedule with MERIDIAN_TEST_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cluster = Cluster::start(3);
    init(&cluster).await;
    let splits: Vec<String> = (1..8).map(|range| format!("bank/{:02}", range * 2)).collect();
    let mut args = vec!["split", "--host", &cluster.addresses[0]];
    args.extend(splits.iter().map(String::as_str));
    let output = meridian(&args);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let client = client(&cluster.addresses);
    let opened = eventually(Duration::from_secs(30), || async {
        let mut setup = client.begin();
        for index in 0..ACCOUNTS {
            setup.put(&account(index), INITIAL_BALANCE.to_string().as_bytes()).unwrap();
        }
        setup.commit().await.ok()
    })
    .await;
    assert!(opened.is_some(), "the accounts could not be opened\n{}", cluster.logs());

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Instant::now() + CHAOS;
    let mut tellers = Vec::new();
    for teller in 0..TELLERS {
        let (client, ledger) = (client.clone(), ledger.clone());
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(teller as u64 + 1));
        tellers.push(tokio::spawn(async move {
            let mut id = teller as u64;
            while Instant::now() < stop {
                let from = rng.random_range(0..ACCOUNTS);
                let to = (from + rng.random_range(1..ACCOUNTS)) % ACCOUNTS;
                transfer(&client, &ledger, id, from, to).await;
                id += TELLERS as u64;
            }
        }));
    }
    // Faults: kill -9 a random node or a range's leader, restart it 1–3 s later; one node
    // down at a time, so every range keeps a majority.
    let mut faults = Vec::new();
    while Instant::now() + Duration::from_secs(4) < stop {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..2_500))).await;
        let victim = if rng.random_bool(0.5) {
            some_leader(&cluster, &mut rng).await.unwrap_or(0)
        } else {
            rng.random_range(0..cluster.addresses.len())
        };
        cluster.kill(victim);
        faults.push(victim + 1);
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..3_000))).await;
        cluster.restart(victim);
    }
    for teller in tellers {
        tokio::time::timeout(Duration::from_secs(60), teller)
            .await
            .expect("a teller finished its last transfer")
            .unwrap();
    }
    println!("killed nodes {faults:?}");

    // Prepared parts left by killed coordinators resolve through their status queries.
    let bank = eventually(Duration::from_secs(60), || read_bank(&client)).await;
    let (balances, markers) = bank.unwrap_or_else(|| panic!("no final read\n{}", cluster.logs()));
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    println!(
        "{} transfers acknowledged, {} of unknown outcome, {} applied",
        ledger.committed.len(),
        ledger.unknown.len(),
        markers.len()
    );
    assert!(!faults.is_empty() && !ledger.committed.is_empty(), "no faults or no transfers");
    for id in &ledger.committed {
        assert!(markers.contains_key(id), "acknowledged transfer {id} was lost (seed {seed})");
    }
    for id in markers.keys() {
        assert!(
            ledger.committed.contains(id) || ledger.unknown.contains(id),
            "transfer {id} applied though every attempt was refused (seed {seed})"
        );
    }
    let mut expected = vec![INITIAL_BALANCE; ACCOUNTS];
    for (from, to, amount) in markers.values() {
        expected[*from] -= amount;
        expected[*to] += amount;
    }
    assert_eq!(balances, expected, "balances differ from the transfers applied (seed {seed})");
    assert!(balances.iter().all(|balance| *balance >= 0), "{balances:?}");

    // A strong snapshot sees the same, and every lock is free: a transaction locking every
    // account commits well before abandoned locks (5 s) would have been released.
    let mut snapshot = client.read_only(ReadTimestamp::Strong);
    let rows = snapshot.scan(b"bank/", Some(b"bank0"), 100_000).await.expect("a snapshot scan");
    let total: i64 = rows
        .iter()
        .filter(|(key, _)| key.len() == account(0).len())
        .map(|(_, value)| number(value))
        .sum();
    assert_eq!(total, INITIAL_BALANCE * ACCOUNTS as i64);
    let options = ClientOptions { deadline: Duration::from_secs(3), ..ClientOptions::default() };
    let quick = Client::new(cluster.addresses.clone(), options).unwrap();
    let mut all = quick.begin();
    for index in 0..ACCOUNTS {
        all.get_for_update(&account(index)).await.expect("every account's lock is free");
    }
    all.rollback().await.unwrap();
}

/// The clock bound of the skew tests, and each node's skew: each clock within ε of true
/// time, the fast and the slow node 40 ms apart (within the 2ε peers may differ). Without
/// commit-wait, a commit at a faster leader then one at a slower leader get decreasing
/// timestamps whenever the second is timestamped less than their clocks' difference later.
const SKEW_BOUND_MS: &str = "50";
const SKEWS_MS: [&str; 3] = ["20", "0", "-20"];
/// Ranges of the skew tests: range `r` holds the keys `ext{r}/…`.
const SKEW_RANGES: usize = 6;

fn skew_key(range: usize, step: usize) -> Vec<u8> {
    format!("ext{range}/{step:04}").into_bytes()
}

/// Starts three nodes with skewed clocks (and `extra` flags), splits the key space into
/// [`SKEW_RANGES`] ranges and waits until every node leads one of them.
async fn skewed_cluster(extra: &[&str]) -> Cluster {
    let mut cluster = Cluster::start_some(3, 0, &["--max-clock-offset-ms", SKEW_BOUND_MS]);
    for (index, skew) in SKEWS_MS.iter().enumerate() {
        let mut flags = vec!["--inject-clock-skew-ms", skew];
        flags.extend_from_slice(extra);
        let node = cluster.spawn_with(index, &flags);
        cluster.processes[index] = Some(node);
    }
    init(&cluster).await;
    let splits: Vec<String> = (1..SKEW_RANGES).map(|range| format!("ext{range}")).collect();
    let mut args = vec!["split", "--host", &cluster.addresses[0]];
    args.extend(splits.iter().map(String::as_str));
    let output = meridian(&args);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let spread = eventually(Duration::from_secs(60), || async {
        let mut leaders = BTreeSet::new();
        for address in &cluster.addresses {
            for range in status(address).await?.ranges {
                if range.range_id != META_RANGE.0 && range.role == "leader" {
                    leaders.insert(range.leader);
                }
            }
        }
        (leaders.len() == SKEWS_MS.len()).then_some(())
    })
    .await;
    assert!(spread.is_some(), "the leaders did not spread\n{}", cluster.logs());
    cluster
}

/// A chain of transactions, each begun after the previous one was acknowledged, at ranges
/// whose leaders' clocks differ; every fifth writes two ranges (two-phase commit). After each,
/// a strong read-only transaction that starts at another range reads what it wrote. Returns
/// the violations of real-time order found.
async fn real_time_violations(client: &Client, steps: usize) -> Vec<String> {
    let mut violations = Vec::new();
    let mut previous = 0;
    for step in 0..steps {
        let range = step % SKEW_RANGES;
        let mut txn = client.begin();
        txn.put(&skew_key(range, step), b"x").unwrap();
        if step % 5 == 4 {
            txn.put(&skew_key((range + 1) % SKEW_RANGES, step), b"x").unwrap();
        }
        let committed = match txn.commit().await {
            Ok(timestamp) => timestamp.expect("a commit timestamp"),
            Err(error) => panic!("step {step}: {error}"),
        };
        if committed <= previous {
            violations.push(format!(
                "step {step} committed at {committed}, after a commit at {previous} was \
                 acknowledged"
            ));
        }
        previous = committed;
        // Its timestamp comes from another range's leader, or every fourth time from a
        // follower's clock (the follower then waits for its safe time); it must see the
        // commit.
        let from = if step % 4 == 3 { ReadFrom::Follower } else { ReadFrom::Leader };
        let mut read = client.read_only(ReadTimestamp::Strong).read_from(from);
        read.get(&skew_key((range + 2) % SKEW_RANGES, 0)).await.expect("a strong read");
        if read.get(&skew_key(range, step)).await.expect("a strong read").is_none() {
            violations.push(format!(
                "a strong read at {} missed step {step}'s commit at {committed}",
                read.timestamp().unwrap_or_default()
            ));
        }
    }
    violations
}

#[tokio::test]
async fn transactions_follow_real_time_across_skewed_clocks() {
    let cluster = skewed_cluster(&[]).await;
    let client = client(&cluster.addresses);
    let violations = real_time_violations(&client, 120).await;
    assert!(violations.is_empty(), "{violations:#?}\n{}", cluster.logs());
    for address in &cluster.addresses {
        let view = status(address).await.expect("a status");
        assert!(view.clock_problem.is_empty(), "{address}: {}", view.clock_problem);
    }
}

/// The same checks catch a cluster that acknowledges commits without commit-wait.
#[tokio::test]
async fn skipping_commit_wait_breaks_real_time_order_under_skew() {
    let cluster = skewed_cluster(&["--unsafe-switch", "skip_commit_wait"]).await;
    let client = client(&cluster.addresses);
    let violations = real_time_violations(&client, 120).await;
    assert!(!violations.is_empty(), "no violation without commit-wait\n{}", cluster.logs());
    println!("{} violations, e.g. {}", violations.len(), violations[0]);
}
