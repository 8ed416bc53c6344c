//! A reader in front of a tar stream that refuses what the `tar` crate would read whole into
//! memory: GNU long-name and long-link entries (`L`, `K`) and PAX records (`x`, `g`) larger
//! than [`MAX_EXTENSION`] (a 1 MB gzip of one 1 GiB long name drove an import to 3 GB of
//! memory). It follows the stream header by header (sizes from the header, in octal or GNU
//! base-256, or from a PAX `size` record) and passes every byte through unchanged; from the
//! first all-zero block on (where the `tar` crate, not ignoring zeros, stops) it only passes
//! bytes through.

#![forbid(unsafe_code)]

use std::io::{self, Read};

/// The largest extension entry (a long name, a set of PAX records) let through.
pub const MAX_EXTENSION: u64 = 1 << 20;

const BLOCK: usize = 512;

enum State {
    /// At a header: reading it into `hdr`.
    Header,
    /// Handing out the header read (up to `hdr_len`), then the entry's data.
    HeaderOut { pos: usize, data: u64, pax: bool },
    /// Passing through `left` bytes of an entry's data (padded to a block); a PAX entry's
    /// data is also kept, to read its `size` record.
    Data { left: u64, pax: bool },
    /// After the end-of-archive marker (or a stream that ended): everything passes.
    Done,
}

pub struct TarGuard<R> {
    inner: R,
    state: State,
    hdr: [u8; BLOCK],
    hdr_len: usize,
    zero_blocks: u8,
    /// The PAX records of the entry being passed (bounded by [`MAX_EXTENSION`]).
    pax: Vec<u8>,
    /// A size the last PAX records gave the next entry.
    next_size: Option<u64>,
}

impl<R: Read> TarGuard<R> {
    pub fn new(inner: R) -> TarGuard<R> {
        TarGuard {
            inner,
            state: State::Header,
            hdr: [0; BLOCK],
            hdr_len: 0,
            zero_blocks: 0,
            pax: Vec::new(),
            next_size: None,
        }
    }

    /// Look at a complete header; the data that follows it, in bytes (padded).
    fn examine(&mut self) -> io::Result<(u64, bool)> {
        if self.hdr.iter().all(|b| *b == 0) {
            self.zero_blocks += 1;
            return Ok((0, false));
        }
        self.zero_blocks = 0;
        let kind = self.hdr[156];
        let mut size = header_size(&self.hdr[124..136])
            .ok_or_else(|| bad("a tar header with an unreadable size"))?;
        if let Some(s) = self.next_size.take()
            && !matches!(kind, b'x' | b'g' | b'L' | b'K')
        {
            size = s;
        }
        if matches!(kind, b'L' | b'K' | b'x' | b'g') && size > MAX_EXTENSION {
            let what = match kind {
                b'L' => "GNU long name",
                b'K' => "GNU long link name",
                _ => "PAX header",
            };
            return Err(bad(&format!(
                "a {what} of {size} bytes (at most {MAX_EXTENSION} are read)"
            )));
        }
        if kind == b'S' {
            return Err(bad(
                "an old-style GNU sparse file (its holes would be written out in full)",
            ));
        }
        let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        let pax = kind == b'x';
        if pax {
            self.pax.clear();
        }
        Ok((padded, pax))
    }

    /// After a PAX entry's data: a `size` record sizes the next entry.
    fn read_pax(&mut self) {
        for rec in self.pax.split(|b| *b == b'\n') {
            // "LEN key=value"
            let Some(sp) = rec.iter().position(|b| *b == b' ') else {
                continue;
            };
            if let Some(v) = rec[sp + 1..].strip_prefix(b"size=")
                && let Some(n) = std::str::from_utf8(v).ok().and_then(|v| v.parse().ok())
            {
                self.next_size = Some(n);
            }
        }
        self.pax.clear();
    }
}

fn bad(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("refused: {why}"))
}

/// A header's size field: octal digits (NUL or space padded), or GNU base-256 (high bit set).
fn header_size(f: &[u8]) -> Option<u64> {
    if f[0] & 0x80 != 0 {
        let mut n: u64 = u64::from(f[0] & 0x7f);
        for b in &f[1..] {
            n = n.checked_mul(256)?.checked_add(u64::from(*b))?;
        }
        return Some(n);
    }
    let digits: Vec<u8> = f
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(|b| (b'0'..=b'7').contains(b))
        .collect();
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(&digits).ok()?, 8).ok()
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match &mut self.state {
                State::Done => return self.inner.read(buf),
                State::Header => {
                    while self.hdr_len < BLOCK {
                        let n = self.inner.read(&mut self.hdr[self.hdr_len..])?;
                        if n == 0 {
                            break;
                        }
                        self.hdr_len += n;
                    }
                    if self.hdr_len < BLOCK {
                        // a short stream: hand out what there is (the tar crate says what is
                        // wrong with it), then pass the rest
                        self.zero_blocks = 1;
                        self.state = State::HeaderOut {
                            pos: 0,
                            data: 0,
                            pax: false,
                        };
                        continue;
                    }
                    let (data, pax) = self.examine()?;
                    self.state = State::HeaderOut { pos: 0, data, pax };
                }
                State::HeaderOut { pos, data, pax } => {
                    let n = (self.hdr_len - *pos).min(buf.len());
                    buf[..n].copy_from_slice(&self.hdr[*pos..*pos + n]);
                    *pos += n;
                    if *pos == self.hdr_len {
                        let (data, pax) = (*data, *pax);
                        self.hdr_len = 0;
                        self.state = if self.zero_blocks >= 1 {
                            State::Done
                        } else if data > 0 {
                            State::Data { left: data, pax }
                        } else {
                            State::Header
                        };
                    }
                    if n > 0 || buf.is_empty() {
                        return Ok(n);
                    }
                }
                State::Data { left, pax } => {
                    let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    let n = self.inner.read(&mut buf[..want])?;
                    if n == 0 {
                        self.state = State::Done;
                        return Ok(0);
                    }
                    *left -= n as u64;
                    let (done, pax) = (*left == 0, *pax);
                    if pax {
                        self.pax.extend_from_slice(&buf[..n]);
                    }
                    if done {
                        if pax {
                            self.read_pax();
                        }
                        self.state = State::Header;
                    }
                    return Ok(n);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(data: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = vec![];
        TarGuard::new(data).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn archives_pass_unchanged_and_huge_extensions_are_refused() {
        // an ordinary archive, with a long name and a PAX record, passes byte for byte
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        b.append_data(&mut h, "a/".repeat(100) + "long", &b"hello"[..])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(3);
        h.set_mode(0o644);
        b.append_pax_extensions([("comment", &b"x"[..])]).unwrap();
        b.append_data(&mut h, "f", &b"abc"[..]).unwrap();
        let mut data = b.into_inner().unwrap();
        data.extend_from_slice(&[0xAB; 1000]);
        assert_eq!(read_all(&data).unwrap(), data);
        let mut ar = tar::Archive::new(TarGuard::new(&data[..]));
        assert_eq!(ar.entries().unwrap().count(), 2);

        // a long name of 2 MiB is refused before it is read
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(2 << 20);
        h.set_cksum();
        let mut bomb = h.as_bytes().to_vec();
        bomb.extend(std::iter::repeat_n(b'a', 2 << 20));
        let err = read_all(&bomb).unwrap_err();
        assert!(
            err.to_string().contains("GNU long name of 2097152 bytes"),
            "{err}"
        );
        // as is a PAX header of 2 MiB
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(2 << 20);
        h.set_cksum();
        let err = read_all(h.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("PAX header"), "{err}");
        // base-256 sizes are read
        assert_eq!(
            header_size(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]),
            Some(65536)
        );
        assert_eq!(header_size(b"00000000017\0"), Some(15));
    }
}
