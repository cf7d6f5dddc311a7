//! The `Kv` gRPC service: clients' reads and writes, scans, range lookups, splits and the meta
//! range's calls.

use super::*;

/// The `Kv` gRPC service.
pub(super) struct KvApi(pub(super) Arc<Shared>);

/// Returns the range a request names, refusing none.
pub(super) fn range_of(range_id: u64) -> Result<RangeId, Status> {
    if range_id == 0 {
        return Err(metadata::not_applied(Status::invalid_argument(
            "the request names no range (range_id 0)",
        )));
    }
    Ok(RangeId(range_id))
}

/// Whether a meta request failed because this node holds no replica of the meta range (it
/// then asks the meta range itself, so that any node can answer route lookups).
fn holds_no_meta_replica(status: &Status) -> bool {
    status
        .metadata()
        .get(metadata::ERROR_KIND)
        .is_some_and(|kind| kind == metadata::RANGE_NOT_FOUND)
}

/// Returns until when the caller of `request` waits for its answer: its `grpc-timeout`, at
/// most [`MAX_REQUEST_WAIT`] (which also applies to callers that send none). Nothing the
/// request asks for is started after that: a write is never proposed once its caller gave up.
pub(super) fn deadline_of<T>(request: &Request<T>) -> Instant {
    let wait = metadata::grpc_timeout(request.metadata())
        .map_or(MAX_REQUEST_WAIT, |timeout| timeout.min(MAX_REQUEST_WAIT));
    Instant::now() + wait
}

#[tonic::async_trait]
impl Kv for KvApi {
    async fn txn_read(
        &self,
        request: Request<meridian_rpc::kv::TxnReadRequest>,
    ) -> Result<Response<meridian_rpc::kv::TxnReadResponse>, Status> {
        self.txn_read_call(request).await
    }

    async fn txn_commit(
        &self,
        request: Request<meridian_rpc::kv::TxnCommitRequest>,
    ) -> Result<Response<meridian_rpc::kv::TxnCommitResponse>, Status> {
        self.txn_commit_call(request).await
    }

    async fn txn_rollback(
        &self,
        request: Request<meridian_rpc::kv::TxnRollbackRequest>,
    ) -> Result<Response<meridian_rpc::kv::TxnRollbackResponse>, Status> {
        self.txn_rollback_call(request).await
    }

    async fn txn_heartbeat(
        &self,
        request: Request<meridian_rpc::kv::TxnHeartbeatRequest>,
    ) -> Result<Response<meridian_rpc::kv::TxnHeartbeatResponse>, Status> {
        self.txn_heartbeat_call(request).await
    }

    async fn snapshot_read(
        &self,
        request: Request<meridian_rpc::kv::SnapshotReadRequest>,
    ) -> Result<Response<meridian_rpc::kv::SnapshotReadResponse>, Status> {
        self.snapshot_read_call(request).await
    }

    async fn txn_lock_writes(
        &self,
        request: Request<meridian_rpc::kv::TxnLockWritesRequest>,
    ) -> Result<Response<meridian_rpc::kv::TxnLockWritesResponse>, Status> {
        self.txn_lock_writes_call(request).await
    }

    async fn txn_prepare(
        &self,
        request: Request<meridian_rpc::kv::TxnPrepareRequest>,
    ) -> Result<Response<meridian_rpc::kv::TxnPrepareResponse>, Status> {
        self.txn_prepare_call(request).await
    }

    async fn txn_abort(
        &self,
        request: Request<meridian_rpc::kv::TxnAbortRequest>,
    ) -> Result<Response<meridian_rpc::kv::TxnAbortResponse>, Status> {
        self.txn_abort_call(request).await
    }

    async fn txn_vote(
        &self,
        request: Request<meridian_rpc::kv::TxnVoteRequest>,
    ) -> Result<Response<meridian_rpc::kv::TxnVoteResponse>, Status> {
        self.txn_vote_call(request).await
    }

    async fn txn_outcome(
        &self,
        request: Request<meridian_rpc::kv::TxnOutcomeRequest>,
    ) -> Result<Response<meridian_rpc::kv::TxnOutcomeResponse>, Status> {
        self.txn_outcome_call(request).await
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let (range, key) = (range_of(request.range_id)?, request.key);
        let (value, timestamp) = self
            .0
            .request("get", deadline, |reply| {
                let request = ReadRequest::Get { range, key, reply };
                Event::Read { request, deadline }
            })
            .await?;
        Ok(Response::new(GetResponse { value, timestamp }))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<WriteResponse>, Status> {
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let (range, key, value) = (range_of(request.range_id)?, request.key, request.value);
        let committed = self
            .0
            .request("put", deadline, |reply| Event::Write {
                range,
                key,
                value: Some(value),
                deadline,
                reply,
            })
            .await?;
        Ok(Response::new(WriteResponse { timestamp: committed.timestamp }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let (range, key) = (range_of(request.range_id)?, request.key);
        let committed = self
            .0
            .request("delete", deadline, |reply| Event::Write {
                range,
                key,
                value: None,
                deadline,
                reply,
            })
            .await?;
        Ok(Response::new(WriteResponse { timestamp: committed.timestamp }))
    }

    async fn scan(&self, request: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let range = range_of(request.range_id)?;
        let end = (!request.end.is_empty()).then_some(request.end);
        let limit = if request.limit == 0 { 1_000 } else { request.limit.min(100_000) as usize };
        let start = request.start;
        let result = self
            .0
            .request("scan", deadline, |reply| {
                let request = ReadRequest::Scan { range, start, end, limit, reply };
                Event::Read { request, deadline }
            })
            .await?;
        Ok(Response::new(ScanResponse {
            rows: result
                .rows
                .into_iter()
                .map(|(key, value, timestamp)| KeyValue { key, value, timestamp })
                .collect(),
            resume_key: result.resume_key,
        }))
    }

    async fn range_lookup(
        &self,
        request: Request<RangeLookupRequest>,
    ) -> Result<Response<RangeLookupResponse>, Status> {
        let deadline = deadline_of(&request);
        let forwarded = request.metadata().contains_key(metadata::FORWARDED);
        let key = request.into_inner().key;
        let local = self
            .0
            .request("range_lookup", deadline, |reply| Event::Read {
                request: ReadRequest::Lookup { key: key.clone(), reply },
                deadline,
            })
            .await;
        let descriptor = match local {
            Err(status) if !forwarded && holds_no_meta_replica(&status) => {
                self.0.on_meta_elsewhere(deadline, self.0.client.lookup_fresh(&key)).await?
            }
            result => result?,
        };
        let nodes = descriptor.voters.iter().chain(&descriptor.learners).copied();
        let addresses = self.0.addresses(nodes.collect::<Vec<_>>());
        Ok(Response::new(RangeLookupResponse { descriptor: Some(descriptor), addresses }))
    }

    async fn list_ranges(
        &self,
        request: Request<ListRangesRequest>,
    ) -> Result<Response<ListRangesResponse>, Status> {
        let deadline = deadline_of(&request);
        let forwarded = request.metadata().contains_key(metadata::FORWARDED);
        let local = self
            .0
            .request("list_ranges", deadline, |reply| Event::Read {
                request: ReadRequest::List { reply },
                deadline,
            })
            .await;
        let descriptors = match local {
            Err(status) if !forwarded && holds_no_meta_replica(&status) => {
                let listing = self.0.client.ranges();
                let (descriptors, _) = self.0.on_meta_elsewhere(deadline, listing).await?;
                descriptors
            }
            result => result?,
        };
        let mut nodes: Vec<u64> =
            descriptors.iter().flat_map(|d| d.voters.iter().chain(&d.learners)).copied().collect();
        nodes.sort_unstable();
        nodes.dedup();
        let addresses = self.0.addresses(nodes);
        Ok(Response::new(ListRangesResponse { descriptors, addresses }))
    }

    async fn split(
        &self,
        request: Request<SplitRequest>,
    ) -> Result<Response<SplitResponse>, Status> {
        let request = request.into_inner();
        let range = range_of(request.range_id)?;
        let descriptors = self.0.split(range, request.keys).await?;
        Ok(Response::new(SplitResponse { descriptors }))
    }

    async fn update_descriptors(
        &self,
        request: Request<UpdateDescriptorsRequest>,
    ) -> Result<Response<UpdateDescriptorsResponse>, Status> {
        let deadline = deadline_of(&request);
        let descriptors = request.into_inner().descriptors;
        if let Some(bad) = descriptors.iter().find(|d| d.range_id <= META_RANGE.0) {
            return Err(Status::invalid_argument(format!(
                "range {} cannot be recorded in the meta range",
                bad.range_id
            )));
        }
        if let Some(bad) = descriptors.iter().find(|d| !d.end.is_empty() && d.start >= d.end) {
            return Err(Status::invalid_argument(format!(
                "range {} has an empty span",
                bad.range_id
            )));
        }
        self.0
            .request("update_descriptors", deadline, |reply| {
                Event::Meta(MetaWrite::UpdateDescriptors { descriptors, reply })
            })
            .await?;
        Ok(Response::new(UpdateDescriptorsResponse {}))
    }

    async fn allocate_range_ids(
        &self,
        request: Request<AllocateRangeIdsRequest>,
    ) -> Result<Response<AllocateRangeIdsResponse>, Status> {
        let deadline = deadline_of(&request);
        let count = request.into_inner().count;
        if count == 0 || count > MAX_SPLIT_KEYS as u64 {
            return Err(Status::invalid_argument(format!(
                "can reserve between 1 and {MAX_SPLIT_KEYS} range ids at once"
            )));
        }
        let first = self
            .0
            .request("allocate_range_ids", deadline, |reply| {
                Event::Meta(MetaWrite::AllocateRangeIds { count, reply })
            })
            .await?;
        Ok(Response::new(AllocateRangeIdsResponse { first }))
    }
}
