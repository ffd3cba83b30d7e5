//! High-watermark checkpoints: each shard of a cluster broker writes its replicas' high
//! watermarks every `HW_CHECKPOINT_INTERVAL` (Kafka's
//! `replica.high.watermark.checkpoint.interval.ms`, 5000) when they changed, so a restarted
//! replica starts from the HW it knew instead of its log start.
//!
//! # File `<data dir>/replication-offset-checkpoint-<shard>`
//!
//! Kafka's text format: a version line `0`, a count line, then `<topic> <partition> <hw>` per
//! partition. Written to a temp file, fsynced, renamed over the old one, directory fsynced. At
//! open a replica takes min(checkpointed HW, its log end): the HW only tells consumers what is
//! committed, and a replica never claims more than it holds.

use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use crate::shard::Shard;
use crate::storage::log::blocking;

pub const HW_CHECKPOINT_PREFIX: &str = "replication-offset-checkpoint";
pub const HW_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
/// Entries read from one file at most (a corrupt count is not an allocation size).
const ENTRIES_MAX: usize = 1 << 20;

pub fn encode(entries: &[(String, i32, i64)]) -> String {
    let mut s = format!("0\n{}\n", entries.len());
    for (t, p, hw) in entries {
        s.push_str(&format!("{t} {p} {hw}\n"));
    }
    s
}

pub fn decode(text: &str) -> Option<Vec<(String, i32, i64)>> {
    let mut lines = text.lines();
    if lines.next()?.trim() != "0" {
        return None;
    }
    let n: usize = lines.next()?.trim().parse().ok()?;
    let mut out = Vec::with_capacity(n.min(ENTRIES_MAX));
    for _ in 0..n.min(ENTRIES_MAX) {
        let mut f = lines.next()?.split_whitespace();
        let t = f.next()?.to_string();
        let p: i32 = f.next()?.parse().ok()?;
        let hw: i64 = f.next()?.parse().ok()?;
        out.push((t, p, hw));
    }
    Some(out)
}

/// Every shard's checkpointed HWs (a partition is found whichever shard wrote it). Blocking.
pub fn load_all(data_dir: &Path) -> HashMap<(String, i32), i64> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir(data_dir) else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with(HW_CHECKPOINT_PREFIX) || name.ends_with(".tmp") {
            continue;
        }
        match std::fs::read_to_string(e.path())
            .ok()
            .as_deref()
            .and_then(decode)
        {
            Some(entries) => {
                for (t, p, hw) in entries {
                    out.insert((t, p), hw);
                }
            }
            None => {
                tracing::warn!(file = %e.path().display(), "ignoring an unreadable HW checkpoint")
            }
        }
    }
    out
}

fn store(data_dir: &Path, shard: usize, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let path = data_dir.join(format!("{HW_CHECKPOINT_PREFIX}-{shard}"));
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// One shard's checkpoint writer; runs until shutdown, then writes a last time.
pub async fn checkpointer(s: Rc<Shard>) {
    let mut last = String::new();
    loop {
        let stopping = s.shutting_down.get();
        if !stopping {
            glommio::timer::sleep(HW_CHECKPOINT_INTERVAL).await;
        }
        let mut entries: Vec<(String, i32, i64)> = s
            .all_partitions()
            .iter()
            .filter(|p| !p.deleted.get())
            .map(|p| (p.topic.clone(), p.index, p.repl.borrow().high_watermark))
            .collect();
        entries.sort();
        let text = encode(&entries);
        if text != last {
            let (dir, shard, t) = (s.config.data_dir.clone(), s.id, text.clone());
            match blocking(move || store(&dir, shard, &t)).await {
                Ok(()) => last = text,
                Err(e) => tracing::warn!("writing the HW checkpoint failed: {e}"),
            }
        }
        if stopping || s.shutting_down.get() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let e = vec![("a".to_string(), 0, 10), ("b.c".to_string(), 3, 0)];
        store(dir.path(), 0, &encode(&e)).unwrap();
        store(dir.path(), 1, &encode(&[("z".to_string(), 1, 7)])).unwrap();
        std::fs::write(
            dir.path().join(format!("{HW_CHECKPOINT_PREFIX}-2")),
            "0\n9\nx 1",
        )
        .unwrap();
        let all = load_all(dir.path());
        assert_eq!(all.len(), 3);
        assert_eq!(all[&("a".to_string(), 0)], 10);
        assert_eq!(all[&("z".to_string(), 1)], 7);
        assert_eq!(decode("1\n0\n"), None);
    }
}
