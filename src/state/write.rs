//! Atomic replacement of files: [`write_atomic`] (durable), [`write_published`] (runtime files),
//! [`write_swapping`] (runtime files rewritten every second: no inode per write) and
//! [`write_atomic_all`] (many durable files at the cost of a few fsyncs: the ledgers).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::procfs::Kept;

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsynced, then
/// renamed over `path`, then the directory fsynced. Readers see the old or the new content,
/// never a part, and after a crash the file holds one of them.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_replacing(path, bytes, mode, true)
}

/// Like [`write_atomic`] without the fsyncs: for files that are rewritten every tick on a
/// runtime (tmpfs) directory, where readers must never see a part but durability is moot.
pub fn write_published(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_replacing(path, bytes, 0o644, false)
}

/// Like [`write_published`], without creating a file: the new content is written into the
/// file's *companion* (`.NAME.swap` beside it, created by the first replacement and kept), and
/// the two names are then exchanged in one step (`renameat2(RENAME_EXCHANGE)`), so the companion
/// holds the previous content until the next write. For files rewritten every second per VM:
/// a new inode per write (and the old one freed) made inode allocation most of the agent's CPU
/// with 200 VMs on an ext4 without a journal, whose allocator skips every recently freed inode
/// one by one (kernel `recently_deleted`), a cost that grows with the number of writers.
///
/// Readers that open the file see the old or the new content, never a part, as long as they
/// read it within one write interval of opening it: a reader still holding the file open when
/// the *next* write starts reads the companion being rewritten. (File systems that cannot
/// exchange names get a rename, as [`write_published`].)
pub fn write_swapping(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let (_, companion) = fill_companion(path, bytes, 0o644)?;
    swap_in(&companion, path)
}

/// [`write_swapping`] of the file `name` in the directory open as `dir` (a descriptor the
/// caller keeps, `O_PATH` is enough): each step looks up one name instead of walking the whole
/// path (with 100 idle VMs, path walks were a tenth of the agent's CPU, most of them for these
/// files). A directory removed since it was opened fails with `ENOENT`.
pub fn write_swapping_at(dir: BorrowedFd<'_>, name: &str, bytes: &[u8]) -> io::Result<()> {
    use nix::fcntl::{openat, renameat, renameat2, OFlag, RenameFlags};
    use nix::sys::stat::Mode;
    let companion = companion_name(name);
    let dir = dir.as_raw_fd();
    let fd = openat(
        Some(dir),
        companion.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    fill(unsafe { File::from_raw_fd(fd) }, bytes)?;
    let exchange = RenameFlags::RENAME_EXCHANGE;
    match renameat2(Some(dir), companion.as_str(), Some(dir), name, exchange) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::EINVAL) => {
            Ok(renameat(Some(dir), companion.as_str(), Some(dir), name)?)
        }
        Err(e) => Err(e.into()),
    }
}

/// A file of a kept directory that is rewritten every second (a VM's `balance`, its
/// `credits.json`) as [`write_swapping_at`] does it, through two descriptors kept open: the
/// file shown under its name and its companion. A rewrite is then a `pwrite` into the
/// companion, an `fstat` and the exchange of the names; the companion's open and close, which
/// [`write_swapping_at`] pays each time, were most of what the agent spent on opening files with
/// 100 idle VMs (`perf`: the opens a tenth of its samples, three quarters of them companions).
///
/// Both descriptors count against the [`Kept`] budget's spare half. The pair follows its files
/// as long as the agent alone renames them; when someone else has replaced one (its companion
/// found with no name left), or the directory is gone, [`SwapPair::write`] fails and the caller
/// writes by name again (and may take a new pair).
#[derive(Debug)]
pub struct SwapPair {
    shown: Kept,
    spare: Kept,
}

impl SwapPair {
    /// The pair of `name` in `dir` and its companion, both existing (after a second
    /// [`write_swapping_at`] of `name`); `None` when either is missing or the budget is short.
    pub fn open(dir: BorrowedFd<'_>, name: &str) -> Option<SwapPair> {
        let open = |n: &str| {
            use nix::fcntl::{openat, OFlag};
            let flags = OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
            let fd = openat(
                Some(dir.as_raw_fd()),
                n,
                flags,
                nix::sys::stat::Mode::empty(),
            )?;
            // SAFETY: openat returned a new descriptor that nothing else owns.
            Ok(unsafe { File::from_raw_fd(fd) })
        };
        let shown = Kept::open_spare(|| open(name))?;
        let spare = Kept::open_spare(|| open(&companion_name(name)))?;
        Some(SwapPair { shown, spare })
    }

    /// Writes `bytes` into the companion and exchanges it with `name` in `dir`: afterwards
    /// `name` holds exactly `bytes`, as with [`write_swapping_at`]. An error leaves the file
    /// shown as it was (or with `bytes`); the pair is then to be dropped.
    pub fn write(&mut self, dir: BorrowedFd<'_>, name: &str, bytes: &[u8]) -> io::Result<()> {
        use nix::fcntl::{renameat2, RenameFlags};
        use std::os::unix::fs::{FileExt, MetadataExt};
        self.spare.write_all_at(bytes, 0)?;
        let meta = self.spare.metadata()?;
        if meta.nlink() == 0 {
            // Someone put another file in its place: the companion is not this one.
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "companion replaced",
            ));
        }
        let len = bytes.len() as u64;
        if meta.len() != len {
            self.spare.set_len(len)?;
        }
        let companion = companion_name(name);
        let (d, exchange) = (dir.as_raw_fd(), RenameFlags::RENAME_EXCHANGE);
        renameat2(Some(d), companion.as_str(), Some(d), name, exchange)?;
        std::mem::swap(&mut self.shown, &mut self.spare);
        Ok(())
    }
}

/// Removes `path`'s companion, when the file will no longer be rewritten (a VM's ledger once the
/// VM has ended).
pub fn remove_companion(path: &Path) {
    if let Ok(c) = companion(path) {
        let _ = fs::remove_file(c);
    }
}

/// The companion of `path`: `.NAME.swap` beside it.
fn companion(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("no file name"))?;
    Ok(path.with_file_name(companion_name(&name.to_string_lossy())))
}

/// The name of the companion of the file named `name`: `.NAME.swap`.
fn companion_name(name: &str) -> String {
    format!(".{name}.swap")
}

/// Writes `bytes` into `path` (created with `mode` when missing) from its start, and cuts it
/// to their length only when it was longer. An existing file is overwritten in place, not
/// emptied first: `O_TRUNC` freed the data block that the write then allocated again, every
/// second per companion, which was the largest single cost in the agent's profile with 100 idle
/// VMs (`notify_change` and ext4's block bookkeeping, 14 % of its samples).
fn create_with(path: &Path, bytes: &[u8], mode: u32) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(mode)
        .open(path)?;
    fill(f, bytes)
}

/// Writes `bytes` into `f` from its start and cuts it to their length when it was longer (see
/// [`create_with`]).
fn fill(mut f: File, bytes: &[u8]) -> io::Result<File> {
    f.write_all(bytes)?;
    let len = bytes.len() as u64;
    if f.metadata()?.len() != len {
        f.set_len(len)?;
    }
    Ok(f)
}

/// Writes `bytes` into `path`'s companion (see [`create_with`]). Nothing reads a companion
/// while it is written (see [`write_swapping`]).
fn fill_companion(path: &Path, bytes: &[u8], mode: u32) -> io::Result<(File, PathBuf)> {
    let c = companion(path)?;
    Ok((create_with(&c, bytes, mode)?, c))
}

/// Puts the companion's content at `path`: the names exchanged, or the companion renamed over
/// `path` when `path` does not exist yet or the file system cannot exchange names.
fn swap_in(companion: &Path, path: &Path) -> io::Result<()> {
    use nix::fcntl::{renameat2, RenameFlags};
    match renameat2(None, companion, None, path, RenameFlags::RENAME_EXCHANGE) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::EINVAL) => fs::rename(companion, path),
        Err(e) => Err(e.into()),
    }
}

fn write_replacing(path: &Path, bytes: &[u8], mode: u32, durable: bool) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = temporary(path)?;
    let result = (|| {
        let f = create_with(&tmp, bytes, mode)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if durable {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Replaces each `(path, bytes)` durably, all at the cost of a few fsyncs, creating no file
/// once each has its companion (see [`write_swapping`]): every companion is written and its
/// write-back started first, then each is fsynced (`fdatasync`: its data and what reading it
/// back needs, such as its length, not its times), then each is exchanged with its file, then
/// the directory `dir` (which must hold every path) is fsynced once. A file is never torn: its
/// new content is durable before the exchange, and a companion is only rewritten after the
/// exchange that made it one is durable (the previous call's directory fsync). After a crash
/// each file holds its new content, or the one it had before this call. One result per file,
/// then the directory fsync's; when that fails every companion is removed, so the next call
/// writes fresh ones and never one that may still be a file's durable name.
/// At most [`BATCH_FDS`] files are open at once.
pub fn write_atomic_all(
    dir: &Path,
    files: &[(PathBuf, Vec<u8>)],
    mode: u32,
) -> (Vec<io::Result<()>>, io::Result<()>) {
    let mut results = Vec::with_capacity(files.len());
    for chunk in files.chunks(BATCH_FDS) {
        let written: Vec<io::Result<(File, PathBuf)>> = chunk
            .iter()
            .map(|(path, bytes)| start_writing(path, bytes, mode))
            .collect();
        // All fsyncs before any exchange: an exchange dirties the directory again.
        let synced: Vec<io::Result<PathBuf>> = written
            .into_iter()
            .map(|w| w.and_then(|(f, c)| f.sync_data().map(|()| c)))
            .collect();
        for ((path, _), c) in chunk.iter().zip(synced) {
            results.push(c.and_then(|c| swap_in(&c, path)));
        }
    }
    let dir_synced = if results.iter().any(Result::is_ok) {
        File::open(dir).and_then(|d| d.sync_all())
    } else {
        Ok(())
    };
    if dir_synced.is_err() {
        for (path, _) in files {
            remove_companion(path);
        }
    }
    (results, dir_synced)
}

/// Writes `path`'s companion and starts its write-back.
fn start_writing(path: &Path, bytes: &[u8], mode: u32) -> io::Result<(File, PathBuf)> {
    let (f, c) = fill_companion(path, bytes, mode)?;
    // SAFETY: sync_file_range only starts the write-back of an open descriptor's pages.
    unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    Ok((f, c))
}

/// At most this many files are open at once in [`write_atomic_all`].
pub const BATCH_FDS: usize = 128;

/// The temporary file beside `path` that replaces it.
fn temporary(path: &Path) -> io::Result<PathBuf> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("no file name"))?;
    Ok(dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_swapped_in_through_its_dir_holds_exactly_the_new_content_until_the_dir_goes() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("vm");
        fs::create_dir(&run).unwrap();
        let d = File::open(&run).unwrap();
        use std::os::fd::AsFd;
        for text in ["12.345\n", "7\n", "1234.567891\n", "", "0.5\n"] {
            write_swapping_at(d.as_fd(), "balance", text.as_bytes()).unwrap();
            assert_eq!(fs::read_to_string(run.join("balance")).unwrap(), text);
        }
        // The previous content waits in the companion, as with a path.
        assert_eq!(fs::read_to_string(run.join(".balance.swap")).unwrap(), "");
        fs::remove_dir_all(&run).unwrap();
        let gone = write_swapping_at(d.as_fd(), "balance", b"1\n").unwrap_err();
        assert_eq!(gone.kind(), io::ErrorKind::NotFound);
        // A new dir of the same name is not written through the old descriptor.
        fs::create_dir(&run).unwrap();
        assert!(write_swapping_at(d.as_fd(), "balance", b"1\n").is_err());
        assert!(!run.join("balance").exists());
    }

    #[test]
    fn a_kept_pair_shows_exactly_each_new_content_and_fails_once_its_files_are_not_its_own() {
        use std::os::fd::AsFd;
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("vm");
        fs::create_dir(&run).unwrap();
        let d = File::open(&run).unwrap();
        let read = || fs::read_to_string(run.join("balance")).unwrap();
        // Only a file written twice has a companion to keep.
        write_swapping_at(d.as_fd(), "balance", b"1\n").unwrap();
        assert!(SwapPair::open(d.as_fd(), "balance").is_none());
        write_swapping_at(d.as_fd(), "balance", b"2.5\n").unwrap();
        let mut pair = SwapPair::open(d.as_fd(), "balance").unwrap();
        for text in ["12.345\n", "7\n", "1234.567891\n", "", "0.5\n", "0.25\n"] {
            pair.write(d.as_fd(), "balance", text.as_bytes()).unwrap();
            assert_eq!(read(), text);
        }
        assert_eq!(
            fs::read_to_string(run.join(".balance.swap")).unwrap(),
            "0.5\n"
        );
        // Someone writes the companion in place, longer: the next content is still exact.
        fs::write(
            run.join(".balance.swap"),
            "a much longer text than before\n",
        )
        .unwrap();
        pair.write(d.as_fd(), "balance", b"3\n").unwrap();
        assert_eq!(read(), "3\n");
        // Someone renames another file over the shown one: that write still shows the new
        // content, the next one fails (the kept file has no name) and leaves the file shown.
        fs::write(run.join("other"), "9\n").unwrap();
        fs::rename(run.join("other"), run.join("balance")).unwrap();
        pair.write(d.as_fd(), "balance", b"4\n").unwrap();
        assert_eq!(read(), "4\n");
        let replaced = pair.write(d.as_fd(), "balance", b"5\n").unwrap_err();
        assert_eq!(replaced.kind(), io::ErrorKind::NotFound);
        assert_eq!(read(), "4\n");
        // A new pair after a write by name works again.
        write_swapping_at(d.as_fd(), "balance", b"6\n").unwrap();
        let mut pair = SwapPair::open(d.as_fd(), "balance").unwrap();
        pair.write(d.as_fd(), "balance", b"7\n").unwrap();
        assert_eq!(read(), "7\n");
        // The companion removed, or the whole dir: the write fails, nothing is shown wrong.
        fs::remove_file(run.join(".balance.swap")).unwrap();
        assert!(pair.write(d.as_fd(), "balance", b"8\n").is_err());
        assert_eq!(read(), "7\n");
        write_swapping_at(d.as_fd(), "balance", b"9\n").unwrap();
        write_swapping_at(d.as_fd(), "balance", b"10\n").unwrap();
        let mut pair = SwapPair::open(d.as_fd(), "balance").unwrap();
        fs::remove_dir_all(&run).unwrap();
        let gone = pair.write(d.as_fd(), "balance", b"11\n").unwrap_err();
        assert_eq!(gone.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_companion_overwritten_in_place_holds_exactly_the_new_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("balance");
        for text in ["12.345\n", "7\n", "1234.567891\n", "", "0.5\n"] {
            write_swapping(&p, text.as_bytes()).unwrap();
            assert_eq!(fs::read_to_string(&p).unwrap(), text);
        }
        let mut files = vec![(p.clone(), b"a longer ledger".to_vec())];
        write_atomic_all(dir.path(), &files, 0o644).1.unwrap();
        files[0].1 = b"short".to_vec();
        write_atomic_all(dir.path(), &files, 0o644).1.unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"short");
    }

    #[test]
    fn atomic_write_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", 0o644).unwrap();
        write_atomic(&p, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left behind"
        );
    }

    #[test]
    fn a_batch_replaces_every_file_and_a_failing_one_alone_fails() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_atomic(&d.join("a"), b"old", 0o644).unwrap();
        // More files than are open at once, and one that cannot be written (no such directory).
        let mut files: Vec<(PathBuf, Vec<u8>)> = (0..BATCH_FDS + 3)
            .map(|i| (d.join(format!("f{i}")), format!("new {i}").into_bytes()))
            .collect();
        files.push((d.join("a"), b"new".to_vec()));
        files.push((d.join("missing/b"), b"never".to_vec()));
        let (results, dir_synced) = write_atomic_all(d, &files, 0o600);
        dir_synced.unwrap();
        assert_eq!(results.len(), files.len());
        let failed: Vec<usize> = (0..results.len())
            .filter(|&i| results[i].is_err())
            .collect();
        assert_eq!(failed, [files.len() - 1], "only the unwritable one fails");
        for (path, bytes) in &files[..files.len() - 1] {
            assert_eq!(&fs::read(path).unwrap(), bytes, "{}", path.display());
        }
        assert_eq!(
            fs::read(d.join(".a.swap")).unwrap(),
            b"old",
            "the companion"
        );
        let temporaries: Vec<_> = fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.') && !n.ends_with(".swap"))
            .collect();
        assert!(temporaries.is_empty(), "left: {temporaries:?}");
    }

    #[test]
    fn a_swapping_write_creates_no_file_once_the_companion_exists() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("balance");
        let inode = |p: &Path| fs::metadata(p).unwrap().ino();
        write_swapping(&p, b"1\n").unwrap();
        write_swapping(&p, b"2\n").unwrap();
        let c = dir.path().join(".balance.swap");
        let (file, comp) = (inode(&p), inode(&c));
        for round in 3..8 {
            write_swapping(&p, format!("{round}\n").as_bytes()).unwrap();
            assert_eq!(fs::read_to_string(&p).unwrap(), format!("{round}\n"));
            assert_eq!(
                fs::read_to_string(&c).unwrap(),
                format!("{}\n", round - 1),
                "the companion holds the previous content"
            );
            let now = (inode(&p), inode(&c));
            assert!(
                now == (file, comp) || now == (comp, file),
                "two inodes, swapped"
            );
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
