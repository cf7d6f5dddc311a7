//! Bad input, a clock out of bounds and a full disk: clear errors, no crash, no lost data.

use super::*;

#[tokio::test]
async fn bad_input_gets_clear_errors_and_nodes_keep_running() {
    let cluster = Cluster::start(3);
    // Before init, the key-value API says the node is not initialized.
    let address = cluster.addresses[0].clone();
    let up = eventually(Duration::from_secs(20), || status(&address)).await;
    assert!(up.is_some(), "node did not start\n{}", cluster.logs());
    let output = meridian(&["kv", "--host", &address, "get", "x"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not initialized"), "{output:?}");

    init(&cluster).await;
    // A second init is refused.
    let output = meridian(&["init", "--host", &cluster.addresses[1]]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("already initialized"), "{output:?}");

    // Malformed Raft batches end the stream with an error; the node keeps serving.
    let mut client = NodeClient::connect(format!("http://{address}")).await.unwrap();
    let cluster_id = status(&address).await.unwrap().cluster_id;
    let missing_message = MessageBatch {
        from_node: 9,
        cluster_id: cluster_id.clone(),
        messages: vec![RangeMessage { range_id: 1, message: None }],
    };
    let error = client.raft(tokio_stream::iter(vec![missing_message])).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    let other_cluster =
        MessageBatch { from_node: 9, cluster_id: "another-cluster".into(), messages: vec![] };
    let error = client.raft(tokio_stream::iter(vec![other_cluster])).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::PermissionDenied, "{error:?}");
    assert!(put(&cluster.addresses, "after-bad-input", "ok").await, "{}", cluster.logs());

    // Key-value calls that name no range, an unknown range, or misuse the meta range.
    let mut kv = KvClient::connect(format!("http://{address}")).await.unwrap();
    let get = |range_id| GetRequest { range_id, key: b"k".to_vec() };
    let error = kv.get(get(0)).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    let error = kv.get(get(999)).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::NotFound, "{error:?}");
    let error = kv.get(get(META_RANGE.0)).await.unwrap_err();
    assert!(
        matches!(error.code(), tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition),
        "{error:?}"
    );
    let meta_leader = Client::new(cluster.addresses.clone(), ClientOptions::default()).unwrap();
    let empty_span = RangeDescriptor {
        range_id: 77,
        start: b"b".to_vec(),
        end: b"a".to_vec(),
        ..RangeDescriptor::default()
    };
    let error = meta_leader.update_descriptors(vec![empty_span]).await.unwrap_err();
    assert!(error.to_string().contains("empty span"), "{error}");
    let error = meta_leader.allocate_range_ids(0).await.unwrap_err();
    assert!(error.to_string().contains("between 1 and"), "{error}");
    for address in &cluster.addresses {
        let mut kv = KvClient::connect(format!("http://{address}")).await.unwrap();
        let split = SplitRequest { range_id: META_RANGE.0, keys: vec![b"m".to_vec()] };
        let error = kv.split(split).await.unwrap_err();
        assert!(
            matches!(error.code(), tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition),
            "{error:?}"
        );
    }
    assert!(put(&cluster.addresses, "after-bad-kv-calls", "ok").await, "{}", cluster.logs());

    // Wrong flags and a store that belongs to another node fail with a message and exit code.
    let output =
        meridian(&["start", "--node-id", "0", "--store", "unused", "--rpc-listen", "127.0.0.1:1"]);
    assert!(!output.status.success());
    let store = cluster.store(0);
    let output = meridian(&[
        "start",
        "--node-id",
        "7",
        "--store",
        store.to_str().unwrap(),
        "--rpc-listen",
        "127.0.0.1:1",
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("store"), "{output:?}");
    let output = meridian(&[
        "start",
        "--node-id",
        "1",
        "--store",
        "x",
        "--rpc-listen",
        "127.0.0.1:1",
        "--join",
        "127.0.0.1:26001,no-port",
    ]);
    assert_eq!(output.status.code(), Some(2), "a malformed --join address: {output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("HOST:PORT"), "{output:?}");
    // A --join address nobody answers at: the node runs, says it is not initialized, and
    // joins nothing.
    let lonely_address = format!("127.0.0.1:{}", free_port());
    let mut lonely = Command::new(binary())
        .args(["start", "--node-id", "9", "--rpc-listen", &lonely_address])
        .arg("--store")
        .arg(cluster.directory.path().join("lonely"))
        .args(["--join", &format!("127.0.0.1:{}", free_port())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let view = eventually(Duration::from_secs(20), || status(&lonely_address)).await;
    let _ = lonely.kill();
    let _ = lonely.wait();
    let view = view.expect("the node with an unreachable --join address runs");
    assert!(view.cluster_id.is_empty() && view.peers.len() == 1, "{view:?}");
    let output =
        meridian(&["start", "--node-id", "1", "--store", "x", "--rpc-listen", "not-an-address"]);
    assert_eq!(
        output.status.code(),
        Some(2),
        "clap reports bad flags with exit code 2: {output:?}"
    );
    let output = meridian(&[
        "start",
        "--node-id",
        "1",
        "--store",
        "x",
        "--rpc-listen",
        "127.0.0.1:1",
        "--replica-check-interval-s",
        "0",
    ]);
    assert_eq!(output.status.code(), Some(2), "a zero replica-check interval: {output:?}");
    let store = cluster.directory.path().join("switch");
    let output = meridian(&[
        "start",
        "--node-id",
        "1",
        "--store",
        store.to_str().unwrap(),
        "--rpc-listen",
        "127.0.0.1:1",
        "--unsafe-switch",
        "no_such_rule",
    ]);
    assert!(!output.status.success(), "an unknown switch: {output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("skip_commit_wait"), "{output:?}");
}

#[tokio::test]
async fn a_node_whose_clock_is_off_refuses_to_serve() {
    let mut cluster = Cluster::start(3);
    // Node 3's clock runs 500 ms behind, far beyond the 7 ms bound.
    cluster.kill(2);
    let skewed = cluster.spawn_with(2, &["--inject-clock-skew-ms", "-500"]);
    cluster.processes[2] = Some(skewed);
    init(&cluster).await;
    let skewed_address = cluster.addresses[2].clone();
    let problem = eventually(Duration::from_secs(20), || async {
        status(&skewed_address)
            .await
            .map(|status| status.clock_problem)
            .filter(|problem| !problem.is_empty())
    })
    .await;
    assert!(
        problem.is_some_and(|problem| problem.contains("refuses to serve")),
        "{}",
        cluster.logs()
    );
    // It says why to clients...
    let mut client = KvClient::connect(format!("http://{skewed_address}")).await.unwrap();
    let request =
        PutRequest { range_id: FIRST_DATA_RANGE.0, key: b"k".to_vec(), value: b"v".to_vec() };
    let error = client.put(request).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error:?}");
    assert!(error.message().contains("clock"), "{error:?}");
    // ...while the healthy majority keeps serving, with no problem of its own.
    let healthy = cluster.addresses[..2].to_vec();
    assert!(put(&healthy, "k", "v").await, "{}", cluster.logs());
    assert_eq!(get(&healthy, "k").await.as_deref(), Some(&b"v"[..]));
    for address in &healthy {
        let fine = eventually(Duration::from_secs(10), || async {
            status(address).await.filter(|status| status.clock_problem.is_empty())
        })
        .await;
        assert!(fine.is_some(), "{address} reports a clock problem\n{}", cluster.logs());
    }
}

#[tokio::test]
async fn a_node_whose_disk_fills_stops_and_loses_nothing() {
    let mut cluster = Cluster::start(3);
    // Node 3's writes fail, as on a full disk, after 1 MiB.
    cluster.kill(2);
    let full = cluster.spawn_with(2, &["--inject-disk-full-after-mb", "1"]);
    cluster.processes[2] = Some(full);
    init(&cluster).await;
    let healthy = cluster.addresses[..2].to_vec();
    let value = "x".repeat(20_000);
    let mut written = Vec::new();
    for i in 0..100 {
        let key = format!("big{i:03}");
        assert!(put(&healthy, &key, &value).await, "write {i} failed\n{}", cluster.logs());
        written.push(key);
    }
    // The node stopped with an error that names the cause; the others carried on.
    let mut child = cluster.processes[2].take().unwrap();
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break Some(exit);
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exit.is_some_and(|exit| !exit.success()), "node 3 did not stop\n{}", cluster.logs());
    assert!(cluster.logs().contains("No space left on device"), "{}", cluster.logs());
    // Restarted with room again, it catches up from its intact store.
    cluster.restart(2);
    let caught_up = eventually(Duration::from_secs(30), || async {
        let mine = first_data_range(&status(&cluster.addresses[2]).await?)?.applied;
        let theirs = first_data_range(&status(&healthy[0]).await?)?.commit;
        (mine >= theirs && theirs > 0).then_some(())
    })
    .await;
    assert!(caught_up.is_some(), "node 3 did not catch up\n{}", cluster.logs());
    for key in &written {
        assert_eq!(
            get(&cluster.addresses, key).await.as_deref(),
            Some(value.as_bytes()),
            "lost {key}"
        );
    }
}
