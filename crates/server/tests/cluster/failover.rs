//! Leader failure and start-up: killing or pausing a leader while writing, and `init`.

use super::*;

#[tokio::test]
async fn writes_survive_killing_the_leader_and_the_node_catches_up() {
    let mut cluster = Cluster::start(3);
    init(&cluster).await;
    let addresses = cluster.addresses.clone();
    let mut acknowledged = Vec::new();
    for i in 0..100 {
        let (key, value) = (format!("key{i:04}"), format!("value{i}"));
        if put(&addresses, &key, &value).await {
            acknowledged.push((key, value));
        }
    }
    assert_eq!(acknowledged.len(), 100, "writes failed on a healthy cluster\n{}", cluster.logs());

    // The leader reports every replica's progress.
    let replicas = eventually(Duration::from_secs(10), || async {
        for address in &addresses {
            let Some(view) = status(address).await else { continue };
            if let Some(range) = first_data_range(&view).filter(|range| range.role == "leader") {
                return Some(
                    range.replicas.iter().map(|replica| replica.node_id).collect::<Vec<_>>(),
                );
            }
        }
        None
    })
    .await;
    assert_eq!(replicas, Some(vec![1, 2, 3]), "{}", cluster.logs());

    // Kill the leader with SIGKILL and keep writing through the others.
    let leader = eventually(Duration::from_secs(10), || async {
        let view = status(&addresses[0]).await?;
        first_data_range(&view).map(|range| range.leader).filter(|leader| *leader != 0)
    })
    .await
    .expect("node 1 knows a leader") as usize;
    cluster.kill(leader - 1);
    let survivors: Vec<String> = addresses
        .iter()
        .enumerate()
        .filter(|(index, _)| *index != leader - 1)
        .map(|(_, address)| address.clone())
        .collect();
    let failover = Instant::now();
    for i in 100..200 {
        let (key, value) = (format!("key{i:04}"), format!("value{i}"));
        if put(&survivors, &key, &value).await {
            if i == 100 {
                println!(
                    "first write after killing the leader acknowledged after {:?}",
                    failover.elapsed()
                );
            }
            acknowledged.push((key, value));
        }
    }
    assert_eq!(
        acknowledged.len(),
        200,
        "service did not resume after the leader died\n{}",
        cluster.logs()
    );
    println!("200 writes acknowledged {:?} after the kill", failover.elapsed());

    // No acknowledged write is lost.
    let reads = Instant::now();
    for (key, value) in &acknowledged {
        assert_eq!(
            get(&survivors, key).await.as_deref(),
            Some(value.as_bytes()),
            "lost {key}\n{}",
            cluster.logs()
        );
    }

    println!("200 reads took {:?}", reads.elapsed());

    // The killed node restarts with its store and catches up.
    cluster.restart(leader - 1);
    let restarted = addresses[leader - 1].clone();
    let caught_up = eventually(Duration::from_secs(30), || async {
        let mine = first_data_range(&status(&restarted).await?)?.applied;
        let theirs = first_data_range(&status(&survivors[0]).await?)?.commit;
        (mine >= theirs && theirs > 0).then_some(())
    })
    .await;
    assert!(caught_up.is_some(), "the restarted node did not catch up\n{}", cluster.logs());

    // SIGTERM stops a node cleanly (exit status 0) and promptly.
    let mut child = cluster.processes[0].take().unwrap();
    let signalled = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(signalled.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "node did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "node exited with {exit:?}\n{}", cluster.logs());
}

/// Sends `signal` (`STOP`, `CONT`) to node `index`'s process.
fn signal(cluster: &Cluster, index: usize, signal: &str) {
    let pid = cluster.processes[index].as_ref().expect("running").id();
    let status = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status();
    assert!(status.is_ok_and(|status| status.success()), "kill -{signal} {pid} failed");
}

/// `meridian init` returns once the cluster serves; a node that learns of the cluster only
/// afterwards (through a hello) makes requests wait for that news instead of failing them, and
/// answers route lookups although it holds no replica of the meta range.
#[tokio::test]
async fn init_returns_serving_and_late_nodes_wait_to_learn_of_it() {
    let mut cluster = Cluster::start_some(3, 2, &[]);
    for address in &cluster.addresses[..2] {
        let ready = eventually(Duration::from_secs(20), || async {
            status(address).await.filter(|status| !status.peers.is_empty())
        })
        .await;
        assert!(ready.is_some(), "node {address} did not come up\n{}", cluster.logs());
    }
    let output = meridian(&["init", "--host", &cluster.addresses[0]]);
    assert!(output.status.success(), "init failed: {}", String::from_utf8_lossy(&output.stderr));
    // At once, not eventually: both ranges have a leader when init returns.
    let after_init = status(&cluster.addresses[0]).await.expect("node 1 answers");
    let leaderless: Vec<u64> = after_init
        .ranges
        .iter()
        .filter(|range| range.leader == 0)
        .map(|range| range.range_id)
        .collect();
    assert!(after_init.ranges.len() >= 2 && leaderless.is_empty(), "{after_init:?}");
    // Node 3 starts while nodes 1 and 2 cannot answer its hellos; a write through it waits
    // for its first answered hello rather than failing with "not initialized".
    signal(&cluster, 0, "STOP");
    signal(&cluster, 1, "STOP");
    cluster.start_node(2);
    let node3 = cluster.addresses[2].clone();
    let up = eventually(Duration::from_secs(20), || async { status(&node3).await }).await;
    let up = up.expect("node 3 comes up");
    assert!(up.cluster_id.is_empty(), "node 3 already knows the cluster: {up:?}");
    let writer = tokio::task::spawn_blocking(move || {
        meridian(&["kv", "--host", &node3, "put", "late", "yes"])
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&cluster, 0, "CONT");
    signal(&cluster, 1, "CONT");
    let output = writer.await.unwrap();
    assert!(
        output.status.success(),
        "a write through the late node failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        cluster.logs()
    );
    let read = meridian(&["kv", "--host", &cluster.addresses[2], "get", "late"]);
    assert!(String::from_utf8_lossy(&read.stdout).starts_with("yes"), "{read:?}");
}
