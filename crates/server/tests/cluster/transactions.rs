//! Read-write transactions through real nodes: concurrent transfers keep a bank's total
//! (within one range, and across three by two-phase commit), an older transaction wounds a
//! younger one, a transaction whose locks died with their leader must retry, a commit over
//! several ranges applies atomically, and a participant prepared for a commit its coordinator
//! never heard of is aborted by its status query.

use meridian_client::{ReadTimestamp, TxnError};
use meridian_rpc::kv::{TxnHeader, TxnPrepareRequest, TxnPriority, TxnWrite};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

const ACCOUNTS: usize = 8;
const INITIAL_BALANCE: i64 = 100;

fn account(index: usize) -> Vec<u8> {
    format!("acct/{index:02}").into_bytes()
}

fn balance(value: Option<Vec<u8>>) -> i64 {
    let value = value.expect("every account exists");
    String::from_utf8(value).unwrap().parse().unwrap()
}

/// Reads every account in one transaction, one key at a time (each read takes its own lock,
/// so only locking keeps a transfer from landing between two reads), and returns the
/// balances; retries while the transaction is aborted.
async fn read_all(client: &Client) -> Vec<i64> {
    let mut txn = client.begin();
    for _ in 0..100 {
        let mut balances = Vec::new();
        let mut read = Ok(());
        for index in 0..ACCOUNTS {
            match txn.get(&account(index)).await {
                Ok(value) => balances.push(balance(value)),
                Err(error) => {
                    read = Err(error);
                    break;
                }
            }
        }
        match read.and(Ok(())) {
            Ok(()) => match txn.commit().await {
                Ok(_) => return balances,
                Err(error) if error.is_retryable() => txn = txn.retry().await,
                Err(error) => panic!("full read failed: {error}"),
            },
            Err(error) if error.is_retryable() => txn = txn.retry().await,
            Err(error) => panic!("full read failed: {error}"),
        }
    }
    panic!("a full read was aborted 100 times");
}

/// Scans every account in one transaction (a span lock) and returns the balances.
async fn scan_all(client: &Client) -> Vec<i64> {
    let mut txn = client.begin();
    for _ in 0..100 {
        match txn.scan(b"acct/", Some(b"acct0"), 100).await {
            Ok(rows) => match txn.commit().await {
                Ok(_) => return rows.into_iter().map(|(_, value)| balance(Some(value))).collect(),
                Err(error) if error.is_retryable() => txn = txn.retry().await,
                Err(error) => panic!("full scan failed: {error}"),
            },
            Err(error) if error.is_retryable() => txn = txn.retry().await,
            Err(error) => panic!("full scan failed: {error}"),
        }
    }
    panic!("a full scan was aborted 100 times");
}

/// One transfer, retried while aborted; returns how many attempts were aborted, or `None`
/// when its commit's outcome is unknown (which keeps the total either way).
async fn transfer(client: &Client, from: usize, to: usize, amount: i64) -> Option<u32> {
    let mut txn = client.begin();
    for aborted in 0..200 {
        let attempt = async {
            let from_balance = balance(txn.get(&account(from)).await?);
            let to_balance = balance(txn.get(&account(to)).await?);
            if from_balance >= amount {
                txn.put(&account(from), (from_balance - amount).to_string().as_bytes())?;
                txn.put(&account(to), (to_balance + amount).to_string().as_bytes())?;
            }
            Ok::<(), TxnError>(())
        }
        .await;
        match attempt {
            Ok(()) => match txn.commit().await {
                Ok(_) => return Some(aborted),
                Err(TxnError::Client(error)) if error.is_ambiguous() => return None,
                Err(error) if error.is_retryable() => txn = txn.retry().await,
                Err(error) => panic!("transfer failed: {error}"),
            },
            Err(error) if error.is_retryable() => txn = txn.retry().await,
            Err(error) => panic!("transfer failed: {error}"),
        }
    }
    panic!("a transfer was aborted 200 times");
}

#[tokio::test]
async fn concurrent_transfers_keep_the_total_and_reads_see_it_whole() {
    let cluster = Cluster::start(3);
    init(&cluster).await;
    bank(&cluster).await;
}

#[tokio::test]
async fn concurrent_transfers_across_ranges_keep_the_total() {
    let cluster = Cluster::start(3);
    init(&cluster).await;
    // Three ranges of accounts: most transfers and every full read span two or three.
    let output = meridian(&["split", "--host", &cluster.addresses[0], "acct/03", "acct/06"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    bank(&cluster).await;
}

/// Runs concurrent transfers between the accounts while full reads check the total.
async fn bank(cluster: &Cluster) {
    let client = client(&cluster.addresses);
    let mut setup = client.begin();
    for index in 0..ACCOUNTS {
        setup.put(&account(index), INITIAL_BALANCE.to_string().as_bytes()).unwrap();
    }
    if let Err(error) = setup.commit().await {
        panic!("the accounts are not created: {error}\n{}", cluster.logs());
    }
    drop(setup);

    let seed: u64 = std::env::var("MERIDIAN_TEST_SEED")
        .map_or_else(|_| rand::random(), |seed| seed.parse().unwrap());
    println!("seed {seed} (replay with MERIDIAN_TEST_SEED={seed})");
    let total = ACCOUNTS as i64 * INITIAL_BALANCE;
    let client = Arc::new(client);
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..4u64 {
        let client = client.clone();
        workers.spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ worker);
            let mut aborted = 0;
            for _ in 0..12 {
                let from = rng.random_range(0..ACCOUNTS);
                let to = (from + rng.random_range(1..ACCOUNTS)) % ACCOUNTS;
                let amount = rng.random_range(1..=40);
                aborted += transfer(&client, from, to, amount).await.unwrap_or(0);
            }
            aborted
        });
    }
    // Meanwhile, whole-table reads under locks, and lock-free reads of one snapshot, always
    // see the total.
    for round in 0..10 {
        let balances = read_all(&client).await;
        assert_eq!(balances.len(), ACCOUNTS, "an account went missing: {balances:?}");
        assert_eq!(balances.iter().sum::<i64>(), total, "a read saw a torn transfer: {balances:?}");
        assert!(balances.iter().all(|balance| *balance >= 0), "{balances:?}");
        for _ in 0..3 {
            let mut snapshot = client.read_only(ReadTimestamp::Strong);
            let mut balances = Vec::new();
            for index in 0..ACCOUNTS {
                balances.push(balance(snapshot.get(&account(index)).await.unwrap()));
            }
            let at = snapshot.timestamp();
            assert_eq!(
                balances.iter().sum::<i64>(),
                total,
                "round {round} at {at:?}: {balances:?}"
            );
        }
    }
    let mut aborted = 0;
    while let Some(result) = workers.join_next().await {
        aborted += result.expect("a transfer worker panicked");
    }
    println!("transfers aborted and retried: {aborted}");
    let balances = scan_all(&client).await;
    assert_eq!(balances.len(), ACCOUNTS, "{balances:?}");
    assert_eq!(balances.iter().sum::<i64>(), total, "{balances:?}\n{}", cluster.logs());
    assert!(balances.iter().any(|balance| *balance != INITIAL_BALANCE), "no transfer applied");
}

#[tokio::test]
async fn an_older_transaction_wounds_a_younger_holder() {
    let cluster = Cluster::start(3);
    init(&cluster).await;
    let client = client(&cluster.addresses);
    let mut older = client.begin();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut younger = client.begin();
    younger.get_for_update(b"hot").await.expect("the younger takes the lock first");
    // The older asks for the same lock: it wounds the younger and gets it at once.
    older.get_for_update(b"hot").await.expect("the older is granted by wounding");
    older.put(b"hot", b"older").unwrap();
    younger.put(b"hot", b"younger").unwrap();
    let error = younger.commit().await.expect_err("a wounded transaction cannot commit");
    assert!(error.is_retryable(), "{error}");
    assert!(error.to_string().contains("wounded"), "{error}");
    older.commit().await.expect("the older commits");
    let mut check = client.begin();
    assert_eq!(check.get(b"hot").await.unwrap().as_deref(), Some(&b"older"[..]));
    check.rollback().await.unwrap();
}

#[tokio::test]
async fn a_younger_transaction_waits_for_an_older_holder_and_reports_the_wait() {
    let cluster = Cluster::start(3);
    init(&cluster).await;
    let client = client(&cluster.addresses);
    let mut older = client.begin();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut younger = client.begin();
    older.get_for_update(b"hot").await.expect("the older takes the lock first");
    // The younger waits for the lock until the older commits, a second later.
    let (read, ()) = tokio::join!(younger.get_for_update(b"hot"), async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        older.put(b"hot", b"older").unwrap();
        older.commit().await.expect("the older commits");
    });
    assert_eq!(read.expect("granted once the older committed").as_deref(), Some(&b"older"[..]));
    younger.put(b"hot", b"younger").unwrap();
    let timestamp = younger.commit().await.expect("the younger commits").expect("a timestamp");
    let report = younger.report().expect("a committed transaction has a report");
    assert_eq!(report.timestamp, Some(timestamp));
    assert_eq!(report.participants.len(), 1, "{report:?}");
    assert_eq!((report.coordinator, report.prepare), (None, None), "one range, one phase");
    assert!(report.leader.is_some(), "{report:?}");
    // Its request reached the leader well within the second the older held the lock.
    assert!(report.lock_wait >= Duration::from_millis(200), "{report:?}");
    let older_report = older.report().expect("the older's report");
    assert!(older_report.lock_wait < report.lock_wait, "{older_report:?}");
}

#[tokio::test]
async fn locks_lost_with_their_leader_force_a_retry() {
    let mut cluster = Cluster::start(3);
    init(&cluster).await;
    let client = client(&cluster.addresses);
    let mut setup = client.begin();
    setup.put(b"k", b"0").unwrap();
    setup.commit().await.unwrap();
    let mut txn = client.begin();
    assert_eq!(txn.get(b"k").await.unwrap().as_deref(), Some(&b"0"[..]));
    let leader = leader_of_first_range(&cluster).await;
    cluster.kill(leader - 1);
    let survivor = cluster.addresses[leader % cluster.addresses.len()].clone();
    let elected = eventually(Duration::from_secs(20), || async {
        let view = status(&survivor).await?;
        first_data_range(&view)
            .map(|range| range.leader)
            .filter(|new| *new != 0 && *new != leader as u64)
    })
    .await;
    assert!(elected.is_some(), "no new leader\n{}", cluster.logs());
    // The read's lock died with its leader: the commit must not go through on it.
    txn.put(b"k", b"1").unwrap();
    let error = txn.commit().await.expect_err("a commit on lost locks");
    assert!(error.is_retryable(), "{error}\n{}", cluster.logs());
    assert!(error.to_string().contains("lost its locks"), "{error}");
}

#[tokio::test]
async fn commits_over_several_ranges_apply_atomically_and_release_their_locks() {
    let cluster = Cluster::start(3);
    init(&cluster).await;
    let output = meridian(&["split", "--host", &cluster.addresses[0], "m"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let client = client(&cluster.addresses);
    let mut txn = client.begin();
    assert_eq!(txn.get_for_update(b"a").await.unwrap(), None);
    assert_eq!(txn.get(b"y").await.unwrap(), None);
    txn.put(b"a", b"1").unwrap();
    txn.put(b"z", b"2").unwrap();
    let committed = txn.commit().await.expect("a commit over two ranges");
    let committed = committed.expect("a commit timestamp");
    let report = txn.report().expect("a committed transaction has a report").clone();
    assert_eq!(report.timestamp, Some(committed));
    assert_eq!(report.participants.len(), 2, "{report:?}");
    // The range of the first write ("a", left of the split, which kept the lower id).
    assert_eq!(report.coordinator, report.participants.first().copied(), "{report:?}");
    assert!(report.prepare.is_some(), "{report:?}");
    let leader = report.leader.expect("the coordinator's timings");
    assert!(leader.epsilon > Duration::ZERO, "{report:?}");
    // The leader's commit-wait happened within the client's commit call.
    assert!(report.latency >= leader.commit_wait + leader.logged, "{report:?}");
    // Both writes are visible at the one commit timestamp, and every lock was released: other
    // transactions take them well before the 5 s after which abandoned locks would go.
    let options = ClientOptions { deadline: Duration::from_secs(2), ..ClientOptions::default() };
    let quick = Client::new(cluster.addresses.clone(), options).unwrap();
    let mut next = quick.begin();
    assert_eq!(next.get_for_update(b"a").await.unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(next.get_for_update(b"y").await.unwrap(), None);
    assert_eq!(next.get_for_update(b"z").await.unwrap().as_deref(), Some(&b"2"[..]));
    next.put(b"a", b"3").unwrap();
    next.put(b"z", b"4").unwrap();
    let later = next.commit().await.unwrap().expect("a commit timestamp");
    assert!(later > committed, "{later} after {committed}");
    // (A strong read-only transaction waits for the participant's outcome; a plain key-value
    // read, which takes no part in transactions, may arrive before it applied.)
    let mut strong = quick.read_only(ReadTimestamp::Strong);
    for (key, value) in [("a", "3"), ("z", "4")] {
        let version = strong.get_version(key.as_bytes()).await.unwrap();
        assert_eq!(version.value.as_deref(), Some(value.as_bytes()));
        assert_eq!(version.timestamp, later, "{key} was written at the commit timestamp");
    }
    // A participant that cannot prepare (wounded by an older transaction) aborts the whole
    // transaction: the coordinator's part is not written either, and its lock is released.
    let mut older = client.begin();
    let mut younger = client.begin();
    younger.get(b"x").await.unwrap();
    older.get_for_update(b"x").await.expect("the older wounds the younger reader");
    younger.put(b"b", b"5").unwrap();
    younger.put(b"x", b"6").unwrap();
    let error = younger.commit().await.expect_err("a wounded participant");
    assert!(error.is_retryable(), "{error}");
    assert!(error.to_string().contains("wounded"), "{error}");
    older.rollback().await.unwrap();
    let mut next = quick.begin();
    assert_eq!(next.get_for_update(b"b").await.unwrap(), None, "the aborted write applied");
    assert_eq!(next.get_for_update(b"x").await.unwrap(), None);
    next.rollback().await.unwrap();
}

#[tokio::test]
async fn a_participant_prepared_for_an_unknown_commit_is_aborted() {
    let cluster = Cluster::start(3);
    init(&cluster).await;
    let output = meridian(&["split", "--host", &cluster.addresses[0], "m"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let client = client(&cluster.addresses);
    let coordinator = client.lookup_fresh(b"a").await.unwrap().range_id;
    let participant = client.lookup_fresh(b"z").await.unwrap().range_id;
    assert_ne!(coordinator, participant);
    // A client prepares a part at `z` and dies before asking the coordinator to commit.
    let txn = rand::random::<u128>().to_be_bytes().to_vec();
    let request = TxnPrepareRequest {
        range_id: participant,
        header: Some(TxnHeader {
            txn: txn.clone(),
            priority: Some(TxnPriority { start: 1, first_txn: txn, attempt: 0 }),
            held_since: None,
        }),
        coordinator,
        writes: vec![TxnWrite { key: b"z".to_vec(), value: Some(b"orphan".to_vec()) }],
    };
    let prepared = eventually(Duration::from_secs(10), || async {
        for address in &cluster.addresses {
            let mut node = KvClient::connect(format!("http://{address}")).await.ok()?;
            if let Ok(response) = node.txn_prepare(request.clone()).await {
                return Some(response.into_inner().prepare_ts);
            }
        }
        None
    })
    .await;
    assert!(
        prepared.is_some_and(|ts| ts > 0),
        "the part was not prepared
{}",
        cluster.logs()
    );
    // Its locks hold `z` until the participant asks the coordinator, which knows nothing of
    // the transaction and logs an abort; then the write is dropped and the lock released.
    let started = Instant::now();
    let mut txn = client.begin();
    let value = loop {
        match txn.get_for_update(b"z").await {
            Ok(value) => break value,
            Err(error) if started.elapsed() < Duration::from_secs(30) => {
                assert!(!error.to_string().contains("orphan"), "{error}");
                txn = txn.retry().await;
            }
            Err(error) => panic!(
                "the prepared part was never resolved: {error}
{}",
                cluster.logs()
            ),
        }
    };
    assert_eq!(value, None, "the orphan's write was applied");
    txn.put(b"z", b"mine").unwrap();
    txn.commit().await.unwrap();
    println!("resolved after {:?}", started.elapsed());
}

#[tokio::test]
async fn the_txn_command_commits_and_refuses_bad_input() {
    let cluster = Cluster::start(3);
    init(&cluster).await;
    let host = &cluster.addresses[0];
    let stdout = |output: &Output| String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = |output: &Output| String::from_utf8_lossy(&output.stderr).into_owned();

    let output = meridian(&["txn", "--host", host, "put", "x", "1", "put", "y", "2"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("committed at"), "{}", stdout(&output));
    let output = meridian(&["txn", "--host", host, "get", "x", "scan", "x", "-", "delete", "y"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("x = 1\nx = 1\ny = 2\ncommitted at"), "{}", stdout(&output));
    assert!(stdout(&output).contains("commit-wait"), "the commit report: {}", stdout(&output));
    let output = meridian(&["txn", "--host", host, "get", "y"]);
    assert!(stdout(&output).contains("y: (not found)\ncommitted (nothing written)"));
    let output = meridian(&["txn", "--host", host, "--read-only", "get", "x", "scan", "a", "z"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let read_at = stdout(&output);
    assert!(read_at.starts_with("x = 1\nx = 1\nread at "), "{read_at}");
    let timestamp = read_at.trim().rsplit(' ').next().unwrap().to_string();
    let output = meridian(&["txn", "--host", host, "--as-of", &timestamp, "get", "y"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), format!("y: (not found)\nread at {timestamp}\n"));
    let output = meridian(&["txn", "--host", host, "--max-staleness", "5000", "get", "x"]);
    assert!(stdout(&output).starts_with("x = 1\nread at "), "{}", stdout(&output));
    let output = meridian(&["txn", "--host", host, "--read-only", "put", "x", "2"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("`put` is not allowed"), "{}", stderr(&output));
    let output = meridian(&["txn", "--host", host, "--as-of", "1", "--read-only", "get", "x"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("cannot be used with"), "{}", stderr(&output));

    for (words, message) in [
        (&["frob", "x"][..], "unknown transaction operation `frob`"),
        (&["put", "x"][..], "`put` needs a value"),
        (&["scan", "a"][..], "`scan` needs an end key"),
    ] {
        let mut args = vec!["txn", "--host", host.as_str()];
        args.extend_from_slice(words);
        let output = meridian(&args);
        assert!(!output.status.success(), "{words:?} succeeded");
        assert!(stderr(&output).contains(message), "{words:?}: {}", stderr(&output));
    }
}

#[tokio::test]
async fn heartbeats_keep_an_idle_transactions_locks() {
    let cluster = Cluster::start(3);
    init(&cluster).await;
    let output = meridian(&["split", "--host", &cluster.addresses[0], "m"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let with_interval = |interval: Duration| {
        let options = ClientOptions { heartbeat_interval: interval, ..ClientOptions::default() };
        Client::new(cluster.addresses.clone(), options).unwrap()
    };
    // Idle for longer than the leaders' 5 s abandonment timeout, between reads at two ranges
    // and the commit.
    let (alive, silent) =
        (with_interval(Duration::from_secs(1)), with_interval(Duration::from_secs(600)));
    let (mut kept, mut lost) = (alive.begin(), silent.begin());
    for txn in [&mut kept, &mut lost] {
        txn.get(b"a").await.unwrap();
        txn.get(b"z").await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(7)).await;
    kept.put(b"a", b"kept").unwrap();
    kept.put(b"z", b"kept").unwrap();
    kept.commit().await.expect("its heartbeats kept its locks");
    lost.put(b"a", b"lost").unwrap();
    let error = lost.commit().await.expect_err("a silent transaction's locks were released");
    assert!(error.is_retryable(), "{error}");
    assert!(error.to_string().contains("lost its locks"), "{error}");
}

#[tokio::test]
async fn malformed_two_phase_calls_are_refused() {
    use meridian_rpc::kv::{
        TxnAbortRequest, TxnCommitRequest, TxnDecision, TxnOutcomeRequest, TxnVoteRequest,
    };
    let cluster = Cluster::start(3);
    init(&cluster).await;
    let data = FIRST_DATA_RANGE.0;
    let txn = 7u128.to_be_bytes().to_vec();
    let header = Some(TxnHeader {
        txn: txn.clone(),
        priority: Some(TxnPriority { start: 1, first_txn: txn.clone(), attempt: 0 }),
        held_since: None,
    });
    let write = vec![TxnWrite { key: b"k".to_vec(), value: Some(b"v".to_vec()) }];
    let mut node = KvClient::connect(format!("http://{}", cluster.addresses[0])).await.unwrap();
    fn refused<T>(result: Result<tonic::Response<T>, tonic::Status>, message: &str) {
        let status = result.err().expect("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(message), "{message}: {status:?}");
        assert!(meridian_rpc::metadata::took_no_effect(&status), "{status:?}");
    }
    let prepare = |coordinator: u64| TxnPrepareRequest {
        range_id: data,
        header: header.clone(),
        coordinator,
        writes: write.clone(),
    };
    refused(node.txn_prepare(prepare(META_RANGE.0)).await, "another range");
    refused(node.txn_prepare(prepare(data)).await, "another range");
    let commit = |participants: Vec<u64>| TxnCommitRequest {
        range_id: data,
        header: header.clone(),
        writes: write.clone(),
        participants,
    };
    refused(node.txn_commit(commit(vec![data + 1, data + 2])).await, "not a participant");
    refused(node.txn_commit(commit(vec![data, data])).await, "named twice");
    refused(node.txn_commit(commit(vec![data, META_RANGE.0])).await, "meta range");
    let vote = |participant: u64, prepare_ts: u64| TxnVoteRequest {
        range_id: data,
        txn: txn.clone(),
        participant,
        prepare_ts,
        query: false,
    };
    refused(node.txn_vote(vote(data, 5)).await, "own range");
    refused(node.txn_vote(vote(data + 1, 0)).await, "prepare timestamp");
    let abort = TxnAbortRequest {
        range_id: META_RANGE.0,
        txn: txn.clone(),
        participants: vec![],
        reason: String::new(),
    };
    refused(node.txn_abort(abort).await, "meta range");
    let abort = TxnAbortRequest {
        range_id: data,
        txn: vec![1, 2],
        participants: vec![],
        reason: String::new(),
    };
    refused(node.txn_abort(abort).await, "16 bytes");
    let outcome = TxnOutcomeRequest {
        range_id: data,
        txn: txn.clone(),
        decision: Some(TxnDecision { commit: true, commit_ts: 0, abort_reason: String::new() }),
    };
    refused(node.txn_outcome(outcome).await, "timestamp");
}

#[tokio::test]
async fn ranges_collect_versions_older_than_the_gc_ttl() {
    let cluster = Cluster::start_with(3, &["--gc-ttl-s", "1"]);
    init(&cluster).await;
    let client = client(&cluster.addresses);
    let first = client.put(b"g", b"1").await.unwrap();
    client.put(b"g", b"2").await.unwrap();
    // Versions older than the TTL are collected and reads below the horizon are refused
    // (the range stays awake while writes go on: quiesced ranges collect when they wake).
    let refused = eventually(Duration::from_secs(30), || async {
        client.put(b"other", b"x").await.ok()?;
        let mut stale = client.read_only(ReadTimestamp::Exact(first));
        match stale.get(b"g").await {
            Err(error) if error.to_string().contains("GC horizon") => Some(error.to_string()),
            _ => None,
        }
    })
    .await;
    assert!(refused.is_some(), "the old version stayed readable\n{}", cluster.logs());
    let mut strong = client.read_only(ReadTimestamp::Strong);
    assert_eq!(strong.get(b"g").await.unwrap().as_deref(), Some(&b"2"[..]));
    let output = meridian(&["start", "--node-id", "9", "--store", "x", "--gc-ttl-s", "0"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("gc-ttl-s"), "{output:?}");
}

#[tokio::test]
async fn read_only_transactions_read_one_snapshot_at_a_chosen_timestamp() {
    let cluster = Cluster::start(3);
    init(&cluster).await;
    let output = meridian(&["split", "--host", &cluster.addresses[0], "m"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let client = client(&cluster.addresses);
    let commit = |a: &'static str, z: &'static str| {
        let client = &client;
        async move {
            let mut txn = client.begin();
            txn.put(b"a", a.as_bytes()).unwrap();
            txn.put(b"z", z.as_bytes()).unwrap();
            txn.commit().await.unwrap().expect("a commit timestamp")
        }
    };
    let first = commit("a1", "z1").await;
    let second = commit("a2", "z2").await;
    // A strong read sees every commit acknowledged before it began, at both ranges.
    let mut strong = client.read_only(ReadTimestamp::Strong);
    assert_eq!(strong.get(b"a").await.unwrap().as_deref(), Some(&b"a2"[..]));
    assert_eq!(strong.get(b"z").await.unwrap().as_deref(), Some(&b"z2"[..]));
    assert!(strong.timestamp().unwrap() >= second);
    // Exact timestamps read the snapshot as of then, across ranges.
    for (at, expected) in
        [(first - 1, None), (first, Some("1")), (second - 1, Some("1")), (second, Some("2"))]
    {
        let mut stale = client.read_only(ReadTimestamp::Exact(at));
        let rows = stale.scan(b"", None, 10).await.unwrap();
        let expected: Vec<(Vec<u8>, Vec<u8>)> = match expected {
            None => Vec::new(),
            Some(n) => vec![
                (b"a".to_vec(), format!("a{n}").into_bytes()),
                (b"z".to_vec(), format!("z{n}").into_bytes()),
            ],
        };
        assert_eq!(rows, expected, "at {at}");
        assert_eq!(stale.timestamp(), Some(at));
    }
    // A bounded-staleness read is served at a timestamp no older than its bound.
    let mut bounded = client.read_only(ReadTimestamp::MaxStaleness(Duration::from_secs(10)));
    assert_eq!(bounded.get(b"z").await.unwrap().as_deref(), Some(&b"z2"[..]));
    assert!(bounded.timestamp().unwrap() >= second);
    // A timestamp in the future is refused.
    let future = second + Duration::from_secs(3600).as_nanos() as u64;
    let error = client.read_only(ReadTimestamp::Exact(future)).get(b"a").await.unwrap_err();
    assert!(error.to_string().contains("in the future"), "{error}");
}
