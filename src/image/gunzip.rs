//! A gzip decoder (RFC 1952) for layer blobs that leaves integrity to the digests.
//!
//! A layer's compressed bytes are checked against the blob's SHA-256 digest and its
//! decompressed bytes against the diffID, so gzip's own CRC-32 of the decompressed data adds
//! nothing, yet computing it (as flate2's decoders always do) cost ~5% of a pull's CPU time.
//! This reader parses the member headers itself, inflates with flate2's raw `Decompress`, and
//! checks each trailer's length field only. Members follow one another, as in
//! `gzip`'s and Go's readers; anything after a member that is not another member is an error.

use flate2::{Decompress, FlushDecompress, Status};
use std::io::{self, BufRead, Read};

const FHCRC: u8 = 0x02;
const FEXTRA: u8 = 0x04;
const FNAME: u8 = 0x08;
const FCOMMENT: u8 = 0x10;
const FRESERVED: u8 = 0xe0;

enum State {
    /// Before a member's header (`first`: the stream's first member, which must be there).
    Header {
        first: bool,
    },
    Body,
    Trailer,
    Done,
}

pub struct Gunzip<R> {
    reader: R,
    inflate: Decompress,
    state: State,
    /// Bytes this member has decompressed so far (its trailer holds the count mod 2^32).
    member_out: u64,
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn truncated() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "gzip stream ends early")
}

impl<R: BufRead> Gunzip<R> {
    pub fn new(reader: R) -> Gunzip<R> {
        Gunzip {
            reader,
            inflate: Decompress::new(false),
            state: State::Header { first: true },
            member_out: 0,
        }
    }

    fn byte(&mut self) -> io::Result<u8> {
        let mut b = [0u8; 1];
        self.reader.read_exact(&mut b).map_err(eof_is_truncation)?;
        Ok(b[0])
    }

    /// Skip bytes up to and including a zero (a name or a comment), however long.
    fn skip_string(&mut self) -> io::Result<()> {
        loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                return Err(truncated());
            }
            match buf.iter().position(|b| *b == 0) {
                Some(i) => {
                    self.reader.consume(i + 1);
                    return Ok(());
                }
                None => {
                    let n = buf.len();
                    self.reader.consume(n);
                }
            }
        }
    }

    /// Read a member header; false at the end of the stream (not allowed before the first).
    fn header(&mut self, first: bool) -> io::Result<bool> {
        if !first && self.reader.fill_buf()?.is_empty() {
            return Ok(false);
        }
        let mut h = [0u8; 10];
        self.reader.read_exact(&mut h).map_err(eof_is_truncation)?;
        if h[0] != 0x1f || h[1] != 0x8b {
            return Err(invalid(if first {
                "not gzip data (no gzip header)"
            } else {
                "data after the end of the gzip stream"
            }));
        }
        if h[2] != 8 {
            return Err(invalid(format!(
                "gzip compression method {} (only 8, deflate)",
                h[2]
            )));
        }
        let flags = h[3];
        if flags & FRESERVED != 0 {
            return Err(invalid("gzip header with reserved flags set"));
        }
        if flags & FEXTRA != 0 {
            let len = u16::from_le_bytes([self.byte()?, self.byte()?]);
            let skipped = io::copy(
                &mut (&mut self.reader).take(u64::from(len)),
                &mut io::sink(),
            )?;
            if skipped != u64::from(len) {
                return Err(truncated());
            }
        }
        if flags & FNAME != 0 {
            self.skip_string()?;
        }
        if flags & FCOMMENT != 0 {
            self.skip_string()?;
        }
        if flags & FHCRC != 0 {
            // a CRC-16 of the header: covered by the blob's digest like everything else
            self.byte()?;
            self.byte()?;
        }
        Ok(true)
    }

    fn trailer(&mut self) -> io::Result<()> {
        let mut t = [0u8; 8];
        self.reader.read_exact(&mut t).map_err(eof_is_truncation)?;
        let isize = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
        // the length mod 2^32, by definition
        if isize != self.member_out as u32 {
            return Err(invalid(format!(
                "gzip member length {} in its trailer, {} decompressed",
                isize, self.member_out
            )));
        }
        Ok(())
    }

    /// Inflate into `out`; 0 only at the end of this member's deflate data.
    fn body(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            let input = self.reader.fill_buf()?;
            if input.is_empty() {
                return Err(truncated());
            }
            let (in0, out0) = (self.inflate.total_in(), self.inflate.total_out());
            let status = self
                .inflate
                .decompress(input, out, FlushDecompress::None)
                .map_err(|e| invalid(format!("corrupt deflate data: {e}")))?;
            let consumed = (self.inflate.total_in() - in0) as usize;
            let produced = (self.inflate.total_out() - out0) as usize;
            self.reader.consume(consumed);
            self.member_out += produced as u64;
            if let Status::StreamEnd = status {
                self.state = State::Trailer;
                return Ok(produced);
            }
            if produced > 0 {
                return Ok(produced);
            }
            if consumed == 0 {
                // input offered, room for output, and nothing moved: zlib's "no progress"
                return Err(invalid("corrupt deflate data: no progress"));
            }
        }
    }
}

fn eof_is_truncation(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        truncated()
    } else {
        e
    }
}

impl<R: BufRead> Read for Gunzip<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                State::Header { first } => {
                    if !self.header(first)? {
                        self.state = State::Done;
                        return Ok(0);
                    }
                    self.inflate.reset(false);
                    self.member_out = 0;
                    self.state = State::Body;
                }
                State::Body => {
                    let n = self.body(out)?;
                    if n > 0 {
                        return Ok(n);
                    }
                }
                State::Trailer => {
                    self.trailer()?;
                    self.state = State::Header { first: false };
                }
                State::Done => return Ok(0),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn gunzip(blob: &[u8]) -> io::Result<Vec<u8>> {
        // a small buffer, so that headers and trailers straddle reads
        let mut out = Vec::new();
        Gunzip::new(io::BufReader::with_capacity(7, blob)).read_to_end(&mut out)?;
        Ok(out)
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (i * 31 % 251) as u8 ^ (i >> 9) as u8)
            .collect()
    }

    #[test]
    fn members_and_header_fields() {
        let a = data(300_000);
        assert_eq!(gunzip(&gz(&a)).unwrap(), a);
        // two members, one of them empty, then a third
        let mut two = gz(&a);
        two.extend(gz(b""));
        two.extend(gz(b"tail"));
        let mut want = a.clone();
        want.extend_from_slice(b"tail");
        assert_eq!(gunzip(&two).unwrap(), want);
        // every optional header field
        let mut e = flate2::GzBuilder::new()
            .extra(vec![7; 300])
            .filename("layer.tar")
            .comment("made by a test")
            .write(Vec::new(), flate2::Compression::default());
        e.write_all(&a).unwrap();
        let mut full = e.finish().unwrap();
        assert_eq!(gunzip(&full).unwrap(), a);
        // FHCRC: a header CRC-16 after the other fields (flate2 does not write one)
        full[3] |= FHCRC;
        let at = full.len() - gz_body_and_trailer_len(&full);
        full.splice(at..at, [0xab, 0xcd]);
        assert_eq!(gunzip(&full).unwrap(), a);
    }

    /// Length of the deflate data and trailer of a one-member stream built by GzBuilder with
    /// extra, name and comment (the header's end is found by walking it).
    fn gz_body_and_trailer_len(blob: &[u8]) -> usize {
        let mut at = 10;
        let xlen = u16::from_le_bytes([blob[at], blob[at + 1]]) as usize;
        at += 2 + xlen;
        for _ in 0..2 {
            at += blob[at..].iter().position(|b| *b == 0).unwrap() + 1;
        }
        blob.len() - at
    }

    #[test]
    fn broken_streams_are_errors() {
        let a = data(100_000);
        let good = gz(&a);
        let kind = |blob: &[u8]| gunzip(blob).unwrap_err().kind();
        // empty, cut in the header, the body, the trailer
        assert_eq!(kind(b""), io::ErrorKind::UnexpectedEof);
        for cut in [5, good.len() / 2, good.len() - 3] {
            assert_eq!(
                kind(&good[..cut]),
                io::ErrorKind::UnexpectedEof,
                "cut at {cut}"
            );
        }
        // not gzip; another method; reserved flags
        assert_eq!(kind(b"plain tar bytes here"), io::ErrorKind::InvalidData);
        let mut m = good.clone();
        m[2] = 7;
        assert_eq!(kind(&m), io::ErrorKind::InvalidData);
        let mut f = good.clone();
        f[3] |= 0x80;
        assert_eq!(kind(&f), io::ErrorKind::InvalidData);
        // garbled deflate data
        let mut g = good.clone();
        for b in &mut g[20..60] {
            *b = 0xff;
        }
        assert!(gunzip(&g).is_err());
        // a wrong length in the trailer
        let mut l = good.clone();
        let n = l.len();
        l[n - 1] ^= 1;
        assert_eq!(kind(&l), io::ErrorKind::InvalidData);
        // bytes after the last member that are not another member
        let mut t = good.clone();
        t.extend_from_slice(&[0; 16]);
        assert_eq!(kind(&t), io::ErrorKind::InvalidData);
    }

    #[test]
    fn the_crc_is_not_what_guards_the_data() {
        // a wrong CRC-32 passes: the blob digest and the diffID are the checks that count
        let a = data(10_000);
        let mut c = gz(&a);
        let n = c.len();
        c[n - 8] ^= 0xff;
        assert_eq!(gunzip(&c).unwrap(), a);
    }
}
