//! Replica placement: a dead voter replaced, nodes joining and a node decommissioned.

use super::*;

#[tokio::test]
async fn a_dead_voter_is_replaced_by_a_spare_node() {
    let mut cluster = Cluster::start_with(4, &["--dead-node-timeout-s", "3"]);
    let initialized = init(&cluster).await;
    assert!(
        ["node 1", "node 2", "node 3"].iter().all(|node| initialized.contains(node))
            && !initialized.contains("node 4"),
        "init picks the initializing node and the two lowest peers: {initialized}"
    );
    let mut written = Vec::new();
    for i in 0..30 {
        let (key, value) = (format!("a{i:02}"), format!("{i}"));
        assert!(put(&cluster.addresses, &key, &value).await, "{}", cluster.logs());
        written.push((key, value));
    }

    // Node 3 dies; after the dead-node timeout the leader adds node 4 as a learner (if
    // rebalancing has not already), lets it catch up and swaps it in.
    cluster.kill(2);
    let survivors = vec![
        cluster.addresses[0].clone(),
        cluster.addresses[1].clone(),
        cluster.addresses[3].clone(),
    ];
    // Both the meta range and the data range; node 3 counts as dead after the timeout.
    let replaced = eventually(Duration::from_secs(60), || async {
        let view = status(&survivors[0]).await?;
        let dead = view.liveness.iter().any(|peer| peer.node_id == 3 && peer.dead);
        let moved =
            view.ranges.iter().all(|range| range.voters == [1, 2, 4] && range.learners.is_empty());
        (dead && moved).then_some(())
    })
    .await;
    assert!(replaced.is_some(), "node 3 was not replaced\n{}", cluster.logs());
    let view = status(&survivors[0]).await.unwrap();
    assert!(
        view.liveness.iter().any(|peer| peer.node_id == 4 && !peer.dead),
        "{:?}",
        view.liveness
    );
    for i in 30..60 {
        let (key, value) = (format!("a{i:02}"), format!("{i}"));
        assert!(put(&survivors, &key, &value).await, "{}", cluster.logs());
        written.push((key, value));
    }

    // Node 4 is a full voter: with node 2 gone too, nodes 1 and 4 still form a quorum.
    cluster.kill(1);
    let quorum = vec![cluster.addresses[0].clone(), cluster.addresses[3].clone()];
    assert!(put(&quorum, "after", "both-died").await, "{}", cluster.logs());
    for (key, value) in &written {
        assert_eq!(
            get(&quorum, key).await.as_deref(),
            Some(value.as_bytes()),
            "lost {key}\n{}",
            cluster.logs()
        );
    }
}

/// Returns how many descriptors name each node as a voter, and whether any has learners.
fn voter_counts(
    descriptors: &[meridian_rpc::kv::RangeDescriptor],
) -> (std::collections::BTreeMap<u64, usize>, bool) {
    let mut counts = std::collections::BTreeMap::new();
    for descriptor in descriptors {
        for voter in &descriptor.voters {
            *counts.entry(*voter).or_insert(0) += 1;
        }
    }
    (counts, descriptors.iter().any(|descriptor| !descriptor.learners.is_empty()))
}

#[tokio::test]
async fn joining_nodes_receive_replicas_and_a_decommissioned_node_is_emptied() {
    let mut cluster = Cluster::start_some(5, 3, &[]);
    init(&cluster).await;
    let client = client(&cluster.addresses[..3]);
    let keys: Vec<String> = (0..200).map(|i| format!("k{i:05}")).collect();
    for key in &keys {
        assert!(put(&cluster.addresses[..3], key, &value_of(key)).await, "{}", cluster.logs());
    }
    let splits: Vec<Vec<u8>> = (1..16).map(|i| format!("k{:05}", i * 12).into_bytes()).collect();
    client.split(&splits).await.unwrap();

    // Nodes 4 and 5 join and receive replicas until the counts are about even.
    cluster.start_node(3);
    cluster.start_node(4);
    let balanced = eventually(Duration::from_secs(120), || async {
        let (descriptors, _) = client.ranges().await.ok()?;
        let (counts, learners) = voter_counts(&descriptors);
        let even = (1..=5).all(|node| counts.get(&node).is_some_and(|count| *count >= 6));
        (descriptors.iter().all(|d| d.voters.len() == 3) && !learners && even).then_some(counts)
    })
    .await;
    let (descriptors, _) = client.ranges().await.unwrap();
    assert!(
        balanced.is_some(),
        "replicas did not spread: {:?}\n{}",
        voter_counts(&descriptors),
        cluster.logs()
    );
    println!("replicas per node after nodes 4 and 5 joined: {:?}", balanced.unwrap());
    assert_all_present(&client, &keys, || cluster.logs()).await;

    // Node 2 is decommissioned: its replicas, the meta range's included, move away.
    let output = meridian(&["decommission", "--host", &cluster.addresses[0], "--node-id", "2"]);
    assert!(output.status.success(), "{output:?}");
    let others: Vec<String> =
        [0, 2, 3, 4].iter().map(|index| cluster.addresses[*index].clone()).collect();
    let emptied = eventually(Duration::from_secs(120), || async {
        let (descriptors, _) = client.ranges().await.ok()?;
        let (counts, learners) = voter_counts(&descriptors);
        // The meta range as its leader sees it (not every node holds a replica of it).
        let mut meta = None;
        for address in &others {
            let view = status(address).await?;
            meta = meta.or(view
                .ranges
                .into_iter()
                .find(|range| range.range_id == META_RANGE.0 && range.role == "leader"));
        }
        let meta = meta?;
        (!counts.contains_key(&2) && !learners && !meta.voters.contains(&2)).then_some(())
    })
    .await;
    let (descriptors, _) = client.ranges().await.unwrap();
    assert!(
        emptied.is_some(),
        "node 2 still holds replicas: {:?}\n{}",
        voter_counts(&descriptors),
        cluster.logs()
    );
    let view = status(&cluster.addresses[1]).await.unwrap();
    assert!(view.draining, "node 2 reports that it is decommissioning");
    // Node 2 learns from the meta range that it no longer belongs to its ranges and destroys
    // its replicas of them (the meta range's replica is left to a later replica GC).
    let collected = eventually(Duration::from_secs(60), || async {
        let view = status(&cluster.addresses[1]).await?;
        view.ranges.iter().all(|range| range.range_id == META_RANGE.0).then_some(())
    })
    .await;
    let left: Vec<u64> = status(&cluster.addresses[1])
        .await
        .map(|view| view.ranges.iter().map(|range| range.range_id).collect())
        .unwrap_or_default();
    assert!(collected.is_some(), "node 2 kept replicas {left:?}\n{}", cluster.logs());
    // With node 2 stopped, the rest serve everything.
    cluster.kill(1);
    let rest = Client::new(others.clone(), ClientOptions::default()).unwrap();
    assert_all_present(&rest, &keys, || cluster.logs()).await;
    assert!(put(&others, "after-decommission", "ok").await, "{}", cluster.logs());

    // Leaders spread over the remaining nodes.
    let spread = eventually(Duration::from_secs(60), || async {
        let mut leading = Vec::new();
        for address in &others {
            let view = status(address).await?;
            leading.push(view.ranges.iter().filter(|range| range.role == "leader").count());
        }
        leading.iter().all(|count| *count > 0).then_some(leading)
    })
    .await;
    assert!(spread.is_some(), "some node leads nothing\n{}", cluster.logs());
    println!("ranges led per remaining node: {:?}", spread.unwrap());
}
