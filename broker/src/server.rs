//! Starting and stopping the broker: one pinned glommio executor per shard, joined into a
//! channel mesh; each opens the partitions it owns, accepts connections on the shared port,
//! and on SIGINT/SIGTERM answers what it already read, syncs and closes its logs. The main
//! thread writes the clean-shutdown marker once every shard closed cleanly.

use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};

use crate::cluster::metadata::{self, Image};
use crate::config::Config;
use crate::shard::{self, Shard, ShardMsg, PEER_OPS_MAX};
use crate::storage::log::IoResult;

pub const CLEAN_SHUTDOWN_MARKER: &str = ".weir_clean_shutdown";
/// Messages queued per pair of shards before a sender waits.
const MESH_CHANNEL_CAPACITY: usize = 1024;
/// glommio's default io_memory per executor, registered with io_uring when the memlock limit
/// allows.
const IO_MEMORY_BYTES: usize = 10 << 20;
/// Rings per executor that register the io memory (main, latency and poll ring).
const RINGS_PER_EXECUTOR: usize = 3;

/// Decides how much io memory each executor registers, raising RLIMIT_MEMLOCK when allowed.
/// Registration is an optimisation: without it glommio uses ordinary buffers.
fn plan_io_memory(shards: usize) -> usize {
    let need = (IO_MEMORY_BYTES * RINGS_PER_EXECUTOR * shards) as u64 + (1 << 20);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return IO_MEMORY_BYTES;
    }
    if lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < need {
        let raised = libc::rlimit {
            rlim_cur: need,
            rlim_max: lim.rlim_max.max(need),
        };
        let capped = libc::rlimit {
            rlim_cur: lim.rlim_max.min(need),
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct; failure leaves the limit unchanged.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raised) } == 0 {
            tracing::info!(
                from = lim.rlim_cur,
                to = need,
                "raised RLIMIT_MEMLOCK for io_uring buffer registration"
            );
            return IO_MEMORY_BYTES;
        }
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &capped) };
        let have = lim.rlim_max.min(need).max(lim.rlim_cur);
        let per = (have.saturating_sub(1 << 20) / (RINGS_PER_EXECUTOR * shards) as u64) as usize
            / 4096
            * 4096;
        tracing::warn!(
            memlock_bytes = have,
            needed_bytes = need,
            "ulimit -l is too low to register {} MiB of io_uring buffers per shard; registering {} KiB instead \
             (raise it with `ulimit -l {}` for full speed)",
            IO_MEMORY_BYTES >> 20,
            per >> 10,
            need / 1024
        );
        return per.max(64 << 10);
    }
    IO_MEMORY_BYTES
}

fn cpus(shards: usize) -> Vec<usize> {
    let ids: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    if ids.is_empty() {
        return (0..shards).collect();
    }
    (0..shards).map(|i| ids[i % ids.len()]).collect()
}

pub fn run(config: Config) -> Result<()> {
    let config = Arc::new(config);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let cluster_id = Arc::new(metadata::cluster_id(&config.data_dir, config.node_id)?);
    let fresh = !config.data_dir.join(metadata::METADATA_FILE).exists();
    let mut image = metadata::load(&config.data_dir, config.shards)?;
    if !image.topics.contains_key(crate::group::OFFSETS_TOPIC) {
        // The internal topic of committed offsets and group metadata. Never deleted by
        // retention: it holds the only copy of committed offsets.
        let partitions = metadata::assign_shards(
            &mut image,
            config.group.offsets_partitions as usize,
            config.shards,
        );
        let mut configs = std::collections::BTreeMap::new();
        configs.insert("retention.ms".to_string(), "-1".to_string());
        configs.insert("segment.bytes".to_string(), "104857600".to_string());
        image.topics.insert(
            crate::group::OFFSETS_TOPIC.to_string(),
            metadata::TopicMeta {
                id: uuid::Uuid::new_v4(),
                partitions,
                configs,
                internal: true,
            },
        );
        image.version += 1;
        metadata::store(&config.data_dir, &image)?;
    }
    let image: Arc<Image> = Arc::new(image);
    let marker = config.data_dir.join(CLEAN_SHUTDOWN_MARKER);
    let clean = marker.exists();
    if clean {
        std::fs::remove_file(&marker)?;
        std::fs::File::open(&config.data_dir)?.sync_all()?;
    } else if !fresh {
        tracing::warn!("no clean-shutdown marker: recovering the tail of every active segment");
    }

    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;

    let io_memory = plan_io_memory(config.shards);
    let mesh: MeshBuilder<ShardMsg, _> = MeshBuilder::full(config.shards, MESH_CHANNEL_CAPACITY);
    let drained = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::with_capacity(config.shards);
    for (i, cpu) in cpus(config.shards).into_iter().enumerate() {
        let (config, cluster_id, image, mesh, stop, drained) = (
            config.clone(),
            cluster_id.clone(),
            image.clone(),
            mesh.clone(),
            stop.clone(),
            drained.clone(),
        );
        let h = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("weir-shard-{i}"))
            .io_memory(io_memory)
            .spawn(move || async move {
                shard_main(config, cluster_id, image, mesh, clean, stop, drained).await
            })
            .io()
            .with_context(|| format!("starting shard {i} on cpu {cpu}"))?;
        handles.push(h);
    }
    let mut failed = false;
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!("shard stopped with an error: {e:#}");
                failed = true;
            }
            Err(e) => {
                tracing::error!("shard thread failed: {e}");
                failed = true;
            }
        }
    }
    if failed {
        bail!("unclean shutdown: the next start will recover the logs");
    }
    write_marker(&config.data_dir)?;
    tracing::info!("clean shutdown complete");
    Ok(())
}

fn write_marker(dir: &Path) -> Result<()> {
    std::fs::write(dir.join(CLEAN_SHUTDOWN_MARKER), b"")?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

async fn shard_main(
    config: Arc<Config>,
    cluster_id: Arc<String>,
    image: Arc<Image>,
    mesh: MeshBuilder<ShardMsg, glommio::channels::channel_mesh::Full>,
    clean: bool,
    stop: Arc<AtomicBool>,
    drained: Arc<AtomicUsize>,
) -> Result<()> {
    let (senders, mut receivers) = mesh
        .join()
        .await
        .map_err(|e| anyhow::anyhow!("joining the shard mesh: {e}"))?;
    let id = senders.peer_id();
    let count = config.shards;
    crate::storage::log::prime_dma(&config.data_dir, &format!(".probe-{id}")).await?;
    let s: Rc<Shard> = Shard::install(
        id,
        count,
        config.clone(),
        cluster_id,
        image.clone(),
        senders,
    );

    for (peer, rx) in receivers.streams() {
        let ops = Rc::new(glommio::sync::Semaphore::new(PEER_OPS_MAX));
        glommio::spawn_local(async move {
            while let Some(msg) = rx.recv().await {
                let Ok(permit) = ops.acquire_static_permit(1).await else {
                    break;
                };
                shard::shard().count_remote_in();
                glommio::spawn_local(async move {
                    shard::handle_msg_guarded(msg).await;
                    drop(permit);
                })
                .detach();
            }
            tracing::debug!(peer, "peer channel closed");
        })
        .detach();
    }

    s.apply_image(image, clean)
        .await
        .with_context(|| format!("shard {id}: opening partitions"))?;
    tracing::info!(
        shard = id,
        partitions = s.partition_count(),
        "partitions open"
    );
    glommio::spawn_local(s.clone().flusher()).detach();
    // Replay this shard's partitions of __consumer_offsets; until then their groups answer
    // COORDINATOR_LOAD_IN_PROGRESS.
    let owned: Vec<i32> = s
        .image()
        .topics
        .get(crate::group::OFFSETS_TOPIC)
        .map(|t| {
            t.partitions
                .iter()
                .enumerate()
                .filter(|(_, p)| p.shard as usize == id)
                .map(|(i, _)| i as i32)
                .collect()
        })
        .unwrap_or_default();
    s.groups.loading.borrow_mut().extend(owned.iter().copied());
    let loader = s.clone();
    glommio::spawn_local(async move {
        for p in owned {
            crate::group::load_partition(&loader, p).await;
        }
    })
    .detach();
    glommio::spawn_local(s.clone().group_ticker()).detach();
    glommio::spawn_local(s.clone().retention()).detach();

    let listener = glommio::net::TcpListener::bind(config.listen)
        .io()
        .with_context(|| format!("binding {} (is another broker running?)", config.listen))?;
    tracing::info!(shard = id, listen = %config.listen, "accepting connections");
    glommio::spawn_local(crate::net::accept_loop(listener)).detach();

    while !stop.load(Ordering::Relaxed) {
        glommio::timer::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!(shard = id, "shutting down: answering in-flight requests");
    s.shutting_down.set(true);
    s.stopped.notify(usize::MAX);
    crate::net::drain(Duration::from_secs(10)).await;
    // Every shard must finish its requests before any closes its logs: a request read on one
    // shard may append on another.
    drained.fetch_add(1, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while drained.load(Ordering::SeqCst) < count && std::time::Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    let closed = s.close_all().await;
    tracing::info!("{}", s.stats_line());
    closed
}
