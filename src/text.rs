//! Input echoed in messages: bounded and printable. A hostname of 200 MB or an archive of
//! random bytes must not reach the terminal as they are.

/// `s` as at most `max` characters, control and other non-printable characters escaped
/// (`\n`, `\u{1b}`), cut with `…` and the total length when longer.
pub fn printable(s: &str, max: usize) -> String {
    cut(s, max, s.len())
}

/// [`printable`] for bytes that may not be UTF-8: invalid bytes shown as `\xNN`.
pub fn printable_bytes(b: &[u8], max: usize) -> String {
    let mut s = String::new();
    for chunk in b.utf8_chunks() {
        // enough to fill `max` characters, whatever the escapes
        if s.len() > max * 4 + 4 {
            break;
        }
        let v = chunk.valid();
        let end = v.char_indices().nth(max + 1).map_or(v.len(), |(i, _)| i);
        s.push_str(&v[..end]);
        for x in chunk.invalid() {
            s.push_str(&format!("\\x{x:02x}"));
        }
    }
    cut(&s, max, b.len())
}

fn cut(s: &str, max: usize, total: usize) -> String {
    let mut out = String::new();
    for (shown, c) in s.chars().enumerate() {
        if shown >= max {
            out.push_str(&format!("… ({total} bytes in all)"));
            return out;
        }
        if c.is_control() || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_and_binary_input_is_cut_and_escaped() {
        assert_eq!(printable("web", 10), "web");
        assert_eq!(printable("a\nb\u{1b}[2J", 10), "a\\nb\\u{1b}[2J");
        let long = "x".repeat(1000);
        assert_eq!(printable(&long, 5), "xxxxx… (1000 bytes in all)");
        assert_eq!(printable_bytes(b"ok\xff\x00", 10), "ok\\xff\\u{0}");
        let noise: Vec<u8> = (0..100_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        let shown = printable_bytes(&noise, 40);
        assert!(shown.len() < 300, "{shown}");
        assert!(shown.ends_with("(100000 bytes in all)"), "{shown}");
        assert!(!shown.chars().any(|c| c.is_control()), "{shown:?}");
    }
}
