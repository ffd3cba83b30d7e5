//! A disk-space reserve for the control plane. A full disk must not stop an operator from
//! freeing space through Kafka (DeleteTopics needs a metadata write), so the data dir holds a
//! preallocated file `.weir-reserve` of `RESERVE_BYTES`. A metadata write that fails for lack of
//! space deletes the reserve and is tried once more; shard 0's retention tick puts the reserve
//! back once there is room again. All of it is blocking file I/O: call it through `blocking`.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

pub const RESERVE_FILE: &str = ".weir-reserve";
/// Enough for several metadata images of a large cluster.
pub const RESERVE_BYTES: u64 = 16 << 20;

/// Makes sure the reserve exists with its blocks allocated (fallocate, not a sparse file).
pub fn ensure(data_dir: &Path) -> io::Result<()> {
    let path = data_dir.join(RESERVE_FILE);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == RESERVE_BYTES) {
        return Ok(());
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    // SAFETY: fallocate on a file descriptor we own; mode 0 allocates and extends the size.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, RESERVE_BYTES as libc::off_t) };
    if r != 0 {
        let e = io::Error::last_os_error();
        drop(f);
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    f.sync_all()?;
    std::fs::File::open(data_dir)?.sync_all()?;
    tracing::debug!(bytes = RESERVE_BYTES, "disk-space reserve in place");
    Ok(())
}

/// Runs `f`; when it fails because the disk is full, frees the reserve and runs it once more.
pub fn with_reserve<T>(
    data_dir: &Path,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    match f() {
        Err(e) if super::file::is_no_space(&e) => {
            let path = data_dir.join(RESERVE_FILE);
            if std::fs::remove_file(&path).is_err() {
                return Err(e);
            }
            tracing::warn!(
                "disk full: released the {} MiB reserve for a metadata write (put back when space returns)",
                RESERVE_BYTES >> 20
            );
            f()
        }
        r => r,
    }
}
