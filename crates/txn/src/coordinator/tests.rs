//! Coordinator golden scripts: one behaviour per file in `testscripts/coordinator/`.

use std::collections::VecDeque;
use std::fmt::Write as _;

use test_each_file::test_each_path;

use super::*;
use crate::script_support::{ScriptResult, parse_range, parse_txn, take_u64};

/// Runs coordinator commands from a goldenscript and prints every output. Timestamps are
/// plain nanoseconds; transactions are `tN`, ranges `rN`. Proposed records queue up like
/// entries in the range's log until applied.
/// - `request TXN [participants=r2/r3] at=LATEST [epsilon=E] [floor=F]`: the client's commit
///   request, with the clock reading `[LATEST - E, LATEST]`.
/// - `vote TXN range=R ts=T [query] [floor=F]`: a participant's vote or status query.
/// - `fail TXN range=R`: a participant could not prepare.
/// - `abort TXN [participants=r2/r3]`: the client gives the transaction up.
/// - `refuse TXN`: Raft refused the last record proposed for TXN.
/// - `tick at=T`: re-proposals and the vote timeout check (timeout 100).
/// - `apply [TXN]`: apply the oldest proposed record (of TXN).
/// - `leader`: this replica becomes leader again (memory lost, decisions kept).
/// - `follower`: this replica becomes a follower (it applies records and outputs nothing).
struct CoordinatorRunner {
    coordinator: Coordinator,
    log: VecDeque<(TxnId, TxnRecord)>,
    floor: Timestamp,
}

fn show_decision(decision: &Decision) -> String {
    match decision {
        Decision::Commit { commit_ts } => format!("commit@{}", commit_ts.as_nanos()),
        Decision::Abort { reason } => format!("abort ({reason})"),
    }
}

fn show_ranges(ranges: &BTreeSet<RangeId>) -> String {
    let names: Vec<String> = ranges.iter().map(ToString::to_string).collect();
    format!("[{}]", names.join(", "))
}

impl goldenscript::Runner for CoordinatorRunner {
    type Command = goldenscript::Command;

    fn run(
        &mut self,
        command: &goldenscript::Command,
        _: &goldenscript::Context,
    ) -> ScriptResult<String> {
        let mut args = command.consume_args();
        let mut output = String::new();
        if let Some(floor) = take_u64(&mut args, "floor")? {
            self.floor = Timestamp::from_nanos(floor);
        }
        match command.name.as_str() {
            "request" => {
                let txn = parse_txn(args.next_pos().ok_or("missing txn")?)?;
                let participants = match args.take_key("participants") {
                    Some(list) => list.split('/').map(parse_range).collect::<ScriptResult<_>>()?,
                    None => BTreeSet::new(),
                };
                let latest = take_u64(&mut args, "at")?.ok_or("missing at")?;
                let epsilon = take_u64(&mut args, "epsilon")?.unwrap_or(0);
                let now = Interval {
                    earliest: Timestamp::from_nanos(latest - epsilon),
                    latest: Timestamp::from_nanos(latest),
                };
                let local = Timestamp::from_nanos(latest - epsilon / 2);
                self.coordinator.request_commit(txn, participants, now, local, self.floor)?;
            }
            "vote" => {
                let txn = parse_txn(args.next_pos().ok_or("missing txn")?)?;
                let range = parse_range(args.take_key("range").ok_or("missing range")?)?;
                let ts = Timestamp::from_nanos(take_u64(&mut args, "ts")?.ok_or("missing ts")?);
                let query = args.next_pos() == Some("query");
                self.coordinator.on_prepared(txn, range, ts, query, self.floor);
            }
            "fail" => {
                let txn = parse_txn(args.next_pos().ok_or("missing txn")?)?;
                let range = parse_range(args.take_key("range").ok_or("missing range")?)?;
                self.coordinator.on_prepare_failed(txn, range, "wounded".to_owned());
            }
            "abort" => {
                let txn = parse_txn(args.next_pos().ok_or("missing txn")?)?;
                let participants = match args.take_key("participants") {
                    Some(list) => list.split('/').map(parse_range).collect::<ScriptResult<_>>()?,
                    None => BTreeSet::new(),
                };
                self.coordinator.request_abort(txn, participants, "client gave up".to_owned());
            }
            "refuse" => {
                // Raft refused the last record proposed for TXN: it never enters the log.
                let txn = parse_txn(args.next_pos().ok_or("missing txn")?)?;
                let position = self
                    .log
                    .iter()
                    .rposition(|(logged, _)| *logged == txn)
                    .ok_or("no such record proposed")?;
                self.log.remove(position);
                let _ = self.coordinator.on_proposal_refused(txn);
            }
            "tick" => {
                let at = take_u64(&mut args, "at")?.ok_or("missing at")?;
                self.coordinator.tick(Timestamp::from_nanos(at));
            }
            "apply" => {
                let position = match args.next_pos() {
                    Some(txn) => {
                        let txn = parse_txn(txn)?;
                        self.log.iter().position(|(logged, _)| *logged == txn)
                    }
                    None => (!self.log.is_empty()).then_some(0),
                };
                let (txn, record) =
                    self.log.remove(position.ok_or("no such record proposed")?).expect("found");
                let decision = self.coordinator.apply(txn, record.clone());
                writeln!(
                    output,
                    "applied t{} {}: in effect {}",
                    txn.0,
                    show_decision(&record.decision),
                    show_decision(&decision)
                )?;
            }
            "leader" => self.coordinator.become_leader(),
            "follower" => self.coordinator.become_follower(),
            name => return Err(format!("unknown command {name}").into()),
        }
        args.reject_next()?;
        for out in self.coordinator.take_outputs() {
            match out {
                CoordinatorOutput::Propose { txn, record } => {
                    writeln!(
                        output,
                        "propose t{} {} participants {}",
                        txn.0,
                        show_decision(&record.decision),
                        show_ranges(&record.participants)
                    )?;
                    self.log.push_back((txn, record));
                }
                CoordinatorOutput::Reply { txn, decision } => {
                    writeln!(output, "reply t{} {}", txn.0, show_decision(&decision))?;
                }
                CoordinatorOutput::Notify { txn, participants, decision } => writeln!(
                    output,
                    "notify {} of t{} {}",
                    show_ranges(&participants),
                    txn.0,
                    show_decision(&decision)
                )?,
            }
        }
        Ok(output)
    }
}

test_each_path! { in "crates/txn/testscripts/coordinator" as scripts => run_script }

fn run_script(path: &std::path::Path) {
    let options = CoordinatorOptions {
        vote_timeout: Duration::from_nanos(100),
        ..CoordinatorOptions::default()
    };
    let mut coordinator = Coordinator::new(options);
    coordinator.become_leader();
    let mut runner =
        CoordinatorRunner { coordinator, log: VecDeque::new(), floor: Timestamp::ZERO };
    goldenscript::run(&mut runner, path).expect("goldenscript failed");
}
