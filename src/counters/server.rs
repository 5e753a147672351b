//! The socket side: a node's server thread, and the client functions tools use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CountersError, MemberInfo, Snapshot};
use crate::engine::Shared;

/// What a snapshot says about the node itself (fixed for its lifetime).
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) node_id: u64,
    pub(crate) session: u64,
    pub(crate) name: String,
    pub(crate) backend: String,
    pub(crate) group: SocketAddr,
    pub(crate) stream: u32,
    pub(crate) started: Instant,
}

impl Identity {
    /// The node's counters as the engine last published them.
    pub(crate) fn snapshot(&self, shared: &Shared) -> Snapshot {
        let stats = shared.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let peers = shared.peers.lock().unwrap_or_else(|e| e.into_inner()).peers.clone();
        let members = shared
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|m| MemberInfo { node_id: m.node_id, session: m.session, name: m.name.clone() })
            .collect();
        Snapshot {
            node_id: self.node_id,
            session: self.session,
            name: self.name.clone(),
            pid: std::process::id(),
            backend: self.backend.clone(),
            group: self.group,
            stream: self.stream,
            uptime: self.started.elapsed(),
            stats,
            extra: Vec::new(),
            members,
            peers,
        }
    }
}

/// The directory used when the export is on without one: `$XDG_RUNTIME_DIR/blip`, else `/tmp/blip-<uid>`.
pub fn default_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("blip"),
        _ => std::env::temp_dir().join(format!("blip-{}", uid())),
    }
}

#[cfg(unix)]
fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

#[cfg(not(unix))]
fn uid() -> u32 {
    0
}

/// The sockets in `dir`, sorted; empty if there is no such directory. Sockets of processes that died
/// without cleaning up are listed too: [`read`] fails on them.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    out.sort();
    out
}

/// Fetches one snapshot from a node's socket, waiting at most [`READ_TIMEOUT`](super::READ_TIMEOUT).
pub fn read(path: &Path) -> Result<Snapshot, CountersError> {
    read_timeout(path, super::READ_TIMEOUT)
}

/// Fetches one snapshot, waiting at most `timeout` for each read.
#[cfg(unix)]
pub fn read_timeout(path: &Path, timeout: Duration) -> Result<Snapshot, CountersError> {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let io = |op, source| CountersError::Io { op, path: path.to_owned(), source };
    let conn = UnixStream::connect(path).map_err(|e| io("connect to", e))?;
    conn.set_read_timeout(Some(timeout.max(Duration::from_millis(1)))).map_err(|e| io("set timeout on", e))?;
    let mut bytes = Vec::with_capacity(4096);
    match conn.take(super::MAX_SNAPSHOT as u64 + 1).read_to_end(&mut bytes) {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            return Err(CountersError::Timeout(path.to_owned()));
        }
        Err(e) => return Err(io("read from", e)),
    }
    if bytes.len() > super::MAX_SNAPSHOT {
        return Err(CountersError::TooLarge);
    }
    Snapshot::decode(&bytes)
}

/// Fetches one snapshot (unavailable without Unix sockets).
#[cfg(not(unix))]
pub fn read_timeout(_path: &Path, _timeout: Duration) -> Result<Snapshot, CountersError> {
    Err(CountersError::Unsupported)
}

/// A node's counters socket and the thread that serves it.
pub(crate) struct Server {
    #[cfg(unix)]
    inner: Option<unix::Running>,
}

impl Server {
    /// Creates `dir` (mode 0700) if needed, binds `<dir>/<pid>-<node id>.sock` and starts serving.
    #[cfg(unix)]
    pub(crate) fn start(dir: &Path, identity: Identity, shared: Arc<Shared>) -> Result<Server, CountersError> {
        unix::start(dir, identity, shared).map(|r| Server { inner: Some(r) })
    }

    #[cfg(not(unix))]
    pub(crate) fn start(_dir: &Path, _identity: Identity, _shared: Arc<Shared>) -> Result<Server, CountersError> {
        Err(CountersError::Unsupported)
    }

    /// The socket's path.
    pub(crate) fn path(&self) -> Option<&Path> {
        #[cfg(unix)]
        return self.inner.as_ref().map(|r| r.path.as_path());
        #[cfg(not(unix))]
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(r) = self.inner.take() {
            r.stop();
        }
    }
}

#[cfg(unix)]
mod unix {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread::JoinHandle;
    use std::time::Duration;

    use super::{CountersError, Identity};
    use crate::engine::Shared;

    pub(super) struct Running {
        pub(super) path: PathBuf,
        stop: Arc<AtomicBool>,
        listener: UnixListener,
        thread: JoinHandle<()>,
    }

    pub(super) fn start(dir: &Path, identity: Identity, shared: Arc<Shared>) -> Result<Running, CountersError> {
        let io = |op, path: &Path, source| CountersError::Io { op, path: path.to_owned(), source };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io("create counters directory", dir, e))?;
        let meta = std::fs::metadata(dir).map_err(|e| io("inspect counters directory", dir, e))?;
        if meta.uid() != super::uid() {
            return Err(CountersError::NotOwner { path: dir.to_owned(), owner: meta.uid() });
        }
        remove_dead(dir);
        let path = dir.join(format!("{}-{:016x}.sock", std::process::id(), identity.node_id));
        let listener = bind(&path)?;
        let served = listener.try_clone().map_err(|e| io("clone listener of", &path, e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("blip-counters".into())
            .spawn(move || serve(served, &identity, &shared, &flag))
            .map_err(|e| io("spawn the counters thread for", &path, e))?;
        Ok(Running { path, stop, listener, thread })
    }

    /// Binds the socket; a leftover file of this path whose listener is gone (this pid's previous owner
    /// died) is replaced.
    fn bind(path: &Path) -> Result<UnixListener, CountersError> {
        let io = |op, source| CountersError::Io { op, path: path.to_owned(), source };
        match UnixListener::bind(path) {
            Ok(l) => Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if UnixStream::connect(path).is_ok() {
                    return Err(CountersError::InUse(path.to_owned()));
                }
                std::fs::remove_file(path).map_err(|e| io("remove stale socket", e))?;
                UnixListener::bind(path).map_err(|e| io("bind", e))
            }
            Err(e) => Err(io("bind", e)),
        }
    }

    /// Removes sockets whose process no longer exists (killed nodes cannot clean up). Only the pid in the
    /// name is checked, never a connection: a node that has just bound and not yet listened would refuse it.
    fn remove_dead(dir: &Path) {
        for p in super::list(dir) {
            let pid = p.file_name().and_then(|n| n.to_str()).and_then(|n| n.split('-').next()?.parse::<i32>().ok());
            if let Some(pid) = pid
                && pid > 0
                && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) == Err(nix::errno::Errno::ESRCH)
            {
                let _ = std::fs::remove_file(&p);
            }
        }
    }

    /// Answers each connection with one snapshot. Blocks in accept: an idle node costs no wakeups.
    fn serve(listener: UnixListener, identity: &Identity, shared: &Shared, stop: &AtomicBool) {
        for conn in listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            match conn {
                Ok(mut c) => {
                    // A reader that stops reading must not hold the thread (and the node's shutdown) for long.
                    let _ = c.set_write_timeout(Some(Duration::from_secs(1)));
                    let _ = c.write_all(identity.snapshot(shared).encode().as_bytes());
                }
                Err(e) => {
                    log::debug!("blip: counters accept: {e}");
                    // Out of descriptors and the like: do not spin on a failing accept.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    impl Running {
        pub(super) fn stop(self) {
            self.stop.store(true, Ordering::SeqCst);
            // Wake the accept with a connection of our own, or, if the file was removed by someone, by shutting
            // the listening socket down.
            let woken = UnixStream::connect(&self.path).is_ok() || shutdown_listener(&self.listener);
            // Should neither work, the thread is left blocked (it holds no lock) rather than hang the caller.
            if woken {
                let _ = self.thread.join();
            }
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// A blocked accept returns when its socket is shut down on Linux; elsewhere that is not assured.
    #[cfg(target_os = "linux")]
    fn shutdown_listener(l: &UnixListener) -> bool {
        nix::sys::socket::shutdown(std::os::fd::AsRawFd::as_raw_fd(l), nix::sys::socket::Shutdown::Both).is_ok()
    }

    #[cfg(not(target_os = "linux"))]
    fn shutdown_listener(_l: &UnixListener) -> bool {
        false
    }
}
