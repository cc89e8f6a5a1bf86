//! The append-only effects log (AOF) of the embedded backend: how a claim acknowledged to
//! a client survives `kill -9` of the gateway.
//!
//! File format: the 8-byte magic [`MAGIC`], then records `len: u32 LE | crc32: u32 LE |
//! payload[len]`, each payload the ops of one script execution (see `keyspace`) or a
//! chunk of a snapshot. A torn record at the tail (crash mid-write) is detected by length
//! and CRC and dropped on load; damage anywhere else refuses to load.
//!
//! Invariants kept here:
//! - records are appended under the slot lock of the script that produced them, so per
//!   slot the log order is the execution order (slots are independent, so that is enough);
//! - a script's reply is released only once every record it could depend on has been
//!   handed to `write(2)` (and, with `fsync = always`, fsynced): [`Aof::commit`];
//! - a rewrite never loses a record: each slot is snapshotted under its lock, and records
//!   of already-snapshotted slots appended meanwhile are captured and copied after the
//!   snapshot, before the new file atomically replaces the old one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use super::keyspace::{Keyspace, Recorder};
use super::{EmbeddedError, Fsync, now_ms};
use crate::backend::BackendError;

/// First bytes of every log file: name and format version.
pub const MAGIC: &[u8; 8] = b"CGAOF\0\0\x01";
/// Record header: length and CRC32.
const HEADER: u64 = 8;
/// Snapshot records are cut at about this size.
const SNAPSHOT_CHUNK: usize = 256 << 10;

/// CRC32 (IEEE 802.3, reflected 0xEDB88320) lookup table.
const CRC32_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC32 (the zlib/PNG one) of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, &b| {
        CRC32_TABLE[usize::from((c as u8) ^ b)] ^ (c >> 8)
    })
}

/// Appends one framed record to `out`.
fn frame(out: &mut Vec<u8>, payload: &[u8], crc: u32) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
}

/// What loading found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadStats {
    pub records: u64,
    /// File size.
    pub bytes: u64,
    /// Offset of a torn tail record that was dropped.
    pub torn_at: Option<u64>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> EmbeddedError + '_ {
    move |source| EmbeddedError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Replays the log at `path` into `ks`. `Ok(None)`: there is no log yet.
pub fn load(path: &Path, ks: &Keyspace) -> Result<Option<LoadStats>, EmbeddedError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let size = file.metadata().map_err(io_err(path))?.len();
    let mut stats = LoadStats {
        bytes: size,
        ..LoadStats::default()
    };
    let corrupt = |offset: u64, reason: String| EmbeddedError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason,
    };
    let mut r = BufReader::with_capacity(1 << 20, file);
    if size < MAGIC.len() as u64 {
        // Only a crash while creating the file leaves it shorter than its magic.
        let mut head = Vec::new();
        r.read_to_end(&mut head).map_err(io_err(path))?;
        if !MAGIC.starts_with(&head) {
            return Err(corrupt(0, "not a claimgate append-only file".into()));
        }
        stats.torn_at = (size > 0).then_some(0);
        return Ok(Some(stats));
    }
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(io_err(path))?;
    if &magic != MAGIC {
        return Err(corrupt(0, "not a claimgate append-only file".into()));
    }
    let mut off = MAGIC.len() as u64;
    let mut payload = Vec::new();
    while off < size {
        let left = size - off;
        let mut head = [0u8; HEADER as usize];
        if left < HEADER {
            stats.torn_at = Some(off);
            break;
        }
        r.read_exact(&mut head).map_err(io_err(path))?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let end = off + HEADER + u64::from(len);
        if len == 0 || end > size {
            // The record runs past the end of the file (or the tail is zero-filled).
            if end > size || (crc == 0 && rest_is_zero(&mut r).map_err(io_err(path))?) {
                stats.torn_at = Some(off);
                break;
            }
            return Err(corrupt(off, "empty record".into()));
        }
        payload.resize(len as usize, 0);
        r.read_exact(&mut payload).map_err(io_err(path))?;
        if crc32(&payload) != crc {
            if end == size {
                stats.torn_at = Some(off);
                break;
            }
            return Err(corrupt(
                off,
                "checksum mismatch before the end of the file".into(),
            ));
        }
        ks.apply_record(&payload).map_err(|e| corrupt(off, e))?;
        stats.records += 1;
        off = end;
    }
    Ok(Some(stats))
}

/// True when everything left in `r` is zero bytes (a tail the filesystem extended but
/// never wrote).
fn rest_is_zero(r: &mut impl Read) -> io::Result<bool> {
    let mut buf = [0u8; 8192];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(true);
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
    }
}

/// Fsyncs the directory holding `path`, so a create or rename in it is durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".rewrite.tmp");
    PathBuf::from(s)
}

/// Durability progress published to `fsync = always` waiters.
#[derive(Debug, Clone, Copy, Default)]
struct SyncState {
    synced: u64,
    failed: bool,
}

/// Records appended but not yet written, and the capture of a rewrite in progress.
#[derive(Default)]
struct Pending {
    data: Vec<u8>,
    spare: Vec<u8>,
    capture: Option<Capture>,
}

/// Records of slots already snapshotted by the rewrite of epoch `epoch`.
struct Capture {
    epoch: u64,
    data: Vec<u8>,
}

/// The open log. Offsets below are logical: bytes ever appended since open, independent
/// of rewrites.
pub struct Aof {
    path: PathBuf,
    fsync: Fsync,
    pending: Mutex<Pending>,
    /// The current file; its lock also serialises writers and the rewrite's switch-over.
    file: Mutex<Arc<File>>,
    appended: AtomicU64,
    written: AtomicU64,
    synced: AtomicU64,
    sync_state: watch::Sender<SyncState>,
    wake: Mutex<bool>,
    wake_cv: Condvar,
    stopping: AtomicBool,
    failed: AtomicBool,
    file_size: AtomicU64,
    base_size: AtomicU64,
    rewrite_lock: Mutex<()>,
    epoch: AtomicU64,
}

impl Aof {
    /// Opens the log at `path` for appending (creating it with its magic if missing).
    /// Load it with [`load`] first.
    pub fn open(path: &Path, fsync: Fsync) -> Result<Aof, EmbeddedError> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        let mut size = file.metadata().map_err(io_err(path))?.len();
        if size == 0 {
            file.write_all(MAGIC).map_err(io_err(path))?;
            file.sync_all().map_err(io_err(path))?;
            sync_dir(path).map_err(io_err(path))?;
            size = MAGIC.len() as u64;
        }
        Ok(Aof {
            path: path.to_path_buf(),
            fsync,
            pending: Mutex::new(Pending::default()),
            file: Mutex::new(Arc::new(file)),
            appended: AtomicU64::new(0),
            written: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            sync_state: watch::Sender::new(SyncState::default()),
            wake: Mutex::new(false),
            wake_cv: Condvar::new(),
            stopping: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            file_size: AtomicU64::new(size),
            base_size: AtomicU64::new(size),
            rewrite_lock: Mutex::new(()),
            epoch: AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fsync_policy(&self) -> Fsync {
        self.fsync
    }

    /// Current size of the file (bytes written to it).
    pub fn file_size(&self) -> u64 {
        self.file_size.load(Ordering::Acquire)
    }

    /// A write or fsync failed: the log can no longer promise durability.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn fail(&self, what: &str, e: &io::Error) {
        tracing::error!(path = %self.path.display(), error = %e, "append-only file {what} failed; refusing further scripts");
        self.failed.store(true, Ordering::Release);
        self.sync_state.send_modify(|s| s.failed = true);
    }

    /// Logical end of everything appended so far.
    pub fn appended(&self) -> u64 {
        self.appended.load(Ordering::Acquire)
    }

    /// Appends one record; call while holding the slot lock the record's ops belong to,
    /// passing that slot's `snap_epoch`. Returns the record's logical end offset.
    pub fn append(&self, payload: &[u8], slot_epoch: u64) -> u64 {
        let crc = crc32(payload);
        let mut p = self.pending.lock();
        frame(&mut p.data, payload, crc);
        if let Some(c) = p.capture.as_mut()
            && c.epoch == slot_epoch
        {
            frame(&mut c.data, payload, crc);
        }
        let end = self.appended.load(Ordering::Relaxed) + HEADER + payload.len() as u64;
        self.appended.store(end, Ordering::Release);
        end
    }

    /// Hands every record up to `target` to `write(2)` (group write: one caller writes
    /// everything pending, the others find their record already written).
    pub fn write_through(&self, target: u64) -> io::Result<()> {
        if self.written.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let file = self.file.lock();
        if self.written.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let (mut data, end) = {
            let mut p = self.pending.lock();
            let spare = std::mem::take(&mut p.spare);
            (
                std::mem::replace(&mut p.data, spare),
                self.appended.load(Ordering::Acquire),
            )
        };
        let res = (&**file).write_all(&data);
        let n = data.len() as u64;
        data.clear();
        if data.capacity() <= 4 << 20 {
            self.pending.lock().spare = data;
        }
        match res {
            Ok(()) => {
                self.file_size.fetch_add(n, Ordering::AcqRel);
                self.written.store(end, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                self.fail("write", &e);
                Err(e)
            }
        }
    }

    /// Makes a script's reply releasable: its records written, and fsynced under `always`.
    pub async fn commit(&self, target: u64) -> Result<(), BackendError> {
        let unavailable =
            |what: String| BackendError::Unavailable(format!("append-only file: {what}"));
        if self.failed() {
            return Err(unavailable("failed earlier".into()));
        }
        self.write_through(target)
            .map_err(|e| unavailable(format!("write: {e}")))?;
        if self.fsync == Fsync::Always && self.synced.load(Ordering::Acquire) < target {
            let mut rx = self.sync_state.subscribe();
            self.request_sync();
            let state = *rx
                .wait_for(|s| s.failed || s.synced >= target)
                .await
                .map_err(|_| unavailable("syncer stopped".into()))?;
            if state.failed && state.synced < target {
                return Err(unavailable("fsync failed".into()));
            }
        }
        Ok(())
    }

    fn request_sync(&self) {
        *self.wake.lock() = true;
        self.wake_cv.notify_one();
    }

    fn mark_synced(&self, upto: u64) {
        self.synced.fetch_max(upto, Ordering::AcqRel);
        self.sync_state
            .send_modify(|s| s.synced = s.synced.max(upto));
    }

    /// Fsyncs everything written so far.
    pub fn sync_now(&self) -> io::Result<()> {
        let (file, target) = {
            let f = self.file.lock();
            (f.clone(), self.written.load(Ordering::Acquire))
        };
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        match file.sync_data() {
            Ok(()) => {
                self.mark_synced(target);
                Ok(())
            }
            Err(e) => {
                self.fail("fsync", &e);
                Err(e)
            }
        }
    }

    /// Writes and fsyncs everything appended so far (graceful shutdown, `flush()`).
    pub fn flush(&self) -> io::Result<()> {
        self.write_through(self.appended())?;
        self.sync_now()
    }

    /// The background fsync loop (`everysec`: once a second; `always`: on request, the
    /// group commit of every waiter). Returns once [`Aof::stop`] is called.
    pub fn run_syncer(&self) {
        loop {
            {
                let mut req = self.wake.lock();
                if !*req && !self.stopping.load(Ordering::Acquire) {
                    self.wake_cv.wait_for(&mut req, Duration::from_secs(1));
                }
                *req = false;
            }
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            if self.fsync != Fsync::No && !self.failed() {
                let _ = self.sync_now();
            }
        }
    }

    /// Stops [`Aof::run_syncer`].
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.request_sync();
    }

    /// The file grew past `min_bytes` and doubled since the last rewrite.
    pub fn should_rewrite(&self, min_bytes: u64) -> bool {
        let size = self.file_size();
        size >= min_bytes && size >= 2 * self.base_size.load(Ordering::Acquire)
    }

    /// Rewrites the log as a compact snapshot of `ks` (write to a temp file, fsync,
    /// rename), keeping every record appended meanwhile. Safe to run while scripts run.
    /// Returns the new file size. On failure the old file stays in use, complete.
    pub fn rewrite(&self, ks: &Keyspace) -> Result<u64, EmbeddedError> {
        let _one = self.rewrite_lock.lock();
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.pending.lock().capture = Some(Capture {
            epoch,
            data: Vec::new(),
        });
        let tmp = tmp_path(&self.path);
        let res = self.rewrite_into(ks, epoch, &tmp);
        if res.is_err() {
            self.pending.lock().capture = None;
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    fn rewrite_into(&self, ks: &Keyspace, epoch: u64, tmp: &Path) -> Result<u64, EmbeddedError> {
        let ioe = io_err(tmp);
        let file = File::create(tmp).map_err(io_err(tmp))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(MAGIC).map_err(io_err(tmp))?;

        // Phase 1: snapshot slot by slot, each under its own lock (short pauses only).
        let now = now_ms();
        let mut rec = Recorder::new(true);
        let mut framed = Vec::new();
        for slot in ks.slots() {
            {
                let mut db = slot.lock();
                db.snapshot(now, &mut rec, SNAPSHOT_CHUNK, &mut |r: &mut Recorder| {
                    frame(&mut framed, &r.buf, crc32(&r.buf));
                    r.buf.clear();
                });
                if !rec.buf.is_empty() {
                    frame(&mut framed, &rec.buf, crc32(&rec.buf));
                    rec.buf.clear();
                }
                db.snap_epoch = epoch;
            }
            if !framed.is_empty() {
                w.write_all(&framed).map_err(io_err(tmp))?;
                framed.clear();
            }
        }

        // Phase 2: copy what was captured so far, fsync the bulk without blocking anyone.
        let (chunk, mut covered) = {
            let mut p = self.pending.lock();
            let chunk = p
                .capture
                .as_mut()
                .map(|c| std::mem::take(&mut c.data))
                .unwrap_or_default();
            (chunk, self.appended.load(Ordering::Acquire))
        };
        w.write_all(&chunk).map_err(io_err(tmp))?;
        let file = w.into_inner().map_err(|e| io_err(tmp)(e.into_error()))?;
        file.sync_data().map_err(io_err(tmp))?;

        // Phase 3: switch over. Writers wait on the file lock; appends continue.
        let mut current = self.file.lock();
        let (rest, end, covered_len) = {
            let mut p = self.pending.lock();
            let rest = p.capture.take().map(|c| c.data).unwrap_or_default();
            (rest, self.appended.load(Ordering::Acquire), p.data.len())
        };
        (&file).write_all(&rest).map_err(io_err(tmp))?;
        if rest.is_empty() {
            covered = end;
        } else if self.fsync == Fsync::Always {
            file.sync_data().map_err(io_err(tmp))?;
            covered = end;
        }
        fs::rename(tmp, &self.path).map_err(io_err(&self.path))?;
        // From here on the new file is the log: failures are failures of the log.
        let finish = || -> io::Result<(File, u64)> {
            sync_dir(&self.path)?;
            let size = file.metadata()?.len();
            let f = OpenOptions::new().append(true).open(&self.path)?;
            Ok((f, size))
        };
        let (newf, size) = match finish() {
            Ok(v) => v,
            Err(e) => {
                self.fail("rewrite switch-over", &e);
                return Err(ioe(e));
            }
        };
        *current = Arc::new(newf);
        // Pending bytes up to `end` are in the new file already; later ones are not.
        self.pending.lock().data.drain(..covered_len);
        self.written.store(end, Ordering::Release);
        self.mark_synced(covered);
        self.file_size.store(size, Ordering::Release);
        self.base_size.store(size, Ordering::Release);
        drop(current);
        tracing::info!(path = %self.path.display(), bytes = size, "append-only file rewritten");
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }
}
