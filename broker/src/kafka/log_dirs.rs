//! DescribeLogDirs v1-4 (what kafka-log-dirs.sh shows): this broker's one log directory (the
//! data dir), each replica it holds with its size on disk and offset lag (HW - LEO, floored
//! at 0, as Kafka computes it), and the directory's total and usable bytes (v4). Each shard
//! reports its own replicas.

use std::collections::BTreeMap;

use kafka_protocol::messages::describe_log_dirs_response::{
    DescribeLogDirsPartition, DescribeLogDirsResult, DescribeLogDirsTopic,
};
use kafka_protocol::messages::{DescribeLogDirsRequest, DescribeLogDirsResponse, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::errors::*;
use super::{decode, respond, Response};
use crate::protocol::{OutBuf, RequestFrame};
use crate::shard::shard;

/// (topic, partition) -> (size bytes, offset lag).
type Replicas = BTreeMap<(String, i32), (i64, i64)>;

pub async fn handle(frame: RequestFrame) -> Result<Response, String> {
    let req: DescribeLogDirsRequest = decode(&frame)?;
    let s = shard();
    let mut replicas: Replicas = BTreeMap::new();
    for target in 0..s.count {
        let got = s
            .run_on(target, |sh| {
                Box::pin(async move {
                    sh.all_partitions()
                        .iter()
                        .filter(|p| !p.deleted.get())
                        .map(|p| {
                            let l = p.log.borrow();
                            let hw = p.repl.borrow().high_watermark;
                            (
                                (p.topic.clone(), p.index),
                                (l.size_bytes() as i64, (hw - l.log_end_offset).max(0)),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .await
            .unwrap_or_default();
        replicas.extend(got);
    }
    let wanted: Option<BTreeMap<&str, &Vec<i32>>> = req.topics.as_ref().map(|ts| {
        ts.iter()
            .map(|t| (t.topic.0.as_str(), &t.partitions))
            .collect()
    });
    let mut topics: BTreeMap<String, Vec<DescribeLogDirsPartition>> = BTreeMap::new();
    for ((t, p), (size, lag)) in replicas {
        if let Some(w) = &wanted {
            if !w.get(t.as_str()).is_some_and(|ps| ps.contains(&p)) {
                continue;
            }
        }
        topics.entry(t).or_default().push(
            DescribeLogDirsPartition::default()
                .with_partition_index(p)
                .with_partition_size(size)
                .with_offset_lag(lag)
                .with_is_future_key(false),
        );
    }
    let dir = s.config.data_dir.clone();
    let (dir, total, usable) = crate::storage::log::blocking(move || {
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        let (total, usable) = space(&dir);
        (dir, total, usable)
    })
    .await;
    let result = DescribeLogDirsResult::default()
        .with_error_code(NONE)
        .with_log_dir(StrBytes::from_string(dir.display().to_string()))
        .with_topics(
            topics
                .into_iter()
                .map(|(t, ps)| {
                    DescribeLogDirsTopic::default()
                        .with_name(TopicName(StrBytes::from_string(t)))
                        .with_partitions(ps)
                })
                .collect(),
        )
        .with_total_bytes(total)
        .with_usable_bytes(usable);
    let resp = DescribeLogDirsResponse::default()
        .with_error_code(NONE)
        .with_results(vec![result]);
    respond(&frame, OutBuf::new(), &resp)
}

/// Total and available bytes of the filesystem holding `dir` (-1, -1 when unknown).
fn space(dir: &std::path::Path) -> (i64, i64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return (-1, -1);
    };
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a zeroed statvfs the call fills in.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return (-1, -1);
    }
    let block = st.f_frsize as i64;
    (st.f_blocks as i64 * block, st.f_bavail as i64 * block)
}
