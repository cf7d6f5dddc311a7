//! The bank: transactions under the faults. Four accounts lie in four ranges (once the
//! splitter has split the key space), so most transfers commit by two-phase commit across
//! range leaders that crash, lose their leadership and their messages.
//!
//! - **Tellers** move money between two random accounts in read-write transactions (reads
//!   under locks, then both writes), retrying aborted attempts with their priority; a commit
//!   of unknown outcome is counted and left, as a client must.
//! - **Auditors** read every account, lock-free at one timestamp (strong read-only
//!   transactions, from the leaders or from followers below their ranges' safe time) or under
//!   locks (a read-write transaction that commits without writes): a read that completes must
//!   see the total, and no negative balance.
//! - Once the faults heal, a **final audit** reads the accounts both ways: the total holds
//!   and nothing stays locked or prepared forever (the reads must succeed).
//! - **Snapshot audits follow real time**: one that began after another completed (in true
//!   time) sees no account at an older version — what a completed read returned stays
//!   visible to every later one (commit-wait covers reads too).
//!
//! Every account's key sorts among the simulation's keys (`k02/bank` after `k02`), so the
//! workers' scans and the final scan skip them (`is_account`).

use std::sync::Arc;
use std::time::Duration;

use meridian_client::{Client, ReadFrom, ReadTimestamp, TxnError};
use meridian_raft::SplitMix64;
use meridian_rpc::dial::Dialer;
use parking_lot::Mutex;

use crate::workload::{Shared, client};

/// The accounts: one in each range the splitter makes.
pub const ACCOUNTS: [&str; 4] = ["k02/bank", "k05/bank", "k08/bank", "k11/bank"];
/// Every account's opening balance.
const OPENING: i64 = 100;
/// Tellers and auditors, and the transfers each teller makes.
pub const TELLERS: usize = 2;
pub const AUDITORS: usize = 2;
const TRANSFERS: usize = 25;
/// Attempts of one transfer (aborts are retried with the transaction's priority).
const ATTEMPTS: usize = 8;
/// Audits each auditor makes.
const AUDITS: usize = 30;

/// Whether `key` is one of the bank's accounts.
pub fn is_account(key: &[u8]) -> bool {
    ACCOUNTS.iter().any(|account| account.as_bytes() == key)
}

/// What the bank saw.
#[derive(Clone, Debug, Default)]
pub struct BankStats {
    /// Transfers committed, aborted after every attempt, of unknown outcome, failed otherwise.
    pub committed: u64,
    pub gave_up: u64,
    pub ambiguous: u64,
    pub failed: u64,
    /// Attempts aborted (and retried).
    pub retries: u64,
    /// Audits that completed: lock-free, and under locks.
    pub snapshot_audits: u64,
    pub locked_audits: u64,
    /// What broke the bank's invariants.
    pub violations: Vec<String>,
}

/// A completed snapshot audit: when it was invoked and completed (true time) and the commit
/// timestamp of each account's version it read.
#[derive(Clone, Debug)]
struct SnapshotAudit {
    invoked: u64,
    completed: u64,
    versions: Vec<u64>,
}

/// The bank's shared state.
#[derive(Default)]
pub struct Bank {
    pub stats: Mutex<BankStats>,
    audits: Mutex<Vec<SnapshotAudit>>,
}

impl Bank {
    /// Checks that snapshot audits follow real time (see the module docs).
    pub fn check_real_time(&self) -> Result<(), String> {
        let audits = self.audits.lock();
        for earlier in audits.iter() {
            for later in audits.iter().filter(|later| later.invoked > earlier.completed) {
                for (index, (old, new)) in earlier.versions.iter().zip(&later.versions).enumerate()
                {
                    if new < old {
                        return Err(format!(
                            "a snapshot read invoked at {} saw {} at version {new}, older than \
                             version {old} seen by a read completed at {}",
                            later.invoked, ACCOUNTS[index], earlier.completed
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn balance(value: Option<Vec<u8>>) -> Result<i64, String> {
    let value = value.ok_or("an account is missing")?;
    String::from_utf8_lossy(&value)
        .parse()
        .map_err(|_| format!("an account holds {:?}", String::from_utf8_lossy(&value)))
}

/// Checks what an audit read: the total and no negative balance.
fn audit(bank: &Bank, how: &str, balances: Result<Vec<i64>, String>, at: Option<u64>) {
    let total = OPENING * ACCOUNTS.len() as i64;
    let problem = match balances {
        Err(problem) => Some(problem),
        Ok(balances) if balances.iter().sum::<i64>() != total => {
            Some(format!("the total is {} in {balances:?}", balances.iter().sum::<i64>()))
        }
        Ok(balances) if balances.iter().any(|balance| *balance < 0) => {
            Some(format!("a negative balance in {balances:?}"))
        }
        Ok(_) => None,
    };
    if let Some(problem) = problem {
        bank.stats.lock().violations.push(format!("{how} read at {at:?}: {problem}"));
    }
}

/// Opens the accounts (the same values each time: retried until it commits).
pub async fn open_accounts(dialer: &Dialer) -> Result<(), String> {
    let client = client(dialer, Duration::from_secs(10));
    let mut last = String::new();
    for _ in 0..20 {
        let mut txn = client.begin();
        for account in ACCOUNTS {
            txn.put(account.as_bytes(), OPENING.to_string().as_bytes())
                .map_err(|error| error.to_string())?;
        }
        match txn.commit().await {
            Ok(_) => return Ok(()),
            Err(error) => last = error.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!("the accounts could not be opened: {last}"))
}

/// One transfer's attempts; returns how it ended.
async fn transfer(client: &Client, bank: &Bank, from: usize, to: usize, amount: i64) {
    let mut txn = client.begin();
    for _ in 0..ATTEMPTS {
        let attempt = async {
            let from_balance = txn.get(ACCOUNTS[from].as_bytes()).await?;
            let to_balance = txn.get(ACCOUNTS[to].as_bytes()).await?;
            let (Ok(from_balance), Ok(to_balance)) = (balance(from_balance), balance(to_balance))
            else {
                return Ok(false);
            };
            if from_balance >= amount {
                txn.put(ACCOUNTS[from].as_bytes(), (from_balance - amount).to_string().as_bytes())?;
                txn.put(ACCOUNTS[to].as_bytes(), (to_balance + amount).to_string().as_bytes())?;
            }
            Ok::<bool, TxnError>(true)
        }
        .await;
        let result = match attempt {
            Ok(true) => txn.commit().await.map(|_| ()),
            Ok(false) => {
                bank.stats.lock().violations.push("a transfer read a missing account".into());
                let _ = txn.rollback().await;
                return;
            }
            Err(error) => Err(error),
        };
        match result {
            Ok(()) => {
                bank.stats.lock().committed += 1;
                return;
            }
            Err(TxnError::Client(error)) if error.is_ambiguous() => {
                bank.stats.lock().ambiguous += 1;
                return;
            }
            Err(error) if error.is_retryable() => {
                bank.stats.lock().retries += 1;
                txn = txn.retry().await;
            }
            Err(_) => {
                bank.stats.lock().failed += 1;
                let _ = txn.rollback().await;
                return;
            }
        }
    }
    bank.stats.lock().gave_up += 1;
    let _ = txn.rollback().await;
}

/// A teller: transfers between random accounts.
pub async fn teller(dialer: Dialer, shared: Arc<Shared>, index: usize, seed: u64) {
    let client = client(&dialer, Duration::from_secs(5));
    let mut rng = SplitMix64::new(seed);
    for transfer_number in 0..TRANSFERS {
        tokio::time::sleep(Duration::from_millis(rng.next_u64() % 1_500)).await;
        let from = rng.next_u64() as usize % ACCOUNTS.len();
        let to = (from + 1 + rng.next_u64() as usize % (ACCOUNTS.len() - 1)) % ACCOUNTS.len();
        let amount = 1 + (rng.next_u64() % 30) as i64;
        shared.doing.lock().insert(
            format!("teller {index}"),
            format!("transfer {transfer_number}: {amount} from {from} to {to}"),
        );
        transfer(&client, &shared.bank, from, to, amount).await;
    }
}

/// Reads every account at one timestamp without locks, from `from`, starting with account
/// `first` (whose range's replica picks the timestamp); records the audit if it completes.
async fn snapshot_audit(
    client: &Client,
    shared: &Shared,
    first: usize,
    from: ReadFrom,
) -> Option<(Result<Vec<i64>, String>, Option<u64>)> {
    let invoked = shared.record.true_now();
    let mut snapshot = client.read_only(ReadTimestamp::Strong).read_from(from);
    let (mut balances, mut versions) = (vec![0; ACCOUNTS.len()], vec![0; ACCOUNTS.len()]);
    for offset in 0..ACCOUNTS.len() {
        let index = (first + offset) % ACCOUNTS.len();
        let version = snapshot.get_version(ACCOUNTS[index].as_bytes()).await.ok()?;
        versions[index] = version.timestamp;
        match balance(version.value) {
            Ok(balance) => balances[index] = balance,
            Err(problem) => return Some((Err(problem), snapshot.timestamp())),
        }
    }
    let completed = shared.record.true_now();
    shared.bank.audits.lock().push(SnapshotAudit { invoked, completed, versions });
    Some((Ok(balances), snapshot.timestamp()))
}

/// Reads every account under locks; counts only if the transaction still held them all at
/// its end (it commits without writes).
async fn locked_audit(client: &Client) -> Option<Result<Vec<i64>, String>> {
    let mut txn = client.begin();
    let mut balances = Vec::new();
    for account in ACCOUNTS {
        match txn.get(account.as_bytes()).await {
            Ok(value) => balances.push(value),
            Err(_) => {
                let _ = txn.rollback().await;
                return None;
            }
        }
    }
    txn.commit().await.ok()?;
    Some(balances.into_iter().map(balance).collect())
}

/// An auditor: reads every account, alternately without and under locks.
pub async fn auditor(dialer: Dialer, shared: Arc<Shared>, index: usize, seed: u64) {
    let client = client(&dialer, Duration::from_secs(5));
    let mut rng = SplitMix64::new(seed);
    for audit_number in 0..AUDITS {
        tokio::time::sleep(Duration::from_millis(rng.next_u64() % 1_000)).await;
        shared.doing.lock().insert(format!("auditor {index}"), format!("audit {audit_number}"));
        if rng.next_u64().is_multiple_of(3) {
            if let Some(balances) = locked_audit(&client).await {
                shared.bank.stats.lock().locked_audits += 1;
                audit(&shared.bank, "a locked", balances, None);
            }
        } else if let Some((balances, at)) = {
            let first = rng.next_u64() as usize % ACCOUNTS.len();
            let from = if first.is_multiple_of(2) { ReadFrom::Follower } else { ReadFrom::Leader };
            snapshot_audit(&client, &shared, first, from).await
        } {
            shared.bank.stats.lock().snapshot_audits += 1;
            audit(&shared.bank, "a snapshot", balances, at);
        }
    }
}

/// The final audit, once the faults healed: both reads must succeed and see the total.
pub async fn final_audit(checker: &Client, shared: &Shared) -> Result<(), String> {
    let bank = &shared.bank;
    let (balances, at) = snapshot_audit(checker, shared, 0, ReadFrom::Leader)
        .await
        .ok_or("the final snapshot read of the accounts failed")?;
    audit(bank, "the final snapshot", balances, at);
    let mut locked = None;
    for _ in 0..10 {
        locked = locked_audit(checker).await;
        if locked.is_some() {
            break;
        }
    }
    let balances = locked.ok_or("the final locked read of the accounts kept failing")?;
    audit(bank, "the final locked", balances, None);
    Ok(())
}
