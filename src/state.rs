//! Crash-safe primitives for shared state files.
//!
//! Invariants:
//! - A shared file is never written in place: [`write_atomic`] writes a temp file in the same
//!   directory, fsyncs it, renames it over the target and fsyncs the directory, so a reader sees
//!   the old or the new version, never half of one, whatever instant a crash comes.
//!   [`replace_all`] does the same for several files at once, leaving the directory sync to its
//!   caller.
//! - Read-modify-write happens while holding a [`FileLock`] (an exclusive `flock` on a separate
//!   lock file, released when the guard drops or the process dies), with the data reloaded
//!   inside the lock.
//! - Files are created with mode 0600.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Holds a `flock` on a lock file (exclusive or shared) until dropped; not a named lock
/// (`lock::LockGuard`), only the guard of one read-modify-write.
#[derive(Debug)]
pub struct FileLock {
    // Closing the file releases the flock.
    _file: File,
}

/// Takes an exclusive lock on `path` (created 0600 if missing), blocking until it is free.
pub fn lock_exclusive(path: &Path) -> Result<FileLock> {
    lock_with(path, File::lock)
}

/// Takes a shared lock on `path`, blocking while an exclusive holder exists.
pub fn lock_shared(path: &Path) -> Result<FileLock> {
    lock_with(path, File::lock_shared)
}

/// Takes an exclusive lock on `path` (created 0600 if missing) if nobody holds it; `None`
/// when someone does.
pub fn try_lock_exclusive(path: &Path) -> Result<Option<FileLock>> {
    use std::os::unix::fs::MetadataExt;
    let file = open_lock_file(path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => return Ok(None),
        Err(fs::TryLockError::Error(err)) => return Err(Error::io("locking", path, err)),
    }
    // As in `lock_with`: a file deleted meanwhile is a lock nobody else sees; try again later.
    let held = file.metadata().io_context("reading", path)?;
    Ok(match fs::metadata(path) {
        Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
            Some(FileLock { _file: file })
        }
        _ => None,
    })
}

/// Locks the file at `path`, and checks after locking that `path` still names the locked
/// file: one deleted meanwhile (`git clean -fdx` takes `.app/`'s lock files too) would be a
/// lock nobody else can see, so the lock is taken again on whatever `path` is now.
fn lock_with(path: &Path, lock: fn(&File) -> io::Result<()>) -> Result<FileLock> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let file = open_lock_file(path)?;
        lock(&file).io_context("locking", path)?;
        let held = file.metadata().io_context("reading", path)?;
        match fs::metadata(path) {
            Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                return Ok(FileLock { _file: file });
            }
            Ok(_) => continue,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(Error::io("reading", path, err)),
        }
    }
}

fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .io_context("opening lock file", path)
}

/// Creates `dir` and any missing parents with mode 0700; an existing directory is fine, which
/// makes it safe for many processes at once.
pub fn create_private_dir_all(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)
        .io_context("creating", dir)
}

/// Creates `path` as an empty 0600 file unless it exists.
pub fn create_private_file(path: &Path) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map(drop)
        .io_context("creating", path)
}

/// Replaces `path` with `bytes` atomically and durably (temp file, fsync, rename, fsync dir).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_all(&[(path, bytes)])?;
    sync_parent(path)
}

/// Replaces each `(path, bytes)` atomically: every temp file is written and fsynced (all at
/// once, so one file-system journal commit can serve them all) before any is renamed into
/// place. The renames are not made durable here: the caller syncs the directory, after
/// releasing its lock, so others need not wait for the disk ([`sync_parent`]).
pub fn replace_all(files: &[(impl AsRef<Path>, impl AsRef<[u8]>)]) -> Result<()> {
    let mut staged: Vec<(PathBuf, File)> = Vec::with_capacity(files.len());
    let result = (|| {
        for (path, bytes) in files {
            let tmp = temp_path(path.as_ref());
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .io_context("creating", &tmp)?;
            staged.push((tmp, file));
            let (tmp, file) = staged.last_mut().expect("just staged");
            file.write_all(bytes.as_ref()).io_context("writing", tmp)?;
        }
        let sync = |(tmp, file): &(PathBuf, File)| file.sync_all().io_context("syncing", tmp);
        match staged.as_slice() {
            [one] => sync(one)?,
            many => std::thread::scope(|scope| {
                let syncing: Vec<_> = many.iter().map(|f| scope.spawn(move || sync(f))).collect();
                syncing
                    .into_iter()
                    .try_for_each(|t| t.join().expect("fsync does not panic"))
            })?,
        }
        for ((tmp, _), (path, _)) in staged.iter().zip(files) {
            fs::rename(tmp, path).io_context("replacing", path.as_ref())?;
        }
        Ok(())
    })();
    if result.is_err() {
        for (tmp, _) in &staged {
            let _ = fs::remove_file(tmp);
        }
    }
    result
}

/// Creates `path` with `bytes` only if it does not exist yet; returns false if it did.
///
/// The content appears whole or not at all: it is written to a temp file and hard-linked into
/// place, which fails if another process got there first.
pub fn create_atomic(path: &Path, bytes: &[u8]) -> Result<bool> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .io_context("creating", &tmp)?;
        file.write_all(bytes).io_context("writing", &tmp)?;
        file.sync_all().io_context("syncing", &tmp)?;
        match fs::hard_link(&tmp, path) {
            Ok(()) => {
                sync_parent(path)?;
                Ok(true)
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(err) => Err(Error::io("creating", path, err)),
        }
    })();
    let _ = fs::remove_file(&tmp);
    result
}

/// Reads `path`, or `None` when it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(Error::io("reading", path, err)),
    }
}

/// Removes `path`; one that is already gone is not an error.
pub fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(Error::io("removing", path, err)),
        _ => Ok(()),
    }
}

/// The names of the entries of `dir`, sorted, without the dot-prefixed ones (the temp files of
/// writers in progress, see [`temp_file_writer`]); none when `dir` does not exist.
pub fn visible_names(dir: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(Error::io("reading", dir, err)),
    };
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with('.'))
        .collect();
    names.sort();
    Ok(names)
}

/// The pid of the process that made `file_name` if it is one of [`write_atomic`]'s temp files
/// (`.<name>.tmp.<pid>.<n>`).
pub fn temp_file_writer(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix('.')?;
    let (head, n) = rest.rsplit_once('.')?;
    let (head, pid) = head.rsplit_once('.')?;
    (head.ends_with(".tmp") && n.parse::<u64>().is_ok())
        .then(|| pid.parse().ok())
        .flatten()
}

/// A temp name beside `path`, unique to this process and call (see [`temp_file_writer`]).
fn temp_path(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}.{n}", std::process::id()))
}

/// Makes the renames and removals of entries in `path`'s directory durable.
pub fn sync_parent(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        let dir = File::open(parent).io_context("opening", parent)?;
        dir.sync_all().io_context("syncing", parent)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_replaces_whole_file_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file may remain");
    }

    #[test]
    fn replace_all_renames_nothing_unless_every_file_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
        replace_all(&[(&a, b"a1"), (&b, b"b1")]).unwrap();
        assert_eq!(
            (fs::read(&a).unwrap(), fs::read(&b).unwrap()),
            (b"a1".to_vec(), b"b1".to_vec())
        );
        // The second file cannot be written (its directory is missing): the first stays as it was.
        let missing = dir.path().join("gone/c.json");
        assert!(replace_all(&[(&a, &b"a2"[..]), (&missing, &b"c"[..])]).is_err());
        assert_eq!(fs::read(&a).unwrap(), b"a1");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temp file may remain: {names:?}");
    }

    #[test]
    fn temp_files_name_their_writer() {
        let path = Path::new("/x/process_registry.json");
        let temp = temp_path(path);
        let name = temp.file_name().unwrap().to_str().unwrap();
        assert_eq!(temp_file_writer(name), Some(std::process::id()));
        for other in [
            "process_registry.json",
            ".secret",
            ".a.tmp.x.1",
            "a.tmp.1.2",
        ] {
            assert_eq!(temp_file_writer(other), None, "{other}");
        }
    }

    #[test]
    fn create_atomic_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        assert!(create_atomic(&path, b"one").unwrap());
        assert!(!create_atomic(&path, b"two").unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"one");
    }
}
