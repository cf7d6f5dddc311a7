//! Snapshot reads at followers, below their ranges' safe time: a follower serves what it
//! applied — even while its leader is dead — waits for a timestamp it has not reached, sends
//! the reader to the leader when it cannot serve, and the client's follower reads see what a
//! leader would.

use meridian_client::{ReadFrom, ReadTimestamp};
use meridian_rpc::kv::{SnapshotReadRequest, SnapshotReadResponse, snapshot_read_request};
use tonic::Status;

use super::*;

/// One snapshot read of `key` at `address`, which may serve it as a follower.
async fn read_at(
    address: &str,
    key: &[u8],
    at: Option<snapshot_read_request::At>,
) -> Result<SnapshotReadResponse, Status> {
    let mut node = KvClient::connect(format!("http://{address}"))
        .await
        .map_err(|error| Status::unavailable(error.to_string()))?;
    let request = SnapshotReadRequest {
        range_id: FIRST_DATA_RANGE.0,
        read: Some(snapshot_read_request::Read::Key(key.to_vec())),
        at,
        follower: true,
    };
    node.snapshot_read(request).await.map(tonic::Response::into_inner)
}

#[tokio::test]
async fn followers_serve_snapshot_reads_below_their_safe_time() {
    let mut cluster = Cluster::start(3);
    init(&cluster).await;
    let client = client(&cluster.addresses);
    let mut txn = client.begin();
    txn.put(b"f", b"one").unwrap();
    let first = txn.commit().await.unwrap().expect("a commit timestamp");
    let leader = leader_of_first_range(&cluster).await;
    let follower = cluster.addresses[leader % 3].clone();

    // A follower serves an applied commit at its timestamp (waiting to apply it if needed).
    let exact = Some(snapshot_read_request::At::Exact(first));
    let read = read_at(&follower, b"f", exact).await.unwrap();
    assert_eq!((read.value.as_deref(), read.timestamp), (Some(&b"one"[..]), first));
    // The client's follower reads, strong and stale, see what the leader's would.
    let mut txn = client.begin();
    txn.put(b"f", b"two").unwrap();
    let second = txn.commit().await.unwrap().expect("a commit timestamp");
    for at in [
        ReadTimestamp::Strong,
        ReadTimestamp::Exact(second),
        ReadTimestamp::MaxStaleness(Duration::from_secs(30)),
    ] {
        let mut read = client.read_only(at).read_from(ReadFrom::Follower);
        assert_eq!(read.get(b"f").await.unwrap().as_deref(), Some(&b"two"[..]), "{at:?}");
        assert!(read.timestamp().unwrap() >= second, "{at:?}");
        let mut old = client.read_only(ReadTimestamp::Exact(first)).read_from(ReadFrom::Follower);
        assert_eq!(old.get(b"f").await.unwrap().as_deref(), Some(&b"one"[..]));
    }

    // With its leader dead, a follower still serves below its safe time...
    let exact = Some(snapshot_read_request::At::Exact(second));
    read_at(&follower, b"f", exact).await.unwrap();
    cluster.kill(leader - 1);
    let read = read_at(&follower, b"f", exact).await.unwrap();
    assert_eq!(read.value.as_deref(), Some(&b"two"[..]));
    // ...and refuses what lies beyond it: nothing closes the range until a leader is elected.
    let ahead = second + Duration::from_millis(900).as_nanos() as u64;
    let ahead = Some(snapshot_read_request::At::Exact(ahead));
    match read_at(&follower, b"f", ahead).await {
        Err(status) => assert!(
            matches!(status.code(), tonic::Code::Unavailable | tonic::Code::FailedPrecondition),
            "{status:?}"
        ),
        // A new leader may have been elected and closed the range meanwhile.
        Ok(read) => assert_eq!(read.value.as_deref(), Some(&b"two"[..])),
    }
    // A malformed read is refused, not sent to the leader.
    let invalid = read_at(&follower, b"f", Some(snapshot_read_request::At::Exact(0))).await;
    assert_eq!(invalid.unwrap_err().code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn a_quiesced_range_sends_strong_follower_reads_to_its_leader() {
    let cluster = Cluster::start(3);
    init(&cluster).await;
    let client = client(&cluster.addresses);
    let written = client.put(b"q", b"v").await.unwrap();
    let leader = leader_of_first_range(&cluster).await;
    let follower = cluster.addresses[leader % 3].clone();
    // The range quiesces after two idle seconds, closed just before: its followers serve what
    // was written, but no strong read (their clocks are past the closed timestamp).
    let redirected = eventually(Duration::from_secs(20), || async {
        match read_at(&follower, b"q", None).await {
            Err(status) if status.code() == tonic::Code::FailedPrecondition => Some(status),
            _ => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                None
            }
        }
    })
    .await
    .expect("a strong read at a quiesced follower goes to the leader");
    let leader_address = &cluster.addresses[leader - 1];
    let hint = redirected.metadata().get(meridian_rpc::metadata::LEADER_ADDRESS);
    assert_eq!(hint.and_then(|v| v.to_str().ok()), Some(leader_address.as_str()));
    let exact = Some(snapshot_read_request::At::Exact(written));
    assert_eq!(read_at(&follower, b"q", exact).await.unwrap().value.as_deref(), Some(&b"v"[..]));
    // The client follows the redirect.
    let mut strong = client.read_only(ReadTimestamp::Strong).read_from(ReadFrom::Follower);
    assert_eq!(strong.get(b"q").await.unwrap().as_deref(), Some(&b"v"[..]));
    // `meridian txn --follower` reads this way; it needs a read-only transaction.
    let host = &cluster.addresses[0];
    let output = meridian(&["txn", "--host", host, "--read-only", "--follower", "get", "q"]);
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("q = v"), "{output:?}");
    let output = meridian(&["txn", "--host", host, "--follower", "get", "q"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--follower needs"), "{output:?}");
}
