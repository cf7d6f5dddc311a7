//! Splits under load and leaders killed mid-split: no lost keys, ranges that tile the key space.

use super::*;

#[tokio::test]
async fn ranges_split_and_survive_killing_a_leader_mid_split() {
    let mut cluster = Cluster::start_with(3, &["--range-max-kib", "16"]);
    init(&cluster).await;
    let client = Arc::new(client(&cluster.addresses));

    // 20,000 keys; ranges split by size as they grow.
    let started = Instant::now();
    let healthy = write_keys(&client, "k", 20_000, 64).await;
    assert!(
        healthy.ambiguous.is_empty(),
        "ambiguous on a healthy cluster: {:?}",
        healthy.ambiguous
    );
    let mut written = healthy.acknowledged;
    assert_eq!(written.len(), 20_000, "writes failed on a healthy cluster\n{}", cluster.logs());
    println!("20,000 keys written in {:?}", started.elapsed());

    // Manual splits through the command line, at keys inside ranges and at a range start.
    let output = meridian(&["split", "--host", &cluster.addresses[1], "k12345", "k17777"]);
    assert!(output.status.success(), "{output:?}\n{}", cluster.logs());
    let output = meridian(&["split", "--host", &cluster.addresses[1], "k12345"]);
    assert!(output.status.success(), "splitting at a range start again is a no-op: {output:?}");
    let output = meridian(&["split", "--host", &cluster.addresses[1], ""]);
    assert!(!output.status.success(), "the empty key cannot split: {output:?}");

    let descriptors = tiled_ranges(&client, 50, Duration::from_secs(120)).await;
    let Some(descriptors) = descriptors else {
        let (now, _) = client.ranges().await.unwrap();
        panic!("fewer than 50 tiled ranges: {}\n{}", now.len(), cluster.logs());
    };
    let boundaries: Vec<&[u8]> = descriptors.iter().map(|d| d.start.as_slice()).collect();
    assert!(boundaries.contains(&&b"k12345"[..]) && boundaries.contains(&&b"k17777"[..]));
    println!("{} ranges after {:?}", descriptors.len(), started.elapsed());
    assert_all_present(&client, &written, || cluster.logs()).await;

    // Kill -9 the node leading the most ranges while writers keep writing (and ranges keep
    // splitting).
    let view = status(&cluster.addresses[0]).await.unwrap();
    let mut leaders = std::collections::BTreeMap::new();
    for range in &view.ranges {
        *leaders.entry(range.leader).or_insert(0) += 1;
    }
    let victim = *leaders.iter().max_by_key(|(_, count)| **count).unwrap().0 as usize;
    let writers = {
        let client = client.clone();
        tokio::spawn(async move { write_keys(&client, "w", 3_000, 32).await })
    };
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    cluster.kill(victim - 1);
    let killed_at = Instant::now();
    let more = writers.await.unwrap();
    // Writes in flight at the killed leader may be reported ambiguous (never retried); every
    // other write is acknowledged: writes resume.
    assert!(more.ambiguous.len() <= 32, "more ambiguous writes than writers: {:?}", more.ambiguous);
    assert_eq!(
        more.acknowledged.len() + more.ambiguous.len(),
        3_000,
        "writes did not resume after the kill\n{}",
        cluster.logs()
    );
    println!(
        "3,000 more writes done {:?} after killing node {victim} ({} ambiguous)",
        killed_at.elapsed(),
        more.ambiguous.len()
    );
    written.extend(more.acknowledged);
    let survivors: Vec<String> = (0..3)
        .filter(|index| *index != victim - 1)
        .map(|index| cluster.addresses[index].clone())
        .collect();
    let survivor_client = Client::new(survivors.clone(), ClientOptions::default()).unwrap();
    assert!(
        tiled_ranges(&survivor_client, 50, Duration::from_secs(60)).await.is_some(),
        "{}",
        cluster.logs()
    );
    assert_all_present(&survivor_client, &written, || cluster.logs()).await;

    // The killed node restarts and catches up on every range.
    cluster.restart(victim - 1);
    let restarted = cluster.addresses[victim - 1].clone();
    let caught_up = eventually(Duration::from_secs(60), || async {
        let mine = status(&restarted).await?;
        let mut commits = std::collections::BTreeMap::new();
        for survivor in &survivors {
            for range in status(survivor).await?.ranges {
                if range.role == "leader" {
                    commits.insert(range.range_id, range.commit);
                }
            }
        }
        let applied: std::collections::BTreeMap<u64, u64> =
            mine.ranges.iter().map(|range| (range.range_id, range.applied)).collect();
        commits
            .iter()
            .all(|(range, commit)| applied.get(range).is_some_and(|applied| applied >= commit))
            .then_some(())
    })
    .await;
    assert!(caught_up.is_some(), "node {victim} did not catch up\n{}", cluster.logs());
    let descriptors = tiled_ranges(&client, 50, Duration::from_secs(30)).await.unwrap();
    assert_tiled(&descriptors);
    assert_all_present(&client, &written, || cluster.logs()).await;
}

#[tokio::test]
async fn a_leader_crashing_mid_split_leaves_routing_consistent() {
    let mut cluster = Cluster::start(3);
    // Every node aborts right after a split it proposed applies, before the meta range
    // records it; the node that takes over applies the split without aborting.
    for index in 0..3 {
        cluster.kill(index);
        let child = cluster.spawn_with(index, &["--inject-crash-after-split"]);
        cluster.processes[index] = Some(child);
    }
    init(&cluster).await;
    let keys: Vec<String> = (0..100).map(|i| format!("k{i:05}")).collect();
    for key in &keys {
        assert!(put(&cluster.addresses, key, &value_of(key)).await, "{}", cluster.logs());
    }
    // The split applies everywhere; its leader dies before recording it (the command may or
    // may not report success).
    let _ = meridian(&["split", "--host", &cluster.addresses[0], "k00050"]);
    let crashed = eventually(Duration::from_secs(20), || {
        let exited = cluster.processes.iter_mut().enumerate().find_map(|(index, child)| {
            child.as_mut()?.try_wait().ok().flatten().map(|status| (index, status))
        });
        async move { exited }
    })
    .await;
    let Some((crashed, exit)) = crashed else {
        panic!("no leader crashed after the split\n{}", cluster.logs());
    };
    assert!(!exit.success());
    cluster.processes[crashed] = None;
    // The survivors elect new leaders, which record the new descriptors; the crashed node
    // restarts (without the fault) and catches up.
    let client = client(&cluster.addresses);
    let tiled = eventually(Duration::from_secs(60), || async {
        let (descriptors, _) = client.ranges().await.ok()?;
        let starts: Vec<&[u8]> = descriptors.iter().map(|d| d.start.as_slice()).collect();
        (starts == [&b""[..], b"k00050"]).then_some(())
    })
    .await;
    assert!(tiled.is_some(), "the meta range did not record the split\n{}", cluster.logs());
    cluster.start_node(crashed);
    assert_all_present(&client, &keys, || cluster.logs()).await;
    assert!(put(&cluster.addresses, "k00075", "after the crash").await, "{}", cluster.logs());
    assert!(put(&cluster.addresses, "k00025", "after the crash").await, "{}", cluster.logs());
    let descriptors = tiled_ranges(&client, 2, Duration::from_secs(30)).await.unwrap();
    assert_eq!(assert_tiled(&descriptors), 2);
}
