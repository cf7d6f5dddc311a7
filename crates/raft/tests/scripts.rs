//! Golden-script tests of the Raft node: one behaviour per file in `testscripts/node/`.
//! Regenerate the expected output with `UPDATE_GOLDENFILES=1 cargo test -p meridian-raft
//! --test scripts` and review the diff.
//!
//! Commands (node ids are numbers; `ID...` means one or more, default all):
//! - `cluster nodes=N [voters=N] [lease_ms=MS] [election=TICKS] [heartbeat=TICKS]
//!   [prevote=BOOL] [check_quorum=BOOL] [max_append_bytes=N]`: a new group of `voters` voters among `nodes` nodes.
//! - `campaign ID`: start an election now.
//! - `tick [ID...]`: advance time by 10 ms and tick the nodes.
//! - `time MS`: advance time without ticking.
//! - `deliver [ID...]`: deliver queued messages to the nodes (once).
//! - `stabilize`: deliver and process until no message is left.
//! - `run TICKS`: tick every node and stabilize, TICKS times.
//! - `propose ID DATA`, `read ID CONTEXT`, `lease ID`, `transfer ID TARGET`,
//!   `config ID voters=IDS [learners=IDS]` (`IDS` like `1/2/3`), `compact ID`.
//! - `partition IDS IDS...`: only nodes in the same group talk (`IDS` like `1/2`); `heal`.
//! - `crash ID`, `restart ID`.
//! - `status [ID...]`, `log ID`.
//! - `quiesce ID` (ask a leader to go quiet), `wake ID`, `quiet`: which nodes are quiesced.
//!
//! Every message sent, entry applied, read released and change of role, term, leader or
//! commit index is printed.

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error as StdError;
use std::fmt::Write as _;

use meridian_raft::sim::display;
use meridian_raft::{
    Config, Configuration, Interval, MemStorage, Message, NodeId, RawNode, Snapshot, Status,
    Storage,
};
use test_each_file::test_each_path;

type ScriptResult<T> = Result<T, Box<dyn StdError>>;

const EPOCH_NS: u64 = 1_767_225_600_000_000_000;
const EPSILON_NS: u64 = 2_000_000;
const TICK_NS: u64 = 10_000_000;

#[derive(Default)]
struct Runner {
    nodes: BTreeMap<NodeId, RawNode<MemStorage>>,
    crashed: BTreeMap<NodeId, MemStorage>,
    configs: BTreeMap<NodeId, Config>,
    queue: Vec<Message>,
    groups: Option<Vec<BTreeSet<NodeId>>>,
    time_ns: u64,
}

fn parse_ids(text: &str) -> ScriptResult<BTreeSet<NodeId>> {
    if text.is_empty() {
        return Ok(BTreeSet::new());
    }
    text.split(['/', ',']).map(|id| Ok(NodeId(id.parse()?))).collect()
}

fn status_line(status: &Status) -> String {
    let leader = status.leader.map_or("none".into(), |id| id.to_string());
    let mut line = format!(
        "n{} {:?} term={} leader={leader} last={} commit={} applied={} {}",
        status.id,
        status.role,
        status.term,
        status.last_index,
        status.commit,
        status.applied,
        status.configuration
    );
    if status.lease_end > 0 {
        let _ = write!(line, " lease_end=+{}ms", (status.lease_end - EPOCH_NS) / 1_000_000);
    }
    line
}

impl Runner {
    fn now(&self) -> Interval {
        let true_time = EPOCH_NS + self.time_ns;
        Interval { earliest: true_time - EPSILON_NS, latest: true_time + EPSILON_NS }
    }

    fn node(&mut self, id: NodeId) -> ScriptResult<&mut RawNode<MemStorage>> {
        self.nodes.get_mut(&id).ok_or_else(|| format!("node {id} is not running").into())
    }

    fn connected(&self, from: NodeId, to: NodeId) -> bool {
        self.groups.as_ref().is_none_or(|groups| {
            groups.iter().any(|group| group.contains(&from) && group.contains(&to))
        })
    }

    /// Runs the ready cycle of every node, printing what happens.
    fn process(&mut self, output: &mut String) -> ScriptResult<()> {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            for _ in 0..10 {
                let node = self.node(id)?;
                if !node.has_ready() {
                    break;
                }
                let ready = node.ready()?;
                if let Some(snapshot) = &ready.snapshot {
                    writeln!(
                        output,
                        "n{id} install snapshot {}@{}",
                        snapshot.metadata.index, snapshot.metadata.term
                    )?;
                    node.storage_mut().apply_snapshot(snapshot.clone());
                }
                node.storage_mut().append(&ready.entries);
                if let Some(hard_state) = ready.hard_state {
                    node.storage_mut().set_hard_state(hard_state);
                }
                for entry in &ready.committed_entries {
                    writeln!(output, "n{id} apply {}", display::entry(entry))?;
                }
                for read in &ready.read_states {
                    writeln!(
                        output,
                        "n{id} read ready context={} index={}",
                        read.context, read.index
                    )?;
                }
                for message in &ready.messages {
                    writeln!(output, "{}", display::message(message))?;
                }
                let messages = ready.messages.clone();
                node.advance(ready)?;
                self.queue.extend(messages);
            }
        }
        Ok(())
    }

    /// Delivers queued messages to `targets` once.
    fn deliver(&mut self, targets: &BTreeSet<NodeId>, output: &mut String) -> ScriptResult<bool> {
        let (deliver, keep): (Vec<Message>, Vec<Message>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|message| targets.contains(&message.to));
        self.queue = keep;
        let delivered = !deliver.is_empty();
        for message in deliver {
            if !self.connected(message.from, message.to) {
                writeln!(output, "dropped {}", display::message(&message))?;
                continue;
            }
            match self.nodes.get_mut(&message.to) {
                Some(node) => node.step(message)?,
                None => writeln!(output, "dropped {} (crashed)", display::message(&message))?,
            }
        }
        Ok(delivered)
    }

    /// Delivers and processes until no message is left (at most 100 rounds).
    fn stabilize(&mut self, output: &mut String) -> ScriptResult<()> {
        self.process(output)?;
        let all: BTreeSet<NodeId> = self.nodes.keys().chain(self.crashed.keys()).copied().collect();
        for _ in 0..100 {
            if !self.deliver(&all, output)? {
                break;
            }
            self.process(output)?;
        }
        Ok(())
    }

    fn ids_or_all(&self, command: &goldenscript::Command) -> ScriptResult<BTreeSet<NodeId>> {
        let ids: BTreeSet<NodeId> = command
            .args
            .iter()
            .filter_map(|arg| match arg {
                goldenscript::Argument::Positional(value) => Some(value),
                _ => None,
            })
            .map(|value| Ok(NodeId(value.parse()?)))
            .collect::<ScriptResult<_>>()?;
        Ok(if ids.is_empty() {
            self.nodes.keys().chain(self.crashed.keys()).copied().collect()
        } else {
            ids
        })
    }
}

impl goldenscript::Runner for Runner {
    type Command = goldenscript::Command;

    fn run(
        &mut self,
        command: &goldenscript::Command,
        _: &goldenscript::Context,
    ) -> ScriptResult<String> {
        let mut output = String::new();
        let before: BTreeMap<NodeId, Status> =
            self.nodes.iter().map(|(id, node)| (*id, node.status())).collect();
        let mut args = command.consume_args();
        match command.name.as_str() {
            "cluster" => {
                let nodes: u64 = args.take_key("nodes").unwrap_or("3").parse()?;
                let voters: u64 = args.take_key("voters").map_or(Ok(nodes), str::parse)?;
                let lease_ms: u64 = args.take_key("lease_ms").unwrap_or("0").parse()?;
                let election: u64 = args.take_key("election").unwrap_or("10").parse()?;
                let heartbeat: u64 = args.take_key("heartbeat").unwrap_or("2").parse()?;
                let pre_vote: bool = args.take_key("prevote").unwrap_or("true").parse()?;
                let check_quorum: bool = args.take_key("check_quorum").unwrap_or("true").parse()?;
                let max_append_bytes: usize =
                    args.take_key("max_append_bytes").unwrap_or("1048576").parse()?;
                let initial = Configuration::with_voters((1..=voters).map(NodeId));
                for id in (1..=nodes).map(NodeId) {
                    let mut config = Config::new(id);
                    config.election_timeout_ticks = election;
                    config.heartbeat_interval_ticks = heartbeat;
                    config.pre_vote = pre_vote;
                    config.check_quorum = check_quorum;
                    config.lease_duration_ns = lease_ms * 1_000_000;
                    config.tick_interval_ns = TICK_NS;
                    config.max_clock_offset_ns = EPSILON_NS;
                    config.max_append_bytes = max_append_bytes;
                    let storage = MemStorage::new(if id.0 <= voters {
                        initial.clone()
                    } else {
                        Configuration::default()
                    });
                    self.nodes.insert(id, RawNode::new(config.clone(), storage, self.now())?);
                    self.configs.insert(id, config);
                }
                for node in self.nodes.values() {
                    writeln!(output, "{}", status_line(&node.status()))?;
                }
                args.reject_next()?;
                return Ok(output);
            }
            "campaign" => {
                let id = NodeId(args.next_pos().ok_or("campaign needs a node")?.parse()?);
                self.node(id)?.campaign();
            }
            "tick" => {
                let ids = self.ids_or_all(command)?;
                while args.next_pos().is_some() {}
                self.time_ns += TICK_NS;
                let now = self.now();
                for id in ids {
                    if let Some(node) = self.nodes.get_mut(&id) {
                        node.tick(now);
                    }
                }
            }
            "time" => {
                let ms: u64 = args.next_pos().ok_or("time needs milliseconds")?.parse()?;
                self.time_ns += ms * 1_000_000;
            }
            "deliver" => {
                let ids = self.ids_or_all(command)?;
                while args.next_pos().is_some() {}
                self.deliver(&ids, &mut output)?;
            }
            "stabilize" => self.stabilize(&mut output)?,
            "run" => {
                let ticks: u64 = args.next_pos().ok_or("run needs a tick count")?.parse()?;
                for _ in 0..ticks {
                    self.time_ns += TICK_NS;
                    let now = self.now();
                    for node in self.nodes.values_mut() {
                        node.tick(now);
                    }
                    self.stabilize(&mut output)?;
                }
            }
            "propose" => {
                let id = NodeId(args.next_pos().ok_or("propose needs a node")?.parse()?);
                let data = args.next_pos().ok_or("propose needs data")?;
                let index = self.node(id)?.propose(data.as_bytes().to_vec())?;
                writeln!(output, "n{id} proposed at index {index}")?;
            }
            "read" => {
                let id = NodeId(args.next_pos().ok_or("read needs a node")?.parse()?);
                let context: u64 = args.next_pos().ok_or("read needs a context")?.parse()?;
                self.node(id)?.read_index(context)?;
            }
            "lease" => {
                let id = NodeId(args.next_pos().ok_or("lease needs a node")?.parse()?);
                let now = self.now();
                match self.node(id)?.lease_read(now) {
                    Some(read) => writeln!(
                        output,
                        "n{id} may serve from its lease after applying {}",
                        read.index
                    )?,
                    None => writeln!(output, "n{id} may not serve from a lease")?,
                }
            }
            "transfer" => {
                let id = NodeId(args.next_pos().ok_or("transfer needs a node")?.parse()?);
                let target = NodeId(args.next_pos().ok_or("transfer needs a target")?.parse()?);
                self.node(id)?.transfer_leadership(target)?;
            }
            "config" => {
                let id = NodeId(args.next_pos().ok_or("config needs a node")?.parse()?);
                let voters = parse_ids(args.take_key("voters").ok_or("config needs voters=")?)?;
                let learners = parse_ids(args.take_key("learners").unwrap_or(""))?;
                let index = self.node(id)?.propose_config_change(voters, learners)?;
                writeln!(output, "n{id} proposed configuration change at index {index}")?;
            }
            "compact" => {
                let id = NodeId(args.next_pos().ok_or("compact needs a node")?.parse()?);
                let node = self.node(id)?;
                let metadata = node.applied_snapshot_metadata()?;
                writeln!(output, "n{id} compacted through {}@{}", metadata.index, metadata.term)?;
                node.storage_mut().compact(Snapshot { metadata, data: Vec::new() });
            }
            "quiesce" => {
                let id = NodeId(args.next_pos().ok_or("quiesce needs a node")?.parse()?);
                let done = self.node(id)?.quiesce();
                writeln!(output, "n{id} {}", if done { "quiesced" } else { "did not quiesce" })?;
            }
            "wake" => {
                let id = NodeId(args.next_pos().ok_or("wake needs a node")?.parse()?);
                self.node(id)?.wake();
            }
            "quiet" => {
                let quiet: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|(id, node)| format!("n{id}={}", node.is_quiesced()))
                    .collect();
                writeln!(output, "quiesced: {}", quiet.join(" "))?;
                args.reject_next()?;
                return Ok(output);
            }
            "partition" => {
                let mut groups = Vec::new();
                while let Some(group) = args.next_pos() {
                    groups.push(parse_ids(group)?);
                }
                self.groups = Some(groups);
            }
            "heal" => self.groups = None,
            "crash" => {
                let id = NodeId(args.next_pos().ok_or("crash needs a node")?.parse()?);
                let node = self.nodes.remove(&id).ok_or("node is not running")?;
                self.crashed.insert(id, node.storage().clone());
                writeln!(output, "n{id} crashed")?;
            }
            "restart" => {
                let id = NodeId(args.next_pos().ok_or("restart needs a node")?.parse()?);
                let storage = self.crashed.remove(&id).ok_or("node is not crashed")?;
                let config = self.configs[&id].clone();
                let node = RawNode::new(config, storage, self.now())?;
                writeln!(output, "{}", status_line(&node.status()))?;
                self.nodes.insert(id, node);
                args.reject_next()?;
                return Ok(output);
            }
            "status" => {
                for id in self.ids_or_all(command)? {
                    match self.nodes.get(&id) {
                        Some(node) => writeln!(output, "{}", status_line(&node.status()))?,
                        None => writeln!(output, "n{id} crashed")?,
                    }
                }
                return Ok(output);
            }
            "log" => {
                let id = NodeId(args.next_pos().ok_or("log needs a node")?.parse()?);
                let storage = match self.nodes.get(&id) {
                    Some(node) => node.storage().clone(),
                    None => self.crashed.get(&id).cloned().ok_or("unknown node")?,
                };
                let snapshot = storage.snapshot_metadata();
                writeln!(
                    output,
                    "n{id} snapshot {}@{} {}",
                    snapshot.index, snapshot.term, snapshot.config
                )?;
                for entry in storage.stored_entries() {
                    writeln!(output, "n{id} {}", display::entry(entry))?;
                }
                return Ok(output);
            }
            name => return Err(format!("unknown command {name}").into()),
        }
        args.reject_next()?;
        if command.name != "stabilize" && command.name != "run" {
            self.process(&mut output)?;
        }
        for (id, node) in &self.nodes {
            let status = node.status();
            let changed = before.get(id).is_none_or(|old| {
                (old.role, old.term, old.leader, old.commit, &old.configuration)
                    != (
                        status.role,
                        status.term,
                        status.leader,
                        status.commit,
                        &status.configuration,
                    )
            });
            if changed {
                writeln!(output, "{}", status_line(&status))?;
            }
        }
        Ok(output)
    }
}

test_each_path! { in "crates/raft/testscripts/node" => run_script }

fn run_script(path: &std::path::Path) {
    goldenscript::run(&mut Runner::default(), path).expect("goldenscript failed");
}
