//! Container logs in the CRI format (`TIMESTAMP STREAM P|F CONTENT`, one line each),
//! rotated by size: `container.log`, `container.log.1`, … up to `max_files` files.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest line content before it is split into partial (`P`) records.
const MAX_LINE: usize = 16 * 1024;

/// RFC 3339 UTC with nanoseconds, e.g. `2026-11-28T12:00:00.123456789Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil from days (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Parse the timestamps `rfc3339` writes, to Unix nanoseconds.
pub fn parse_rfc3339(s: &str) -> Option<i128> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[10] != b'T' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    let frac = s.get(20..s.len() - 1).unwrap_or("0");
    let nanos: i64 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60 + ss) as i128 * 1_000_000_000 + nanos as i128)
}

/// Appends CRI log records and rotates by size.
pub struct LogWriter {
    path: PathBuf,
    file: File,
    size: u64,
    max_size: u64,
    max_files: u32,
    /// Unfinished line per stream (stdout, stderr).
    pending: [Vec<u8>; 2],
}

impl LogWriter {
    pub fn open(path: &Path, max_size: u64, max_files: u32) -> std::io::Result<LogWriter> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(LogWriter {
            path: path.to_path_buf(),
            file,
            size,
            max_size,
            max_files: max_files.max(1),
            pending: [vec![], vec![]],
        })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if self.max_files <= 1 {
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        let name = |i: u32| PathBuf::from(format!("{}.{i}", self.path.display()));
        let _ = std::fs::remove_file(name(self.max_files - 1));
        for i in (1..self.max_files - 1).rev() {
            let _ = std::fs::rename(name(i), name(i + 1));
        }
        std::fs::rename(&self.path, name(1))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }

    fn record(&mut self, stream: usize, content: &[u8], full: bool) -> std::io::Result<()> {
        let mut line = format!(
            "{} {} {} ",
            rfc3339(SystemTime::now()),
            if stream == 0 { "stdout" } else { "stderr" },
            if full { 'F' } else { 'P' }
        )
        .into_bytes();
        line.extend_from_slice(content);
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.max_size {
            self.rotate()?;
        }
        self.file.write_all(&line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    /// Feed bytes read from stream 0 (stdout) or 1 (stderr).
    pub fn write(&mut self, stream: usize, data: &[u8]) -> std::io::Result<()> {
        let mut buf = std::mem::take(&mut self.pending[stream]);
        buf.extend_from_slice(data);
        let mut start = 0;
        while let Some(nl) = buf[start..].iter().position(|b| *b == b'\n') {
            let end = start + nl;
            let mut s = start;
            while end - s > MAX_LINE {
                self.record(stream, &buf[s..s + MAX_LINE], false)?;
                s += MAX_LINE;
            }
            self.record(stream, &buf[s..end], true)?;
            start = end + 1;
        }
        let mut rest = buf.split_off(start);
        while rest.len() > MAX_LINE {
            let tail = rest.split_off(MAX_LINE);
            self.record(stream, &rest, false)?;
            rest = tail;
        }
        self.pending[stream] = rest;
        Ok(())
    }

    /// Write out unfinished lines (at exit).
    pub fn flush_pending(&mut self) -> std::io::Result<()> {
        for s in 0..2 {
            let p = std::mem::take(&mut self.pending[s]);
            if !p.is_empty() {
                self.record(s, &p, true)?;
            }
        }
        self.file.flush()
    }
}

/// One parsed record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub time: String,
    pub stream: String,
    pub full: bool,
    pub content: String,
}

pub fn parse_line(l: &str) -> Option<Record> {
    let mut it = l.splitn(4, ' ');
    let time = it.next()?.to_string();
    let stream = it.next()?.to_string();
    let tag = it.next()?;
    let content = it.next().unwrap_or("").to_string();
    Some(Record {
        time,
        stream,
        full: tag == "F",
        content,
    })
}

/// The log files of a container, oldest first.
pub fn files(log: &Path, max_files: u32) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = (1..max_files.max(1))
        .rev()
        .map(|i| PathBuf::from(format!("{}.{i}", log.display())))
        .filter(|p| p.exists())
        .collect();
    if log.exists() {
        v.push(log.to_path_buf());
    }
    v
}

/// Read all records, oldest first.
pub fn read_all(log: &Path, max_files: u32) -> std::io::Result<Vec<Record>> {
    let mut out = vec![];
    for f in files(log, max_files) {
        read_records(File::open(&f)?, &mut out)?;
    }
    Ok(out)
}

/// Append the records of one log file to `out`.
fn read_records(file: File, out: &mut Vec<Record>) -> std::io::Result<()> {
    for line in BufReader::new(file).lines() {
        if let Some(rec) = parse_line(&line?) {
            out.push(rec);
        }
    }
    Ok(())
}

/// Follows a container's log as it grows, across rotations. It holds the current file open
/// from before the older files are read, so that nothing written meanwhile is lost or read
/// twice.
pub struct Follower {
    log: PathBuf,
    max_files: u32,
    /// The file being read (the current log when opened; `.1` after a rotation) and its inode.
    file: Option<(BufReader<File>, u64)>,
    /// Bytes of a line not yet complete.
    partial: Vec<u8>,
}

impl Follower {
    pub fn open(log: &Path, max_files: u32) -> std::io::Result<Follower> {
        let mut f = Follower {
            log: log.to_path_buf(),
            max_files,
            file: None,
            partial: vec![],
        };
        f.reopen()?;
        Ok(f)
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        let log = self.log.clone();
        self.open_file(&log)
    }

    fn open_file(&mut self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        self.file = match File::open(path) {
            Ok(f) => {
                let ino = f.metadata()?.ino();
                Some((BufReader::new(f), ino))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        self.partial.clear();
        Ok(())
    }

    /// Records of the rotated files (oldest first) other than the one this follower reads.
    pub fn older(&self) -> std::io::Result<Vec<Record>> {
        use std::os::unix::fs::MetadataExt;
        let mine = self.file.as_ref().map(|(_, ino)| *ino);
        let mut out = vec![];
        for f in files(&self.log, self.max_files) {
            if f == self.log {
                continue;
            }
            let file = match File::open(&f) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if Some(file.metadata()?.ino()) == mine {
                continue;
            }
            read_records(file, &mut out)?;
        }
        Ok(out)
    }

    /// The complete records written since the last call (all of the file at the first).
    pub fn poll(&mut self) -> std::io::Result<Vec<Record>> {
        use std::os::unix::fs::MetadataExt;
        let mut out = vec![];
        loop {
            let Some((reader, ino)) = self.file.as_mut() else {
                if self.log.exists() {
                    self.reopen()?;
                    continue;
                }
                return Ok(out);
            };
            let n = reader.read_until(b'\n', &mut self.partial)?;
            if n > 0 && self.partial.ends_with(b"\n") {
                let line = String::from_utf8_lossy(&self.partial[..self.partial.len() - 1]);
                if let Some(r) = parse_line(&line) {
                    out.push(r);
                }
                self.partial.clear();
                continue;
            }
            // at the end of what is written: has the log moved on to a new file?
            let (ino, pos) = (*ino, reader.stream_position()?);
            match std::fs::metadata(&self.log) {
                Ok(m) if m.ino() != ino => {
                    let next = self.next_after(ino);
                    self.open_file(&next)?;
                }
                // truncated in place (a single log file)
                Ok(m) if m.len() < pos => self.reopen()?,
                _ => return Ok(out),
            }
        }
    }

    /// The file written after the one with inode `ino`, which has been rotated: if it is now
    /// `.k`, then `.k-1` (or the current log after `.1`). If it is gone (the reader fell more
    /// than `max_files` files behind), the oldest there is.
    fn next_after(&self, ino: u64) -> PathBuf {
        use std::os::unix::fs::MetadataExt;
        let name = |k: u32| PathBuf::from(format!("{}.{k}", self.log.display()));
        for k in 1..self.max_files.max(1) {
            if std::fs::metadata(name(k)).is_ok_and(|m| m.ino() == ino) {
                return if k == 1 {
                    self.log.clone()
                } else {
                    name(k - 1)
                };
            }
        }
        files(&self.log, self.max_files)
            .into_iter()
            .next()
            .unwrap_or_else(|| self.log.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_roundtrip() {
        let t = UNIX_EPOCH + std::time::Duration::new(1_795_000_000, 123_456_789);
        let s = rfc3339(t);
        assert_eq!(parse_rfc3339(&s), Some(1_795_000_000_123_456_789));
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
    }

    #[test]
    fn a_follower_loses_nothing_across_rotations_and_partial_writes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.log");
        // 300-byte files, 3 of them: rotates every few lines
        let mut w = LogWriter::open(&p, 300, 3).unwrap();
        for i in 0..4 {
            w.write(0, format!("early {i}\n").as_bytes()).unwrap();
        }
        let mut f = Follower::open(&p, 3).unwrap();
        // written after the follower opened, before it first reads
        w.write(0, b"between\n").unwrap();
        let mut got: Vec<String> = f.older().unwrap().into_iter().map(|r| r.content).collect();
        let contents = |v: Vec<Record>| v.into_iter().map(|r| r.content).collect::<Vec<_>>();
        got.extend(contents(f.poll().unwrap()));
        for i in 0..30 {
            w.write(0, format!("late {i}\n").as_bytes()).unwrap();
            if i % 7 == 0 {
                got.extend(contents(f.poll().unwrap()));
            }
        }
        got.extend(contents(f.poll().unwrap()));
        // a line the writer has only half written is not returned until it is whole
        let line = format!("{} stdout F half", rfc3339(SystemTime::now()));
        let mut raw = OpenOptions::new().append(true).open(&p).unwrap();
        raw.write_all(line.as_bytes()).unwrap();
        assert!(f.poll().unwrap().is_empty());
        raw.write_all(b" and whole\n").unwrap();
        got.extend(contents(f.poll().unwrap()));
        let mut want: Vec<String> = (0..4).map(|i| format!("early {i}")).collect();
        want.push("between".into());
        want.extend((0..30).map(|i| format!("late {i}")));
        want.push("half and whole".into());
        // the earliest lines went out with the oldest rotated file; the rest is complete
        let first = got.first().cloned().unwrap_or_default();
        let skip = want.iter().position(|w| *w == first).unwrap();
        assert_eq!(got, want[skip..], "lines lost or read twice");
        assert!(got.len() > 20, "{got:?}");
    }

    #[test]
    fn lines_partials_and_rotation() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.log");
        let mut w = LogWriter::open(&p, 200, 3).unwrap();
        w.write(0, b"hello\nwor").unwrap();
        w.write(1, b"err\n").unwrap();
        w.write(0, b"ld\n").unwrap();
        let recs = read_all(&p, 3).unwrap();
        let got: Vec<(&str, &str)> = recs
            .iter()
            .map(|r| (r.stream.as_str(), r.content.as_str()))
            .collect();
        assert_eq!(
            got,
            [("stdout", "hello"), ("stderr", "err"), ("stdout", "world")]
        );
        for i in 0..20 {
            w.write(0, format!("line {i}\n").as_bytes()).unwrap();
        }
        w.flush_pending().unwrap();
        assert!(files(&p, 3).len() == 3, "rotated into 3 files");
        assert!(!PathBuf::from(format!("{}.3", p.display())).exists());
        let recs = read_all(&p, 3).unwrap();
        assert_eq!(recs.last().unwrap().content, "line 19");
        assert!(std::fs::metadata(&p).unwrap().len() <= 200);
    }
}
