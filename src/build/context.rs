//! The build context: `.dockerignore`, the glob patterns of COPY and ADD sources, and
//! copying what they match into a staging tree (for a layer) or hashing it (for the cache
//! key). Nothing is followed out of the tree it is read from: paths are resolved inside it,
//! symlinks are copied as symlinks.

use crate::fsutil::PathError;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Entries one COPY may match (a bound on hostile or mistaken contexts).
const MAX_ENTRIES: usize = 1_000_000;
/// `.dockerignore` rules read.
const MAX_RULES: usize = 1000;

/// Whether one path segment matches a pattern segment (`*`, `?`, `[a-z]`, `[!x]`, `\x`).
fn segment_matches(pat: &[u8], s: &[u8]) -> bool {
    // iterative wildcard matching with one backtrack point for `*`
    let (mut p, mut i) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        let step = match pat.get(p) {
            Some(b'*') => {
                star = Some((p, i));
                p += 1;
                continue;
            }
            Some(b'?') => Some(p + 1),
            Some(b'[') => class(pat, p, s[i]),
            Some(b'\\') => match pat.get(p + 1) {
                Some(c) if *c == s[i] => Some(p + 2),
                _ => None,
            },
            Some(c) if *c == s[i] => Some(p + 1),
            _ => None,
        };
        match step {
            Some(np) => {
                p = np;
                i += 1;
            }
            None => match star {
                Some((sp, si)) => {
                    p = sp + 1;
                    i = si + 1;
                    star = Some((sp, si + 1));
                }
                None => return false,
            },
        }
    }
    while pat.get(p) == Some(&b'*') {
        p += 1;
    }
    p == pat.len()
}

/// A `[...]` class at `pat[p]` against `c`: the index after the class if it matches.
fn class(pat: &[u8], p: usize, c: u8) -> Option<usize> {
    let mut j = p + 1;
    let negate = matches!(pat.get(j), Some(b'!') | Some(b'^'));
    if negate {
        j += 1;
    }
    let mut hit = false;
    let mut first = true;
    while let Some(&b) = pat.get(j) {
        if b == b']' && !first {
            return (hit != negate).then_some(j + 1);
        }
        first = false;
        if pat.get(j + 1) == Some(&b'-') && pat.get(j + 2).is_some_and(|e| *e != b']') {
            let hi = pat[j + 2];
            hit |= b <= c && c <= hi;
            j += 3;
        } else {
            hit |= b == c;
            j += 1;
        }
    }
    None
}

/// Whether `path` (relative, `/`-separated) matches `pattern` (`**` matches any number of
/// segments). Dynamic programming over (pattern segment, path segment): linear in their
/// product whatever the number of `**` (backtracking was exponential in it).
pub fn path_matches(pattern: &str, path: &str) -> bool {
    let mut pat: Vec<&str> = vec![];
    for p in pattern.split('/').filter(|s| !s.is_empty()) {
        // consecutive `**` are one
        if p == "**" && pat.last() == Some(&"**") {
            continue;
        }
        pat.push(p);
    }
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // ok[j]: the pattern so far matches the first j path segments
    let mut ok = vec![false; segs.len() + 1];
    ok[0] = true;
    for p in &pat {
        let mut next = vec![false; segs.len() + 1];
        if *p == "**" {
            let mut any = false;
            for j in 0..=segs.len() {
                any |= ok[j];
                next[j] = any;
            }
        } else {
            for j in 1..=segs.len() {
                next[j] = ok[j - 1] && segment_matches(p.as_bytes(), segs[j - 1].as_bytes());
            }
        }
        ok = next;
    }
    ok[segs.len()]
}

/// Refuse a source path that goes through a symlink before its last component: it would
/// lead out of the context (or out of a stage's files).
pub fn check_components(root: &Path, rel: &str) -> Result<(), String> {
    let mut p = root.to_path_buf();
    let parts: Vec<&str> = rel.split('/').filter(|s| !s.is_empty()).collect();
    for (i, c) in parts.iter().enumerate() {
        if i + 1 == parts.len() || c.contains(['*', '?', '[']) {
            break;
        }
        p.push(c);
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(format!(
                "{rel}: goes through the symlink {c}, which is not followed"
            ));
        }
    }
    Ok(())
}

/// `.dockerignore`: patterns in order, `!` re-including; the last that matches decides.
#[derive(Debug, Default, Clone)]
pub struct Ignore {
    rules: Vec<(bool, String)>,
}

impl Ignore {
    /// Read `context/.dockerignore` (none: nothing ignored).
    pub fn load(context: &Path) -> Result<Ignore, PathError> {
        let p = context.join(".dockerignore");
        // inside the context, through no symlink
        let text = match crate::fsutil::open_regular(Path::new(".dockerignore"), Some(context)) {
            Ok(f) => {
                let mut s = String::new();
                f.take(1 << 20)
                    .read_to_string(&mut s)
                    .map_err(|e| PathError::new("read", &p, e))?;
                s
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ignore::default()),
            Err(e) => return Err(PathError::new("open", &p, e)),
        };
        let rules = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .take(MAX_RULES)
            .map(|l| {
                let (keep, pat) = match l.strip_prefix('!') {
                    Some(rest) => (true, rest.trim()),
                    None => (false, l),
                };
                (keep, clean(pat))
            })
            .collect();
        Ok(Ignore { rules })
    }

    /// Whether `rel` is excluded (a directory's exclusion covers what is below it).
    pub fn ignored(&self, rel: &str) -> bool {
        let mut out = false;
        for (keep, pat) in &self.rules {
            // a pattern matches the path or one of its parent directories
            let mut hit = path_matches(pat, rel);
            if !hit {
                let mut prefix = String::new();
                for seg in rel.split('/') {
                    if !prefix.is_empty() {
                        prefix.push('/');
                    }
                    prefix.push_str(seg);
                    if prefix.len() < rel.len() && path_matches(pat, &prefix) {
                        hit = true;
                        break;
                    }
                }
            }
            if hit {
                out = !keep;
            }
        }
        out
    }
}

/// A pattern or source made relative and `/`-separated, `.` segments dropped.
fn clean(p: &str) -> String {
    p.split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// A source path relative to its root, refusing anything that climbs out of it.
pub fn relative_source(src: &str) -> Result<String, String> {
    let mut out: Vec<&str> = vec![];
    for c in Path::new(src).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(s) => out.push(s.to_str().ok_or("a source that is not UTF-8")?),
            Component::ParentDir => {
                if out.pop().is_none() {
                    return Err(format!("{src}: outside the build context"));
                }
            }
            Component::Prefix(_) => return Err(format!("{src}: not a path")),
        }
    }
    Ok(out.join("/"))
}

fn has_glob(s: &str) -> bool {
    s.bytes().any(|b| matches!(b, b'*' | b'?' | b'['))
}

/// The paths under `root` that `src` names (relative, `/`-separated; "" for the root
/// itself), not ignored: the path itself, or every match of its glob. Symlinks are matched
/// as themselves, never followed.
pub fn matches(root: &Path, src: &str, ignore: &Ignore) -> Result<Vec<String>, String> {
    let rel = relative_source(src)?;
    check_components(root, &rel)?;
    if !has_glob(&rel) {
        let p = root.join(&rel);
        return match std::fs::symlink_metadata(&p) {
            Ok(_) if !rel.is_empty() && ignore.ignored(&rel) => {
                Err(format!("{src}: excluded by .dockerignore"))
            }
            Ok(_) => Ok(vec![rel]),
            Err(_) => Err(format!("{src}: no such file or directory in the source")),
        };
    }
    // walk only as deep as the pattern goes
    let depth = rel.split('/').count();
    let mut found = vec![];
    let mut stack: Vec<(PathBuf, String, usize)> = vec![(root.to_path_buf(), String::new(), 0)];
    while let Some((dir, prefix, d)) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let r = if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}/{name}")
            };
            if d + 1 == depth {
                if path_matches(&rel, &r) && !ignore.ignored(&r) {
                    found.push(r);
                }
            } else if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((e.path(), r, d + 1));
            }
            if found.len() > MAX_ENTRIES {
                return Err(format!("{src}: matches more than {MAX_ENTRIES} entries"));
            }
        }
    }
    if found.is_empty() {
        return Err(format!(
            "{src}: no source files were specified (nothing matches)"
        ));
    }
    found.sort();
    Ok(found)
}

/// Feed everything at `root/rel` (recursively, sorted, not ignored) into `h`: names, types,
/// modes, owners, link targets and contents. The cache key of a COPY.
pub fn hash_tree(root: &Path, rel: &str, ignore: &Ignore, h: &mut Sha256) -> Result<(), String> {
    let mut count = 0usize;
    let mut stack = vec![rel.to_string()];
    while let Some(r) = stack.pop() {
        count += 1;
        if count > MAX_ENTRIES {
            return Err(format!("{rel}: more than {MAX_ENTRIES} entries"));
        }
        let p = root.join(&r);
        let m = std::fs::symlink_metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        h.update(r.as_bytes());
        h.update([0]);
        h.update(format!("{:o} {} {} {}\0", m.mode(), m.uid(), m.gid(), m.len()).as_bytes());
        let ft = m.file_type();
        if ft.is_symlink() {
            let t = std::fs::read_link(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            h.update(t.as_os_str().as_bytes());
        } else if ft.is_file() {
            let rel_path = Path::new(&r);
            let mut f = crate::fsutil::open_regular(rel_path, Some(root))
                .map_err(|e| format!("{}: {e}", p.display()))?;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = f
                    .read(&mut buf)
                    .map_err(|e| format!("{}: {e}", p.display()))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        } else if ft.is_dir() {
            let mut names: Vec<String> = std::fs::read_dir(&p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .map(|n| if r.is_empty() { n } else { format!("{r}/{n}") })
                .filter(|c| !ignore.ignored(c))
                .collect();
            names.sort_unstable_by(|a, b| b.cmp(a));
            stack.extend(names);
        }
    }
    Ok(())
}

/// Copy `root/rel` to `dest` (a path that does not exist yet; its parent does): a directory
/// recursively (its contents, not ignored ones), a file, a symlink as a symlink. Modes are
/// kept (or `chmod` set), owners kept.
pub fn copy_tree(
    root: &Path,
    rel: &str,
    dest: &Path,
    ignore: &Ignore,
    chmod: Option<u32>,
) -> Result<(), String> {
    let mut count = 0usize;
    let mut stack: Vec<(String, PathBuf)> = vec![(rel.to_string(), dest.to_path_buf())];
    while let Some((r, d)) = stack.pop() {
        count += 1;
        if count > MAX_ENTRIES {
            return Err(format!("{rel}: more than {MAX_ENTRIES} entries"));
        }
        let p = root.join(&r);
        let m = std::fs::symlink_metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let ft = m.file_type();
        let err = |e: std::io::Error| format!("{}: {e}", d.display());
        if ft.is_symlink() {
            let t = std::fs::read_link(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            if std::fs::symlink_metadata(&d).is_ok() {
                remove_any(&d).map_err(err)?;
            }
            std::os::unix::fs::symlink(&t, &d).map_err(err)?;
            let _ = std::os::unix::fs::lchown(&d, Some(m.uid()), Some(m.gid()));
            continue;
        }
        if ft.is_dir() {
            match std::fs::symlink_metadata(&d) {
                Ok(x) if x.is_dir() => {}
                Ok(_) => {
                    remove_any(&d).map_err(err)?;
                    std::fs::create_dir(&d).map_err(err)?;
                }
                Err(_) => std::fs::create_dir(&d).map_err(err)?,
            }
            std::fs::set_permissions(
                &d,
                std::fs::Permissions::from_mode(chmod.unwrap_or(m.mode() & 0o7777)),
            )
            .map_err(err)?;
            let _ = std::os::unix::fs::lchown(&d, Some(m.uid()), Some(m.gid()));
            for e in std::fs::read_dir(&p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .flatten()
            {
                let name = e.file_name();
                let Some(n) = name.to_str() else { continue };
                let child = if r.is_empty() {
                    n.to_string()
                } else {
                    format!("{r}/{n}")
                };
                if !ignore.ignored(&child) {
                    stack.push((child, d.join(n)));
                }
            }
            continue;
        }
        if !ft.is_file() {
            // devices, FIFOs and sockets in a context are not copied (as docker refuses)
            return Err(format!(
                "{}: only files, directories and symlinks are copied",
                p.display()
            ));
        }
        let mut src = crate::fsutil::open_regular(Path::new(&r), Some(root))
            .map_err(|e| format!("{}: {e}", p.display()))?;
        if std::fs::symlink_metadata(&d).is_ok() {
            remove_any(&d).map_err(err)?;
        }
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&d)
            .map_err(err)?;
        std::io::copy(&mut src, &mut out).map_err(err)?;
        out.set_permissions(std::fs::Permissions::from_mode(
            chmod.unwrap_or(m.mode() & 0o7777),
        ))
        .map_err(err)?;
        let _ = std::os::unix::fs::fchown(&out, Some(m.uid()), Some(m.gid()));
    }
    Ok(())
}

fn remove_any(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(_) => Ok(()),
    }
}

/// Every file of a build context that is not ignored, with a digest of what it is (type,
/// mode, owner, content or link target): what decides whether an image must be built again.
pub fn file_digests(root: &Path) -> Result<std::collections::BTreeMap<String, String>, String> {
    let ignore = Ignore::load(root).map_err(|e| e.to_string())?;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(r) = stack.pop() {
        let dir = root.join(&r);
        let rd = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(n) = name.to_str() else { continue };
            let rel = if r.is_empty() {
                n.to_string()
            } else {
                format!("{r}/{n}")
            };
            if ignore.ignored(&rel) {
                continue;
            }
            if out.len() > MAX_ENTRIES {
                return Err(format!("{}: more than {MAX_ENTRIES} files", root.display()));
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(rel);
                continue;
            }
            let mut h = Sha256::new();
            // the entry alone: its name is the key
            hash_tree(root, &rel, &Ignore::default(), &mut h)?;
            out.insert(rel, hex::encode(h.finalize()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_docker() {
        assert!(path_matches("*.go", "main.go"));
        assert!(!path_matches("*.go", "cmd/main.go"));
        assert!(path_matches("**/*.go", "cmd/x/main.go"));
        assert!(path_matches("**/*.go", "main.go"));
        assert!(path_matches("a?c", "abc"));
        assert!(path_matches("[a-c]x", "bx"));
        assert!(!path_matches("[!a-c]x", "bx"));
        assert!(path_matches("src/**", "src/a/b"));
        assert!(!path_matches("src", "src/a"));
    }

    #[test]
    fn many_double_stars_stay_linear() {
        // backtracking took minutes on this; the table takes microseconds
        let pat = "**/**/**/**/**/**/**/**/**/**/**/**/**/**/**/**/**/**/**/**/zz";
        let path = vec!["a"; 60].join("/");
        assert!(!path_matches(pat, &path));
        assert!(path_matches(pat, &format!("{path}/zz")));
        assert!(path_matches("a/**/b/**/c", "a/x/b/y/z/c"));
        assert!(!path_matches("a/**/b/**/c", "a/x/c"));
    }

    #[test]
    fn dockerignore_last_match_wins_and_covers_directories() {
        let ig = Ignore {
            rules: vec![
                (false, "*.log".into()),
                (false, "build".into()),
                (true, "keep.log".into()),
                (false, "**/secret".into()),
            ],
        };
        assert!(ig.ignored("a.log"));
        assert!(!ig.ignored("keep.log"));
        assert!(ig.ignored("build/out/x"));
        assert!(ig.ignored("deep/er/secret"));
        assert!(!ig.ignored("src/main.rs"));
    }

    #[test]
    fn sources_cannot_climb_out() {
        assert_eq!(relative_source("./a/../b").unwrap(), "b");
        assert_eq!(relative_source("/x/y").unwrap(), "x/y");
        assert!(relative_source("../etc/passwd").is_err());
        assert!(relative_source("a/../../x").is_err());
    }

    #[test]
    fn copy_and_hash_follow_nothing_out() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("ctx");
        std::fs::create_dir_all(root.join("dir/sub")).unwrap();
        std::fs::write(root.join("dir/a.txt"), "a").unwrap();
        std::fs::write(root.join("dir/sub/b.log"), "b").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("dir/link")).unwrap();
        let ig = Ignore {
            rules: vec![(false, "**/*.log".into())],
        };
        let out = d.path().join("out");
        copy_tree(&root, "dir", &out, &ig, None).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("a.txt")).unwrap(), "a");
        assert!(!out.join("sub/b.log").exists(), "ignored");
        assert_eq!(
            std::fs::read_link(out.join("link")).unwrap(),
            Path::new("/etc/passwd")
        );
        let mut h1 = Sha256::new();
        hash_tree(&root, "dir", &ig, &mut h1).unwrap();
        std::fs::write(root.join("dir/sub/b.log"), "changed").unwrap();
        let mut h2 = Sha256::new();
        hash_tree(&root, "dir", &ig, &mut h2).unwrap();
        assert_eq!(
            h1.finalize(),
            h2.finalize(),
            "an ignored file is not an input"
        );
        std::fs::write(root.join("dir/a.txt"), "changed").unwrap();
        let mut h3 = Sha256::new();
        hash_tree(&root, "dir", &ig, &mut h3).unwrap();
        let mut h4 = Sha256::new();
        hash_tree(&root, "dir", &Ignore::default(), &mut h4).unwrap();
        assert_ne!(h3.finalize(), h4.finalize());
        assert_eq!(matches(&root, "dir/*.txt", &ig).unwrap(), vec!["dir/a.txt"]);
        assert!(matches(&root, "nothing*", &ig).is_err());
    }
}
