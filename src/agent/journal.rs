//! Local journal of the commands that the agent started and finished.
//!
//! A command that RabbitMQ redelivers after the agent finished it is not run
//! again, because the agent re-sends the final report stored here. A command
//! that was started but never finished shows that the agent stopped mid-run.
//!
//! The file contains one JSON object per line, appended as events happen:
//!
//! ```text
//! {"state":"started","id":"0190c2a4-…"}
//! {"state":"finished","id":"0190c2a4-…","report":"{…}"}
//! {"state":"reported","id":"0190c2a4-…"}
//! ```

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::warn;
use uuid::Uuid;

/// Default maximum number of finished commands that the journal keeps.
pub const MAX_FINISHED_ENTRIES: usize = 10_000;

/// Default maximum total size of the stored reports, in bytes. This bounds
/// memory when reports carry large responses.
pub const MAX_REPORT_BYTES: usize = 64 * 1024 * 1024;

/// Bounds on the finished commands that a journal keeps.
///
/// When either bound is exceeded, the journal drops the oldest finished
/// commands, so such a command would run again if it were redelivered. The
/// newest finished command is always kept, even if its report alone exceeds
/// `max_report_bytes`. Started commands are kept until they finish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalLimits {
    pub max_finished_entries: usize,
    pub max_report_bytes: usize,
}

impl Default for JournalLimits {
    fn default() -> Self {
        Self {
            max_finished_entries: MAX_FINISHED_ENTRIES,
            max_report_bytes: MAX_REPORT_BYTES,
        }
    }
}

/// State of one command in the journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JournalEntry {
    Started,
    /// `report` is the final status report as JSON text, which the journal does not parse.
    Finished {
        report: String,
    },
}

/// The agent's journal file and its contents in memory.
///
/// All methods do synchronous file I/O, and the `record_*` methods wait for
/// `fsync`, which usually takes milliseconds but has no upper bound on a slow
/// or failing disk. Callers on a tokio runtime should therefore call them
/// inside `tokio::task::spawn_blocking`, for example with the journal in an
/// `Arc<std::sync::Mutex<Journal>>`.
///
/// Only one process may use a journal at a time. `open` waits up to 1 second
/// for an exclusive lock on a `.lock` file next to the journal, and the
/// journal holds that lock until it is dropped.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Length of the file up to the end of its last complete line.
    file_len: u64,
    line_count: usize,
    /// Size of the file after the last compaction, or 0 before the first one.
    compacted_len: u64,
    compacted_line_count: usize,
    limits: JournalLimits,
    /// Total length of the reports in `entries`.
    report_bytes: usize,
    /// Order of events. A larger value means a later event.
    next_sequence: u64,
    entries: HashMap<Uuid, Slot>,
    /// Finished commands by the sequence of their `finished` event, oldest first.
    finished_order: BTreeMap<u64, Uuid>,
    _lock: LockFile,
}

#[derive(Debug)]
struct Slot {
    entry: JournalEntry,
    /// Sequence of the event that set `entry`.
    sequence: u64,
    /// The broker confirmed the final report, so it need not be sent again.
    reported: bool,
}

/// One line of the journal file.
#[derive(Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Line<'a> {
    Started {
        id: Uuid,
    },
    Finished {
        id: Uuid,
        #[serde(borrow)]
        report: Cow<'a, str>,
    },
    Reported {
        id: Uuid,
    },
}

impl Journal {
    /// Opens the journal at `path`, creating it and its parent directories if needed.
    ///
    /// A last line without a newline is the remains of a write that a crash
    /// cut short, so it is dropped. Other lines that are not valid are
    /// skipped with a warning, so a damaged journal at worst lets a
    /// finished command run again. In both cases the file is rewritten
    /// without the dropped lines.
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::open_with_limits(path, JournalLimits::default())
    }

    /// Opens the journal like `open`, with other bounds on what it keeps.
    pub fn open_with_limits(path: &Path, limits: JournalLimits) -> io::Result<Self> {
        if limits.max_finished_entries == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "journal limit max_finished_entries is 0; it must be at least 1",
            ));
        }
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent)
                .map_err(|error| annotate(error, "create the journal directory", parent))?;
        }
        let lock = LockFile::acquire(path)?;

        let contents = match std::fs::read(path) {
            Ok(contents) => contents,
            Err(error) if error.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(error) => return Err(annotate(error, "read the journal", path)),
        };

        let file = open_for_append(path)?;
        let mut journal = Self {
            path: path.to_owned(),
            file,
            file_len: 0,
            line_count: 0,
            compacted_len: 0,
            compacted_line_count: 0,
            limits,
            report_bytes: 0,
            next_sequence: 0,
            entries: HashMap::new(),
            finished_order: BTreeMap::new(),
            _lock: lock,
        };
        let needs_rewrite = journal.load(&contents);
        sync_parent_dir(path)?;

        if needs_rewrite || journal.needs_compaction() {
            journal.compact()?;
        }
        Ok(journal)
    }

    /// Applies the lines in `contents` and returns whether any were dropped.
    fn load(&mut self, contents: &[u8]) -> bool {
        let mut dropped_lines = 0;
        let mut rest = contents;

        while !rest.is_empty() {
            let Some(end) = rest.iter().position(|&byte| byte == b'\n') else {
                warn!(
                    path = %self.path.display(), bytes = rest.len(),
                    "dropping an incomplete last line from the journal, left by an interrupted write"
                );
                dropped_lines += 1;
                break;
            };
            let line = &rest[..end];
            rest = &rest[end + 1..];
            self.line_count += 1;
            self.file_len += end as u64 + 1;

            match serde_json::from_slice::<Line>(line) {
                Ok(line) => self.apply(&line),
                Err(error) => {
                    warn!(
                        path = %self.path.display(), line = self.line_count, %error,
                        "skipping an invalid journal line"
                    );
                    dropped_lines += 1;
                }
            }
        }
        dropped_lines > 0
    }

    /// Returns the state of command `id`, or `None` if the journal has no record of it.
    pub fn get(&self, id: &Uuid) -> Option<&JournalEntry> {
        self.entries.get(id).map(|slot| &slot.entry)
    }

    /// Records that command `id` started, durably (with `fsync`) before returning.
    ///
    /// This replaces a finished entry for the same id, because the command runs again.
    pub fn record_started(&mut self, id: Uuid) -> io::Result<()> {
        self.append(&Line::Started { id })
    }

    /// Records the final report of command `id`, durably (with `fsync`) before returning.
    pub fn record_finished(&mut self, id: Uuid, report: &str) -> io::Result<()> {
        self.append(&Line::Finished {
            id,
            report: Cow::Borrowed(report),
        })
    }

    /// Records that the broker confirmed the final report of command `id`,
    /// durably before returning. Unknown or unfinished ids are ignored.
    pub fn record_reported(&mut self, id: Uuid) -> io::Result<()> {
        match self.entries.get(&id) {
            Some(Slot {
                entry: JournalEntry::Finished { .. },
                reported: false,
                ..
            }) => self.append(&Line::Reported { id }),
            _ => Ok(()),
        }
    }

    /// Returns the finished commands whose final report the broker has not
    /// confirmed, with the report, oldest finish first. The agent sends these
    /// again at start, which makes the journal its outbox for reports.
    pub fn unreported(&self) -> Vec<(Uuid, String)> {
        let mut pending: Vec<(u64, Uuid, String)> = self
            .entries
            .iter()
            .filter_map(|(id, slot)| match &slot.entry {
                JournalEntry::Finished { report } if !slot.reported => {
                    Some((slot.sequence, *id, report.clone()))
                }
                _ => None,
            })
            .collect();
        pending.sort_unstable_by_key(|(sequence, _, _)| *sequence);
        pending
            .into_iter()
            .map(|(_, id, report)| (id, report))
            .collect()
    }

    /// Returns the commands that were started but not finished, oldest start first.
    pub fn unfinished(&self) -> Vec<Uuid> {
        let mut started: Vec<(u64, Uuid)> = self
            .entries
            .iter()
            .filter(|(_, slot)| slot.entry == JournalEntry::Started)
            .map(|(id, slot)| (slot.sequence, *id))
            .collect();
        started.sort_unstable();
        started.into_iter().map(|(_, id)| id).collect()
    }

    /// Writes `line` to the file and syncs it, then applies it in memory,
    /// so that memory never shows an event that a crash could lose.
    fn append(&mut self, line: &Line) -> io::Result<()> {
        let mut bytes = serde_json::to_vec(line).map_err(io::Error::other)?;
        bytes.push(b'\n');

        let written = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data());
        if let Err(error) = written {
            // Cut off a partial line, so that the next append starts on a
            // line of its own. If that fails too, `open` drops the partial
            // line later.
            if let Err(truncate_error) = self.file.set_len(self.file_len) {
                warn!(
                    path = %self.path.display(), error = %truncate_error,
                    "failed to remove a partly written journal line"
                );
            }
            return Err(annotate(error, "write to the journal", &self.path));
        }
        self.file_len += bytes.len() as u64;
        self.line_count += 1;

        self.apply(line);
        if self.needs_compaction() {
            self.compact()?;
        }
        Ok(())
    }

    fn apply(&mut self, line: &Line) {
        if let Line::Reported { id } = line {
            if let Some(slot) = self.entries.get_mut(id) {
                slot.reported = true;
            }
            return;
        }
        let sequence = self.next_sequence;
        self.next_sequence += 1;

        let (id, entry) = match line {
            Line::Started { id } => (*id, JournalEntry::Started),
            Line::Finished { id, report } => (
                *id,
                JournalEntry::Finished {
                    report: report.to_string(),
                },
            ),
            Line::Reported { .. } => unreachable!("handled above"),
        };
        let is_finished = matches!(entry, JournalEntry::Finished { .. });

        self.report_bytes += report_len(&entry);

        let previous = self.entries.insert(
            id,
            Slot {
                entry,
                sequence,
                reported: false,
            },
        );
        if let Some(previous) = previous {
            self.finished_order.remove(&previous.sequence);
            self.report_bytes -= report_len(&previous.entry);
        }
        if is_finished {
            self.finished_order.insert(sequence, id);
        }

        self.evict_oldest_finished();
    }

    fn evict_oldest_finished(&mut self) {
        loop {
            let over_count = self.finished_order.len() > self.limits.max_finished_entries;
            let over_bytes = self.report_bytes > self.limits.max_report_bytes;
            if !(over_count || over_bytes) || self.finished_order.len() <= 1 {
                return;
            }
            let Some((_, oldest)) = self.finished_order.pop_first() else {
                return;
            };
            if let Some(slot) = self.entries.remove(&oldest) {
                self.report_bytes -= report_len(&slot.entry);
            }
        }
    }

    /// Reports whether the file has grown to twice its size after the last
    /// compaction, and past twice the limits. Compacting only then keeps
    /// the cost of rewriting to a constant factor per appended byte.
    fn needs_compaction(&self) -> bool {
        let max_lines = 2 * self
            .limits
            .max_finished_entries
            .max(self.compacted_line_count);
        let max_len = 2 * (self.limits.max_report_bytes as u64).max(self.compacted_len);
        self.line_count > max_lines || self.file_len > max_len
    }

    /// Rewrites the file with one line per entry, in event order.
    ///
    /// The new contents go to a temporary file, which is synced and then
    /// renamed over the journal, so a crash leaves either the old or the new file.
    fn compact(&mut self) -> io::Result<()> {
        let temp_path = temp_path_for(&self.path);
        let mut slots: Vec<(&Uuid, &Slot)> = self.entries.iter().collect();
        slots.sort_unstable_by_key(|(_, slot)| slot.sequence);

        let temp_file = File::create(&temp_path)
            .map_err(|error| annotate(error, "create the journal rewrite", &temp_path))?;
        let mut writer = BufWriter::new(temp_file);
        let mut file_len = 0;
        let mut line_count = 0;
        for (id, slot) in &slots {
            let mut lines = vec![match &slot.entry {
                JournalEntry::Started => Line::Started { id: **id },
                JournalEntry::Finished { report } => Line::Finished {
                    id: **id,
                    report: Cow::Borrowed(report),
                },
            }];
            if slot.reported {
                lines.push(Line::Reported { id: **id });
            }
            for line in lines {
                let mut bytes = serde_json::to_vec(&line).map_err(io::Error::other)?;
                bytes.push(b'\n');
                writer
                    .write_all(&bytes)
                    .map_err(|error| annotate(error, "write the journal rewrite", &temp_path))?;
                file_len += bytes.len() as u64;
                line_count += 1;
            }
        }
        let temp_file = writer.into_inner().map_err(|error| {
            annotate(error.into_error(), "write the journal rewrite", &temp_path)
        })?;
        temp_file
            .sync_all()
            .map_err(|error| annotate(error, "sync the journal rewrite", &temp_path))?;
        drop(temp_file);

        std::fs::rename(&temp_path, &self.path)
            .map_err(|error| annotate(error, "replace the journal", &self.path))?;
        sync_parent_dir(&self.path)?;

        self.file = open_for_append(&self.path)?;
        self.file_len = file_len;
        self.line_count = line_count;
        self.compacted_len = file_len;
        self.compacted_line_count = line_count;
        Ok(())
    }
}

fn report_len(entry: &JournalEntry) -> usize {
    match entry {
        JournalEntry::Started => 0,
        JournalEntry::Finished { report } => report.len(),
    }
}

fn open_for_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|error| annotate(error, "open the journal", path))
}

fn temp_path_for(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Syncs the directory that contains `path`, so that a new file or a
/// rename in it survives a power loss.
fn sync_parent_dir(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(|error| annotate(error, "sync the journal directory", parent))?;
    }
    // NOTE: Other systems offer no portable way to sync a directory, so a
    // rename there may not survive a power loss.
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

fn annotate(error: io::Error, action: &str, path: &Path) -> io::Error {
    io::Error::new(
        error.kind(),
        format!("failed to {action} {}: {error}", path.display()),
    )
}

/// Maximum time that `open` waits for the journal's lock.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// Exclusive lock on `<journal>.lock`, released when dropped. A separate
/// file is locked because compaction replaces the journal file itself.
#[derive(Debug)]
struct LockFile {
    _file: File,
}

impl LockFile {
    fn acquire(journal_path: &Path) -> io::Result<Self> {
        let mut name = journal_path.file_name().unwrap_or_default().to_owned();
        name.push(".lock");
        let lock_path = journal_path.with_file_name(name);

        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|error| annotate(error, "open the journal lock file", &lock_path))?;
        // A child process that is forked while the lock is held shares the
        // lock until it calls exec, which closes the close-on-exec
        // descriptor. So a lock released a moment ago may still be busy
        // briefly, and a short wait avoids failing on that.
        let deadline = Instant::now() + LOCK_WAIT;
        let locked = loop {
            match lock_exclusive(&file) {
                Err(error)
                    if error.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                result => break result,
            }
        };
        locked.map_err(|error| {
            if error.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "journal {} is in use by another process, which has locked {}; \
                         stop it or give this agent its own journal path",
                        journal_path.display(),
                        lock_path.display()
                    ),
                )
            } else {
                annotate(error, "lock", &lock_path)
            }
        })?;
        Ok(Self { _file: file })
    }
}

#[cfg(unix)]
fn lock_exclusive(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;

    // SAFETY: flock takes a file descriptor and flags and has no memory-safety
    // preconditions. `file` keeps the descriptor open for the whole call.
    let result = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

// NOTE: Without flock, nothing stops two processes from using one journal.
#[cfg(not(unix))]
fn lock_exclusive(_file: &File) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal_path(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("state").join("journal.jsonl")
    }

    fn ids(count: usize) -> Vec<Uuid> {
        (0..count).map(|_| Uuid::new_v4()).collect()
    }

    fn finished(report: &str) -> JournalEntry {
        JournalEntry::Finished {
            report: report.to_owned(),
        }
    }

    fn limit_finished(max_finished_entries: usize) -> JournalLimits {
        JournalLimits {
            max_finished_entries,
            ..JournalLimits::default()
        }
    }

    fn line_count(path: &Path) -> usize {
        std::fs::read_to_string(path).unwrap().lines().count()
    }

    #[test]
    fn open_creates_parent_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(&dir);

        let journal = Journal::open(&path).unwrap();

        assert!(path.parent().unwrap().is_dir());
        assert!(journal.unfinished().is_empty());
    }

    #[test]
    fn reopen_preserves_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(&dir);
        let [running, done] = ids(2).try_into().unwrap();
        let report =
            r#"{"Status":"completed","Response":{"n":12345678901234567890123,"s":"héllo ✓\n"}}"#;
        {
            let mut journal = Journal::open(&path).unwrap();
            journal.record_started(running).unwrap();
            journal.record_started(done).unwrap();
            journal.record_finished(done, report).unwrap();
        }

        let journal = Journal::open(&path).unwrap();

        assert_eq!(journal.get(&running), Some(&JournalEntry::Started));
        assert_eq!(journal.get(&done), Some(&finished(report)));
        assert_eq!(journal.get(&Uuid::new_v4()), None);
    }

    #[test]
    fn torn_last_line_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(&dir);
        let [first, second] = ids(2).try_into().unwrap();
        {
            let mut journal = Journal::open(&path).unwrap();
            journal.record_started(first).unwrap();
            journal.record_finished(first, "{}").unwrap();
        }
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        write!(file, r#"{{"state":"finished","id":"{second}","rep"#).unwrap();
        drop(file);

        let mut journal = Journal::open(&path).unwrap();
        journal.record_started(second).unwrap();
        drop(journal);
        let journal = Journal::open(&path).unwrap();

        assert_eq!(journal.get(&first), Some(&finished("{}")));
        assert_eq!(journal.get(&second), Some(&JournalEntry::Started));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains("\"rep\n"),
            "torn line is still in the file:\n{text}"
        );
    }

    #[test]
    fn invalid_middle_line_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(&dir);
        let [before, after] = ids(2).try_into().unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let text = format!(
            "{{\"state\":\"started\",\"id\":\"{before}\"}}\nnot json\n\
             {{\"state\":\"finished\",\"id\":\"{after}\",\"report\":\"r\"}}\n"
        );
        std::fs::write(&path, text).unwrap();

        let journal = Journal::open(&path).unwrap();

        assert_eq!(journal.get(&before), Some(&JournalEntry::Started));
        assert_eq!(journal.get(&after), Some(&finished("r")));
        assert_eq!(line_count(&path), 2, "the invalid line was not removed");
    }

    #[test]
    fn unfinished_in_start_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(&dir);
        let [a, b, c, d] = ids(4).try_into().unwrap();
        let mut journal = Journal::open(&path).unwrap();

        journal.record_started(c).unwrap();
        journal.record_started(a).unwrap();
        journal.record_started(d).unwrap();
        journal.record_started(b).unwrap();
        journal.record_finished(d, "{}").unwrap();

        assert_eq!(journal.unfinished(), vec![c, a, b]);
        drop(journal);
        let journal = Journal::open(&path).unwrap();
        assert_eq!(journal.unfinished(), vec![c, a, b], "after reopening");
    }

    #[test]
    fn restart_makes_finished_unfinished() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(&dir);
        let id = Uuid::new_v4();
        let mut journal = Journal::open(&path).unwrap();

        journal.record_finished(id, "{}").unwrap();
        journal.record_started(id).unwrap();

        assert_eq!(journal.get(&id), Some(&JournalEntry::Started));
        assert_eq!(journal.unfinished(), vec![id]);
    }

    #[test]
    fn compaction_keeps_newest_finished() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(&dir);
        let max_finished = 5;
        let commands = ids(40);
        let unfinished = Uuid::new_v4();
        let mut journal = Journal::open_with_limits(&path, limit_finished(max_finished)).unwrap();
        journal.record_started(unfinished).unwrap();

        for (index, id) in commands.iter().enumerate() {
            journal.record_started(*id).unwrap();
            journal
                .record_finished(*id, &format!("report {index}"))
                .unwrap();
        }

        let (older, newest) = commands.split_at(commands.len() - max_finished);
        for id in older {
            assert_eq!(journal.get(id), None, "an old finished entry was kept");
        }
        for (offset, id) in newest.iter().enumerate() {
            let report = format!("report {}", older.len() + offset);
            assert_eq!(journal.get(id), Some(&finished(&report)));
        }
        assert_eq!(journal.get(&unfinished), Some(&JournalEntry::Started));
        // A compaction keeps the finished entries, the unfinished one and the
        // command in progress, and the file may grow to twice that.
        let lines = line_count(&path);
        assert!(
            lines <= 2 * (max_finished + 2),
            "journal file has {lines} lines"
        );
    }

    #[test]
    fn compaction_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(&dir);
        let max_finished = 3;
        let commands = ids(20);
        let unfinished = Uuid::new_v4();
        {
            let mut journal =
                Journal::open_with_limits(&path, limit_finished(max_finished)).unwrap();
            journal.record_started(unfinished).unwrap();
            for id in &commands {
                journal.record_started(*id).unwrap();
                journal.record_finished(*id, "{}").unwrap();
            }
        }

        let journal = Journal::open_with_limits(&path, limit_finished(max_finished)).unwrap();

        let kept: Vec<&Uuid> = commands
            .iter()
            .filter(|id| journal.get(id).is_some())
            .collect();
        let newest: Vec<&Uuid> = commands[commands.len() - max_finished..].iter().collect();
        assert_eq!(kept, newest);
        assert_eq!(journal.unfinished(), vec![unfinished]);
        assert!(
            !temp_path_for(&path).exists(),
            "the temporary file was left behind"
        );
    }

    #[test]
    fn open_shrinks_file_for_lower_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(&dir);
        {
            let mut journal = Journal::open_with_limits(&path, limit_finished(100)).unwrap();
            for id in ids(50) {
                journal.record_finished(id, "{}").unwrap();
            }
        }

        let journal = Journal::open_with_limits(&path, limit_finished(10)).unwrap();

        drop(journal);
        assert_eq!(line_count(&path), 10);
    }

    #[test]
    fn report_bytes_limit_evicts_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(&dir);
        let limits = JournalLimits {
            max_finished_entries: 100,
            max_report_bytes: 250,
        };
        let commands = ids(5);
        let mut journal = Journal::open_with_limits(&path, limits).unwrap();

        for id in &commands {
            journal.record_finished(*id, &"r".repeat(100)).unwrap();
        }

        let kept: Vec<&Uuid> = commands
            .iter()
            .filter(|id| journal.get(id).is_some())
            .collect();
        assert_eq!(kept, commands[3..].iter().collect::<Vec<_>>());
    }

    #[test]
    fn oversized_report_still_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(&dir);
        let limits = JournalLimits {
            max_finished_entries: 100,
            max_report_bytes: 10,
        };
        let [older, newest] = ids(2).try_into().unwrap();
        let mut journal = Journal::open_with_limits(&path, limits).unwrap();

        journal.record_finished(older, &"r".repeat(50)).unwrap();
        journal.record_finished(newest, &"r".repeat(50)).unwrap();

        assert_eq!(journal.get(&older), None);
        assert_eq!(journal.get(&newest), Some(&finished(&"r".repeat(50))));
    }

    #[test]
    fn second_open_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(&dir);
        let _journal = Journal::open(&path).unwrap();

        let error = Journal::open(&path).unwrap_err();

        assert_eq!(error.kind(), io::ErrorKind::WouldBlock);
        assert!(
            error.to_string().contains("in use by another process"),
            "{error}"
        );
    }

    #[test]
    fn open_after_drop_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(&dir);
        drop(Journal::open(&path).unwrap());

        let reopened = Journal::open(&path);

        assert!(reopened.is_ok(), "{:?}", reopened.unwrap_err());
    }

    #[test]
    fn zero_limit_rejected() {
        let dir = tempfile::tempdir().unwrap();

        let error = Journal::open_with_limits(&journal_path(&dir), limit_finished(0)).unwrap_err();

        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn reported_marker_survives_reopen_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let limits = JournalLimits {
            max_finished_entries: 2,
            ..JournalLimits::default()
        };
        let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
        {
            let mut journal = Journal::open_with_limits(&path, limits).unwrap();
            journal.record_finished(first, "a").unwrap();
            journal.record_reported(first).unwrap();
            journal.record_finished(second, "b").unwrap();
            assert_eq!(journal.unreported(), vec![(second, "b".to_owned())]);
            for _ in 0..10 {
                journal.record_reported(first).unwrap();
                journal.record_finished(second, "b").unwrap();
            }
        }
        let journal = Journal::open_with_limits(&path, limits).unwrap();
        assert_eq!(journal.unreported(), vec![(second, "b".to_owned())]);
    }

    #[test]
    fn reported_ignores_unfinished_commands() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(&dir.path().join("journal.jsonl")).unwrap();
        let id = Uuid::new_v4();
        journal.record_started(id).unwrap();
        journal.record_reported(id).unwrap();
        assert_eq!(journal.unfinished(), vec![id]);
        assert!(journal.unreported().is_empty());
    }
}
